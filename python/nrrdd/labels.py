"""Label modes: what the teacher's view of each mixed image is reduced to, and how it is stored.

For every student epoch e and every distilled image i, the relabel step sees the
teacher's logits T(x_mix) on the replayed mixed view (``nrrdd.augment``) and keeps:

- ``dbr``: (d_org^T, d_aug^T) = ``nrrdd_ext.dbr_distances`` (paper Eq. 8): two
  float16 per image per epoch — the paper's contribution (Sec. 3.4);
- ``soft``: the teacher's logits, float16 × num_classes per image per epoch (the
  SRe2L / FKD baseline);
- ``compact``: the two largest probabilities of softmax(T(x_mix)/τ) and their
  classes (float16 × 2 + int16 × 2; int32 past 32767 classes) — the 'CL' baseline
  of the paper's Table 2; the student spreads the remaining mass evenly over the
  other classes (RDED's ``keep_top_k``);
- ``onehot``: nothing (the student uses the hard labels and the mix weight λ).

On disk, ``DIR/labels_<mode>/epoch_<e>.bin`` holds, for epoch e, each field as a
little-endian row-major (num_images, width) array, fields one after the other;
row i belongs to image i of ``images.pt`` (not to a batch position). The file is
exactly the payload: a dbr shard is 4 bytes per image. ``manifest.json`` names the
fields, the seed and augmentation (so the student replays the same x_mix), and
the bytes stored, per image, and relative to soft labels.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from nrrdd import storage
from nrrdd.errors import UsageError

MODES = ("dbr", "soft", "compact", "onehot")
STORED_MODES = ("dbr", "soft", "compact")
FORMAT_VERSION = 1
SOFT_BYTES_PER_CLASS = 2  # float16 logits: the soft-label baseline the ratio is measured against

# RDED's temperatures for the KL to the teacher's softened distribution.
DEFAULT_TEMPERATURE = {"cutmix": 20.0, "mixup": 4.0, "none": 4.0}

_DTYPES = {"float16": torch.float16, "int16": torch.int16, "int32": torch.int32}


@dataclass(frozen=True)
class Field:
    """One per-image stored quantity: ``width`` values of ``dtype``."""

    name: str
    dtype: str
    width: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "width": self.width}


def fields(mode: str, num_classes: int) -> List[Field]:
    """The per-image fields a mode stores each epoch."""
    if mode == "dbr":
        return [Field("d", "float16", 2)]  # (d_org^T, d_aug^T)
    if mode == "soft":
        return [Field("logits", "float16", num_classes)]
    if mode == "compact":
        cls_dtype = "int16" if num_classes <= 32767 else "int32"
        return [Field("prob", "float16", 2), Field("cls", cls_dtype, 2)]
    if mode == "onehot":
        return []
    raise ValueError(f"unknown label mode {mode!r} (choose from {', '.join(MODES)})")


def bytes_per_image_epoch(mode: str, num_classes: int) -> int:
    return sum(f.width * f.itemsize for f in fields(mode, num_classes))


def teacher_targets(mode: str, logits: torch.Tensor, y_org: torch.Tensor, y_aug: torch.Tensor,
                    temperature: float) -> Dict[str, torch.Tensor]:
    """Reduce the teacher's logits on x_mix to the stored fields (already in their storage dtype).

    The online mode uses this too, so online and stored training see the same numbers.
    """
    if mode == "dbr":
        import nrrdd_ext

        d_org, d_aug = nrrdd_ext.dbr_distances(logits, y_org, y_aug)
        return {"d": torch.stack([d_org, d_aug], dim=1).to(torch.float16)}
    if mode == "soft":
        return {"logits": logits.to(torch.float16)}
    if mode == "compact":
        p = torch.softmax(logits.float() / temperature, dim=1)
        k = min(2, p.shape[1])
        val, idx = p.topk(k, dim=1)
        if k < 2:  # one class: pad with a zero-probability copy
            val, idx = torch.cat([val, torch.zeros_like(val)], 1), torch.cat([idx, idx], 1)
        cls_dtype = fields("compact", logits.shape[1])[1].torch_dtype
        return {"prob": val.to(torch.float16), "cls": idx.to(cls_dtype)}
    if mode == "onehot":
        return {}
    raise ValueError(f"unknown label mode {mode!r}")


def compact_distribution(prob: torch.Tensor, cls: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The full distribution a compact label stands for: top-2 kept, the rest spread evenly."""
    prob = prob.float()
    rest = (1.0 - prob.sum(1, keepdim=True)).clamp_min(0.0) / max(num_classes - 2, 1)
    q = rest.expand(prob.shape[0], num_classes).clone()
    q.scatter_(1, cls.long(), prob)
    return q


class LabelStore:
    """``DIR/labels_<mode>/``: per-epoch shards plus ``manifest.json``."""

    def __init__(self, distilled_dir: str | Path, mode: str):
        if mode not in MODES:
            raise UsageError(f"unknown label mode {mode!r} (choose from {', '.join(MODES)})")
        self.mode = mode
        self.path = Path(distilled_dir) / f"labels_{mode}"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        import json

        if not self.exists():
            raise UsageError(f"{self.path} holds no labels (run `nrrdd relabel --mode {self.mode}` first)")
        try:
            return json.loads(self.manifest_path.read_text())
        except ValueError as e:
            raise UsageError(f"{self.manifest_path} is not valid JSON: {e}") from None

    def write_manifest(self, manifest: dict) -> None:
        storage.write_json(manifest, self.manifest_path)

    def shard_path(self, epoch: int) -> Path:
        return self.path / f"epoch_{epoch:05d}.bin"

    def finished_epochs(self, num_images: int, flds: List[Field]) -> int:
        """How many leading epochs have a complete shard (the resume point)."""
        size = num_images * sum(f.width * f.itemsize for f in flds)
        e = 0
        while self.shard_path(e).is_file() and self.shard_path(e).stat().st_size == size:
            e += 1
        return e

    def complete_epoch(self, epoch: int, num_images: int, flds: List[Field]) -> bool:
        """Whether epoch ``epoch`` has a complete shard."""
        path = self.shard_path(epoch)
        return path.is_file() and path.stat().st_size == num_images * sum(f.width * f.itemsize for f in flds)

    def clear(self) -> None:
        if self.path.is_dir():
            for p in self.path.iterdir():
                if p.is_file() and (p.name.startswith("epoch_") or p.name == "manifest.json"):
                    p.unlink()

    def write_epoch(self, epoch: int, arrays: Dict[str, torch.Tensor], flds: List[Field]) -> int:
        """Write one epoch's shard atomically; returns its size in bytes."""
        parts = []
        for f in flds:
            a = arrays[f.name].detach().cpu().to(f.torch_dtype).contiguous()
            parts.append(_le_bytes(a))
        data = b"".join(parts)
        storage.write_bytes(data, self.shard_path(epoch))
        return len(data)

    def read_epoch(self, epoch: int, num_images: int, flds: List[Field]) -> Dict[str, torch.Tensor]:
        """The fields of one epoch as CPU tensors (num_images, width)."""
        path = self.shard_path(epoch)
        if not path.is_file():
            raise UsageError(f"{path} is missing (relabel interrupted? rerun it with --resume)")
        data = path.read_bytes()
        expected = num_images * sum(f.width * f.itemsize for f in flds)
        if len(data) != expected:
            raise UsageError(f"{path} holds {len(data)} bytes, expected {expected}")
        out, off = {}, 0
        for f in flds:
            n = num_images * f.width * f.itemsize
            np_dtype = np.dtype(f.dtype).newbyteorder("<")
            arr = np.frombuffer(data, dtype=np_dtype, count=num_images * f.width, offset=off)
            out[f.name] = torch.from_numpy(arr.astype(np.dtype(f.dtype))).view(num_images, f.width)
            off += n
        return out


def _le_bytes(t: torch.Tensor) -> bytes:
    a = t.numpy()
    if sys.byteorder != "little":
        a = a.byteswap()
    return a.tobytes()


def storage_summary(mode: str, num_images: int, num_classes: int, epochs: int) -> dict:
    """Bytes stored, per image, per image per epoch, and the ratio to float16 soft labels."""
    per = bytes_per_image_epoch(mode, num_classes)
    total = per * num_images * epochs
    soft = SOFT_BYTES_PER_CLASS * num_classes * num_images * epochs
    return {
        "bytes_stored": total,
        "bytes_per_image": per * epochs,
        "bytes_per_image_per_epoch": per,
        "numbers_per_image_per_epoch": sum(f.width for f in fields(mode, num_classes)),
        "soft_bytes": soft,
        "ratio_to_soft": (total / soft) if soft else None,
    }


def check_manifest(manifest: dict, *, mode: str, num_images: int, fingerprint: str,
                   num_classes: int, seed: Optional[int], epochs: Optional[int], where: Path) -> None:
    """Raise :class:`UsageError` when a labels folder does not belong to this request."""
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{where} has labels format {manifest.get('format_version')}, "
                         f"expected {FORMAT_VERSION}")
    if manifest.get("mode") != mode:
        raise UsageError(f"{where} holds {manifest.get('mode')!r} labels, not {mode!r}")
    if manifest.get("num_images") != num_images or manifest.get("images_sha256") != fingerprint:
        raise UsageError(f"{where} was made for other images than the distilled set's images.pt "
                         f"(rerun `nrrdd relabel` with --force)")
    if manifest.get("num_classes") != num_classes:
        raise UsageError(f"{where} has {manifest.get('num_classes')} classes, the data {num_classes}")
    if seed is not None and manifest.get("seed") != seed:
        raise UsageError(f"{where} was made with --seed {manifest.get('seed')}, not {seed}")
    if epochs is not None and manifest.get("epochs") != epochs:
        raise UsageError(f"{where} was made for {manifest.get('epochs')} epochs, not {epochs}")
