"""Where a run stands, read from the files it writes (``nrrdd status``).

Every long stage saves resumable state (``nrrdd.distill``, ``nrrdd.relabel``,
``nrrdd.student``); this module reads that state back without running anything:

- distill: the CIDD classes done (``partial/cidd/<class>.pt``), the refinement
  batches done (``partial/refine/<b>.pt``) and, for a batch under refinement, the
  step, iteration count and seconds of its last saved state (``<b>.state.pt``),
  hence seconds per iteration (on average, and between its last two saves: the
  pace now, which a pause or a shared core does not blur) and the refinement time
  left at the recent pace (the average one for a state saved before 2026-12-01);
- labels: each ``labels_<mode>/manifest.json``'s epochs done of its epochs;
- students: each finished ``eval_*.json`` (top-1 mean ± std over its students) and,
  for an evaluation under way (``.eval_*/``), the students finished and the epoch,
  epochs and seconds of the one in training (its checkpoint);
- ``last_write``: the newest file under the folder, so a run that stopped (killed,
  or its machine gone) shows as one that has not written for a long time: the
  files cannot tell a running process from a dead one.

``find_runs`` accepts a distilled folder, a ``nrrdd run`` output (its
``distilled/``) or any folder above them (a study), and lists every distilled
folder under it, and every teacher training under way (``teacher.pt.partial``: the
epochs done, the pace, the time left).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Iterable, List, Optional

from nrrdd.errors import UsageError

FORMAT_PREFIX = "nrrdd-"  # nrrdd-distill-v1 (distill), nrrdd-random-v1 (`nrrdd run --method random`)


def _json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``; None for a missing, unreadable or torn file."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _config(folder: Path) -> Optional[dict]:
    """The config.json of a distilled folder (a set written by nrrdd), else None."""
    cfg = _json(folder / "config.json")
    if cfg is None:
        return None
    if str(cfg.get("format", "")).startswith(FORMAT_PREFIX) or (folder / "images.pt").is_file():
        return cfg
    return None


def _visible(q: Path, root: Path) -> bool:
    return not any(s.startswith(".") for s in q.relative_to(root).parts)


def _distilled_under(p: Path) -> List[Path]:
    if _config(p):
        return [p]
    return [q.parent for q in sorted(p.rglob("config.json")) if _visible(q, p) and _config(q.parent)]


def _teacher_trainings_under(p: Path) -> List[Path]:
    from nrrdd.teacher import PARTIAL_SUFFIX

    return [q for q in sorted(p.rglob("*" + PARTIAL_SUFFIX)) if q.is_file() and _visible(q, p)
            and _teacher_state(q) is not None]


def find_distilled(paths: Iterable[str | Path]) -> List[Path]:
    """Every distilled folder at or under ``paths`` (hidden folders skipped), sorted.

    Raises :class:`UsageError` for a path that does not exist or holds none."""
    return find_runs(paths, teachers=False)[0]


def find_runs(paths: Iterable[str | Path], teachers: bool = True) -> tuple[List[Path], List[Path]]:
    """The distilled folders and the unfinished teacher trainings (``*.partial``, the state
    ``nrrdd train-teacher`` and ``nrrdd run`` save after each epoch) at or under ``paths``.

    Raises :class:`UsageError` for a path that does not exist or holds neither."""
    found: List[Path] = []
    trainings: List[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UsageError(f"{p} is not a folder")
        here = _distilled_under(p)
        training = _teacher_trainings_under(p) if teachers else []
        if not here and not training:
            raise UsageError(f"{p} holds no distilled set (no config.json of nrrdd at or under it)"
                             + (" and no teacher training under way" if teachers else ""))
        found += here
        trainings += training
    return sorted(set(found)), sorted(set(trainings))


def _load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _rate(seconds: float, done: int) -> Optional[float]:
    return seconds / done if done > 0 and seconds > 0 else None


def distill_progress(folder: Path) -> dict:
    """The distill stage of ``folder`` (a distilled folder): done, or how far along."""
    from nrrdd.distill import refine_batches

    cfg = _config(folder) or {}
    timings = cfg.get("timings") or {}
    if cfg.get("status") == "done" or (cfg.get("status") is None and (folder / "images.pt").is_file()):
        resumed = bool(timings.get("resumed_units") or timings.get("resumed_iterations"))
        return {"state": "done", "seconds": timings.get("total"), "method": cfg.get("method"),
                "refine_work": timings.get("refine_work") if resumed else None}
    settings = cfg.get("settings") or {}
    nc, ipc = int(cfg.get("num_classes") or 0), int(cfg.get("ipc") or 0)
    batch = int(settings.get("batch_size") or 0)
    iterations = int(settings.get("iterations") or (cfg.get("refine") or {}).get("iterations") or 0)
    partial = folder / "partial"
    digits = re.compile(r"^\d+\.pt$")
    cidd_done = sum(1 for q in (partial / "cidd").glob("*.pt") if digits.match(q.name))
    refine_dir = partial / "refine"
    finished = sorted(q for q in refine_dir.glob("*.pt") if digits.match(q.name))
    batches = len(refine_batches(nc, ipc, batch)) if batch else None
    secs, its = 0.0, 0
    for q in finished:
        unit = _load(q)
        secs += float(unit.get("seconds", 0.0))
        its += iterations
    in_flight = []
    for q in sorted(refine_dir.glob("*.state.pt")):
        state = _load(q)
        b = int(q.name.split(".")[0])
        recent = state.get("recent") or {}
        in_flight.append({"batch": b, "step": int(state["step"]), "iterations": int(state["iterations"]),
                          "seconds": float(state["seconds"]), "saved_unix": q.stat().st_mtime,
                          "recent_seconds_per_iteration": _rate(float(recent.get("seconds", 0.0)),
                                                                int(recent.get("iterations", 0)))})
        secs += float(state["seconds"])
        its += int(state["step"])
    per_it = _rate(secs, its)
    recents = [s["recent_seconds_per_iteration"] for s in in_flight if s["recent_seconds_per_iteration"]]
    recent = sum(recents) / len(recents) if recents else None
    left = None
    if per_it is not None and batches is not None:
        todo = batches * iterations - len(finished) * iterations - sum(s["step"] for s in in_flight)
        left = max(0, todo) * (recent if recent is not None else per_it)
    return {"state": "running", "cidd_done": cidd_done, "classes": nc, "batches_done": len(finished),
            "batches": batches, "iterations": iterations, "in_flight": in_flight,
            "seconds_per_iteration": per_it, "recent_seconds_per_iteration": recent,
            "refine_seconds_left": left, "method": cfg.get("method")}


def _teacher_state(path: Path) -> Optional[dict]:
    """The state a teacher training saved in ``path`` after an epoch, else None."""
    try:
        state = _load(path)
    except Exception:  # not a torch file, or not one of ours
        return None
    ok = isinstance(state, dict) and {"model", "epoch", "seconds"} <= state.keys() \
        and "arch" in (state.get("settings") or {})
    return state if ok else None


def teacher_progress(path: Path) -> dict:
    """An unfinished teacher training (its ``*.partial`` state): epochs done, pace, time left."""
    path = Path(path)
    state = _teacher_state(path)
    if state is None:
        raise UsageError(f"{path} is not the saved state of a teacher training")
    settings = state["settings"]
    epoch, epochs, secs = int(state["epoch"]), int(settings.get("epochs", 0)), float(state["seconds"])
    per_ep = _rate(secs, epoch)
    from nrrdd.teacher import PARTIAL_SUFFIX

    return {"path": str(path), "checkpoint": str(path)[:-len(PARTIAL_SUFFIX)], "arch": settings["arch"],
            "dataset": settings.get("dataset"), "epoch": epoch, "epochs": epochs, "seconds": secs,
            "seconds_per_epoch": per_ep, "saved_unix": path.stat().st_mtime,
            "seconds_left": None if per_ep is None else max(0, epochs - epoch) * per_ep}


def format_teacher_progress(t: dict, now: Optional[float] = None) -> str:
    """``t`` (from :func:`teacher_progress`) as two lines of text."""
    now = time.time() if now is None else now
    head = " · ".join(str(x) for x in (f"teacher {t['arch']}", t["dataset"]) if x is not None)
    text = f"  teacher   epoch {t['epoch']}/{t['epochs']} done"
    if t["seconds_per_epoch"] is not None:
        text += f" · {human_seconds(t['seconds_per_epoch'])}/epoch, ~{human_seconds(t['seconds_left'])} left"
    text += f" (saved {human_seconds(now - t['saved_unix'])} ago)"
    return f"{t['checkpoint']}  ({head}; training)\n{text}"


def labels_progress(folder: Path) -> List[dict]:
    """One entry per ``labels_<mode>/`` folder: epochs done of epochs, complete, seconds."""
    out = []
    for m in sorted(folder.glob("labels_*/manifest.json")):
        man = _json(m)
        if man is None:
            continue
        out.append({"mode": man.get("mode", m.parent.name[len("labels_"):]),
                    "epochs_done": int(man.get("epochs_done", 0)), "epochs": int(man.get("epochs", 0)),
                    "complete": bool(man.get("complete")), "seconds": float(man.get("seconds", 0.0))})
    return out


def students_progress(folder: Path) -> dict:
    """Finished evaluations (``eval_*.json``) and the ones under way (``.eval_*/``)."""
    done = []
    for f in sorted(folder.glob("eval_*.json")):
        ev = _json(f)
        if ev is None:
            continue
        done.append({"name": f.stem, "labels": ev.get("labels"), "student": ev.get("student"),
                     "split": ev.get("eval_split", "test"), "n": len(ev.get("top1", [])),
                     "mean": ev.get("top1_mean"), "std": ev.get("top1_std")})
    running = []
    for work in sorted(q for q in folder.glob(".eval_*") if q.is_dir()):
        seeds = {}
        for f in work.glob("seed*.json"):
            rec = _json(f)
            if rec is not None and "top1" in rec:
                seeds[int(f.stem[4:])] = float(rec["top1"])
        training = []
        for f in sorted(work.glob("seed*.pt")):
            state = _load(f)
            epoch, secs = int(state["epoch"]), float(state["seconds"])
            epochs = int((state.get("settings") or {}).get("epochs", 0))
            per_ep = _rate(secs, epoch)
            training.append({"seed": int(f.stem[4:]), "epoch": epoch, "epochs": epochs, "seconds": secs,
                             "seconds_per_epoch": per_ep, "saved_unix": f.stat().st_mtime,
                             "seconds_left": None if per_ep is None else max(0, epochs - epoch) * per_ep})
        running.append({"name": work.name[1:], "finished": {k: seeds[k] for k in sorted(seeds)},
                        "training": training})
    return {"done": done, "running": running}


def last_write(root: Path) -> Optional[float]:
    """The newest modification time of any file under ``root``."""
    times = [q.stat().st_mtime for q in root.rglob("*") if q.is_file()]
    return max(times) if times else None


def run_root(distilled: Path) -> Path:
    """The ``nrrdd run`` output a distilled folder belongs to (``OUT/distilled`` -> ``OUT``),
    else the folder itself."""
    return distilled.parent if distilled.name == "distilled" else distilled


def method_label(cfg: dict) -> Optional[str]:
    """The method of a distilled set's config, with what differs from its defaults:
    ``nrr (no L_lr, ε 0.9)``."""
    method = cfg.get("method")
    settings = cfg.get("settings") or {}
    if method is None or not settings.get("iterations"):
        return method
    extra = []
    if settings.get("label_refine") is False or settings.get("alpha_lr") == 0:
        extra.append("no L_lr")
    if settings.get("mask") == "cam" and settings.get("cam_eps") not in (None, 0.5):
        extra.append(f"ε {settings['cam_eps']:g}")
    return f"{method} ({', '.join(extra)})" if extra else method


def progress(distilled: Path) -> dict:
    """Everything above for one distilled folder, plus the run it belongs to."""
    distilled = Path(distilled)
    root = run_root(distilled)
    cfg = _config(distilled) or {}
    run = _json(root / "run.json")
    return {"path": str(root), "distilled": str(distilled), "dataset": cfg.get("dataset"),
            "method": method_label(cfg), "ipc": cfg.get("ipc"), "seed": cfg.get("seed"),
            "holdout_per_class": cfg.get("holdout_per_class") or 0,
            "run_done": run is not None, "distill": distill_progress(distilled),
            "labels": labels_progress(distilled), "students": students_progress(distilled),
            "last_write_unix": last_write(root)}


def human_seconds(s: Optional[float]) -> str:
    if s is None:
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def format_progress(p: dict, now: Optional[float] = None) -> str:
    """``p`` (from :func:`progress`) as a few lines of text."""
    now = time.time() if now is None else now
    head = " · ".join(str(x) for x in (p["method"], f"IPC {p['ipc']}", f"seed {p['seed']}", p["dataset"])
                      if x is not None)
    if p["holdout_per_class"]:
        head += f" · scored on {p['holdout_per_class']} held-out images per class"
    state = "finished" if p["run_done"] else ("distilled" if p["distill"]["state"] == "done" else "distilling")
    lines = [f"{p['path']}  ({head}; {state})"]
    d = p["distill"]
    if d["state"] == "done":
        text = "  distill   done" + (f" in {human_seconds(d['seconds'])}" if d["seconds"] is not None else "")
        if d.get("refine_work") is not None:  # resumed: the last process's time, and the whole refinement
            text += f" (resumed; refinement {human_seconds(d['refine_work'])} in all)"
        lines.append(text)
    else:
        text = f"  distill   CIDD {d['cidd_done']}/{d['classes']} classes · NRR {d['batches_done']}/" \
               f"{d['batches'] if d['batches'] is not None else '?'} batches"
        for s in d["in_flight"]:
            text += f"; batch {s['batch'] + 1} at iteration {s['step']}/{s['iterations']} " \
                    f"(saved {human_seconds(now - s['saved_unix'])} ago)"
        if d["recent_seconds_per_iteration"] is not None:
            text += f" · {d['recent_seconds_per_iteration']:.2f} s/iteration before the last save " \
                    f"({d['seconds_per_iteration']:.2f} on average), " \
                    f"~{human_seconds(d['refine_seconds_left'])} of refinement left at the recent pace"
        elif d["seconds_per_iteration"] is not None:
            text += f" · {d['seconds_per_iteration']:.2f} s/iteration, " \
                    f"~{human_seconds(d['refine_seconds_left'])} of refinement left at that pace"
        lines.append(text)
    for lab in p["labels"]:
        what = "done" if lab["complete"] else "under way"
        lines.append(f"  labels    {lab['mode']}: {lab['epochs_done']}/{lab['epochs']} epochs ({what}, "
                     f"{human_seconds(lab['seconds'])})")
    for ev in p["students"]["done"]:
        split = "" if ev["split"] == "test" else f" [{ev['split']}]"
        lines.append(f"  students  {ev['name']}: {ev['mean']:.2f} ± {ev['std']:.2f} (n={ev['n']}){split}")
    for ev in p["students"]["running"]:
        fin = ", ".join(f"seed {k} {v:.2f}" for k, v in ev["finished"].items())
        text = f"  students  {ev['name']}: {len(ev['finished'])} finished" + (f" ({fin})" if fin else "")
        for t in ev["training"]:
            text += f"; seed {t['seed']} at epoch {t['epoch']}/{t['epochs']}"
            if t["seconds_per_epoch"] is not None:
                text += f" ({t['seconds_per_epoch']:.1f} s/epoch, ~{human_seconds(t['seconds_left'])} left)"
        lines.append(text)
    if p["last_write_unix"] is not None:
        lines.append(f"  last write {human_seconds(now - p['last_write_unix'])} ago")
    return "\n".join(lines)
