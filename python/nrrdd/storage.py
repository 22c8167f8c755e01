"""Atomic file writes (a temp file in the same folder, fsync, then rename) and what
``--resume`` checks before it trusts a saved state.

A run that is killed mid-write leaves either the old file or the new one, never
a torn file, so ``--resume`` can trust whatever it finds; ``tensor_fingerprint``
names the content (images, a teacher's weights) that a saved state was made from.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional


def _atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    _atomic(path, lambda f: torch.save(obj, f))


def write_json(obj: Any, path: Path) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), "w")


def write_bytes(data: bytes, path: Path) -> None:
    _atomic(path, lambda f: f.write(data))


def append_jsonl(record: dict, path: Path) -> None:
    """Append one JSON line (appends are line-atomic for the sizes written here)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def tensor_fingerprint(*tensors) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes, in order."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    return h.hexdigest()


def settings_diff(old: Optional[dict], new: dict) -> str:
    """'key A there, B now, ...' for the keys whose values differ."""
    if not isinstance(old, dict):
        return "no settings recorded"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in keys)


def load_resume_state(path: Path, settings: dict, what: str) -> dict:
    """The state an earlier run saved at ``path`` (``torch.save`` of a dict with a
    ``settings`` entry), refused with a :class:`UsageError` naming the settings that
    differ when they are not ``settings``: a resumed run must equal an uninterrupted one."""
    import torch

    from nrrdd.errors import UsageError

    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("settings") != settings:
        raise UsageError(f"{path} holds {what} made with other settings "
                         f"({settings_diff(state.get('settings'), settings)}): "
                         "rerun with the same ones, or without --resume")
    return state
