"""The distillation run: CIDD for every class, then NRR on batches, with resume.

``distill(settings)`` writes into ``settings.out``:

- ``images.pt``: float32 (N, C, H, W) in the teacher's normalised space,
  class-major (the IPC images of class 0, then class 1, ...);
- ``labels.pt``: int64 (N,);
- ``config.json``: every setting, the seed, package versions, the teacher's
  path and accuracy, the time each stage took;
- ``images/<class>/<i>.png``, ``grid.png``, ``masks.png`` (see ``nrrdd.images``);
- ``patches.pt``: where each image's factor^2 patches came from, aligned with
  ``images.pt``: ``source`` (N, beta) int64, the index of the patch's real image
  in the dataset's training split; ``box`` (N, beta, 4) its crop (x0, y0, w, h)
  in pixels of that image as loaded (``image_size``); ``confidence`` (N, beta) the teacher's p(y | patch);
  patch k of an image fills cell (k // factor, k % factor) of its grid;
- ``log.jsonl``: the loss terms of each logged refinement iteration
  (``batch``, ``iteration``, ``ce``, ``bn``, ``lr``, ``total``, ``lr_rate``);
- ``timings.json``: seconds per stage of this process (load, cidd, refine, write,
  total), what a resume reused (``resumed_units``, ``resumed_iterations``), and
  ``refine_work``: the refinement seconds of every batch, whichever process (or
  resumed process) ran it, summed: a resumed run's whole refinement time.

Work units and resume. CIDD runs per class (seeded from (seed, class)), each
class's result saved atomically to ``partial/cidd/<class>.pt``. Refinement
batches take the images slot-major across classes (slot 0 of every class,
then slot 1, ...; ``batch_size`` per batch), so each batch mixes classes as the
BN-statistic loss, matched to whole-dataset running statistics, wants (SRe2L's
layout); batch b is seeded from (seed, b) and saved atomically to
``partial/refine/<b>.pt`` with its log lines. A batch under refinement also
saves its state (images, Adam moments, step, log) to ``partial/refine/<b>.state.pt``
every ``checkpoint_every_s`` seconds (120), so a long batch (a big teacher on a
CPU) loses at most that much. ``resume=True`` reuses every finished unit and
continues an interrupted batch from its state, so an interrupted run resumed
gives the same images as an uninterrupted one. After the final files are
written, ``partial/`` is removed.

Several ranks (``torchrun``, :mod:`nrrdd.distributed`): rank 0 alone decides
what to do with the output folder and lists the units still to do; the ranks
split them round-robin (CIDD classes, then refinement batches), each saving its
finished units to ``partial/`` as above, with a barrier after each stage. Every
unit's random draws come from (seed, class) or (seed, batch) only, and a batch
reads just its own images from the CIDD files, so the images are the same
whatever the number of ranks. Rank 0 then reads the partial files and writes
the outputs. The output folder must be one folder every rank sees.

Bad input raises :class:`nrrdd.errors.UsageError` before anything in the
output folder is touched.
"""
from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from nrrdd import distributed as D
from nrrdd import storage
from nrrdd.cidd import CROP_SCALE, SELECT_MODES, cidd_class, factor_cells, generator_for, pool_size
from nrrdd.errors import UsageError
from nrrdd.refine import MASK_MODES, RefineConfig, Refiner, fast_config

OUTPUT_NAMES = ("images.pt", "labels.pt", "patches.pt", "config.json", "images", "grid.png", "masks.png",
                "log.jsonl", "timings.json", "partial")
CONFIG_FORMAT = "nrrdd-distill-v1"
# Settings that do not change the images: a resume may differ in these.
NOT_RUN_KEYS = ("out", "device", "quiet", "cuda_graph")


@dataclass
class DistillSettings:
    dataset: str
    teacher: str
    ipc: int
    out: str
    data_dir: Optional[str] = None
    image_size: Optional[int] = None
    teacher_arch: Optional[str] = None     # only for a plain state-dict teacher
    iterations: int = 2000
    factor: int = 2
    mipc: Optional[int] = 300              # None: every image of the class
    num_crop: int = 5
    top_t: int = 1
    crop_min_scale: float = CROP_SCALE[0]  # area fraction of CIDD's random resized crops
    crop_max_scale: float = CROP_SCALE[1]
    select: str = "lowest"
    mask: str = "cam"
    label_refine: bool = True
    batch_size: int = 100
    seed: int = 0
    device: str = "cpu"
    cuda_graph: bool = False
    fast: Optional[bool] = None            # the fast refine path; None: on for CUDA, off on the CPU
    holdout_per_class: int = 0             # training images per class kept out (nrrdd.data.holdout_split)
    lr: float = 0.05
    cam_eps: float = 0.5
    r: float = 0.4
    alpha_lr: float = 1.0
    alpha_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    log_every: int = 100
    method: Optional[str] = None           # a label for reports; derived when None
    quiet: bool = False

    def fast_on(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.fast is None else bool(self.fast)

    def refine_config(self, device: torch.device | str = "cpu") -> RefineConfig:
        """The refinement settings; with the fast path (``fast_on``) as
        :func:`nrrdd.refine.fast_config` sets it for ``device``."""
        device = torch.device(device)
        cfg = RefineConfig(iterations=max(1, self.iterations), lr=self.lr, cam_eps=self.cam_eps,
                           r=self.r, alpha_lr=self.alpha_lr, alpha_bn=self.alpha_bn,
                           first_bn_multiplier=self.first_bn_multiplier, mask=self.mask,
                           label_refine=self.label_refine, cuda_graph=self.cuda_graph,
                           log_every=self.log_every)
        return fast_config(cfg, device) if self.fast_on(device) else cfg

    def derived_method(self) -> str:
        if self.method:
            return self.method
        if self.iterations == 0:
            return {"lowest": "cidd", "highest": "rded", "random": "cidd-random"}[self.select]
        return "nrr" if self.mask == "cam" else "sre2l"


@dataclass
class DistillResult:
    out: Path
    images: Optional[torch.Tensor]  # None on ranks other than 0 (nrrdd.distributed)
    labels: torch.Tensor
    timings: Dict[str, float] = field(default_factory=dict)
    resumed_units: int = 0


# --------------------------------------------------------------- validation
@dataclass
class _Plan:
    settings: DistillSettings
    dataset: Any
    teacher: torch.nn.Module
    meta: Dict[str, Any]
    device: torch.device
    run: Dict[str, Any]
    fast_info: Dict[str, Any] = field(default_factory=dict)


def check_crop_scale(lo: float, hi: float) -> None:
    """--crop-scale MIN MAX: area fractions with 0 < MIN <= MAX <= 1."""
    if not 0 < lo <= hi <= 1:
        raise UsageError(f"--crop-scale takes 0 < MIN <= MAX <= 1, got {lo:g} {hi:g}")


def _check_numbers(s: DistillSettings) -> None:
    positive = {"--ipc": s.ipc, "--factor": s.factor, "--num-crop": s.num_crop,
                "--top-t": s.top_t, "--batch-size": s.batch_size, "--log-every": s.log_every}
    for flag, v in positive.items():
        if int(v) < 1:
            raise UsageError(f"{flag} must be at least 1, got {v}")
    if s.iterations < 0:
        raise UsageError(f"--iterations must be >= 0, got {s.iterations}")
    if s.holdout_per_class < 0:
        raise UsageError(f"--holdout-per-class must be >= 0, got {s.holdout_per_class}")
    if s.mipc is not None and s.mipc < 1:
        raise UsageError(f"--mipc must be at least 1 (or 'all'), got {s.mipc}")
    check_crop_scale(s.crop_min_scale, s.crop_max_scale)
    if s.select not in SELECT_MODES:
        raise UsageError(f"--select must be one of {', '.join(SELECT_MODES)}, got {s.select!r}")
    if s.mask not in MASK_MODES:
        raise UsageError(f"--mask must be one of {', '.join(MASK_MODES)}, got {s.mask!r}")
    for flag, v in (("--lr", s.lr), ("--cam-eps", s.cam_eps), ("--r", s.r),
                    ("--alpha-lr", s.alpha_lr), ("--alpha-bn", s.alpha_bn),
                    ("--first-bn-multiplier", s.first_bn_multiplier)):
        if not (v >= 0 and v != float("inf")):
            raise UsageError(f"{flag} must be a finite number >= 0, got {v}")


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return dev


def plan(s: DistillSettings) -> _Plan:
    """Every check that can fail on the user's input, before any write."""
    from nrrdd.data import DATASETS, holdout_split, load_split
    from nrrdd.models import check_cam_shapes
    from nrrdd.teacher import load_teacher

    _check_numbers(s)
    if s.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {s.dataset!r} (choose from {', '.join(DATASETS)})")
    device = _device(s.device)
    if s.cuda_graph and device.type != "cuda":
        raise UsageError("--cuda-graph needs --device cuda")
    # The data folder first: a missing folder is the most common mistake.
    if s.data_dir is not None and not Path(s.data_dir).is_dir():
        raise UsageError(f"data folder {s.data_dir} does not exist")
    plain = {}
    if s.teacher_arch is not None:
        plain["arch"] = s.teacher_arch
    probe = None
    try:
        model, meta = load_teacher(s.teacher, "cpu", **plain)
    except UsageError as e:
        if "plain state dict" not in str(e):
            raise
        if s.teacher_arch is None:
            raise UsageError(f"{s.teacher} is a plain state dict: name its arch with --teacher-arch") from None
        # A plain state dict: its class count, channels and size come from the data.
        probe = load_split(s.dataset, s.data_dir, "train", s.image_size)
        model, meta = load_teacher(s.teacher, "cpu", arch=s.teacher_arch, num_classes=probe.num_classes,
                                   in_channels=probe.in_channels, image_size=probe.image_size)
    if meta.get("dataset") and meta["dataset"] != s.dataset:
        raise UsageError(f"teacher {s.teacher} was trained on {meta['dataset']}, not {s.dataset}")
    if s.image_size is not None and meta.get("image_size") and int(meta["image_size"]) != s.image_size:
        raise UsageError(f"teacher {s.teacher} takes {meta['image_size']} px images, "
                         f"--image-size is {s.image_size}")
    size = s.image_size or meta.get("image_size")
    ds = probe if probe is not None else load_split(s.dataset, s.data_dir, "train", size)
    if s.holdout_per_class:
        ds = holdout_split(ds, s.holdout_per_class)[0]
    if int(meta["num_classes"]) != ds.num_classes:
        raise UsageError(f"teacher {s.teacher} ({meta['arch']}) has {meta['num_classes']} classes, "
                         f"{s.dataset} has {ds.num_classes}")
    if int(meta["in_channels"]) != ds.in_channels:
        raise UsageError(f"teacher {s.teacher} takes {meta['in_channels']}-channel images, "
                         f"{s.dataset} has {ds.in_channels}")
    if int(meta["image_size"]) != ds.image_size:
        raise UsageError(f"teacher {s.teacher} takes {meta['image_size']} px images, the data is "
                         f"{ds.image_size} px")
    if meta.get("mean") and meta.get("std"):
        if len(meta["mean"]) != ds.in_channels:
            raise UsageError(f"teacher {s.teacher}'s normalisation has {len(meta['mean'])} channels")
        ds.mean, ds.std = tuple(meta["mean"]), tuple(meta["std"])
    counts = ds.class_counts()
    smallest, c_small = int(counts.min()), int(counts.argmin())
    if s.ipc > smallest:
        raise UsageError(f"--ipc {s.ipc} is larger than the {smallest} images of class "
                         f"{c_small} ({ds.classes[c_small]})")
    need = s.ipc * s.factor ** 2
    have = pool_size(smallest, s.mipc, s.top_t, s.num_crop)
    if have < need:
        raise UsageError(f"CIDD needs {need} patches per class (ipc x factor^2) but class {c_small} "
                         f"pools only {have}: raise --mipc/--top-t or lower --factor/--ipc")
    if factor_cells(ds.image_size, s.factor) < 1:
        raise UsageError(f"--factor {s.factor} leaves no pixel per patch on {ds.image_size} px images")
    try:
        check_cam_shapes(model, ds.in_channels, ds.image_size)
    except RuntimeError as e:
        raise UsageError(f"teacher {s.teacher} cannot run on {ds.image_size} px images: {e}") from None
    run = {k: v for k, v in asdict(s).items() if k not in NOT_RUN_KEYS}
    run.update(teacher=meta["path"], teacher_sha256=meta["sha256"], image_size=ds.image_size,
               fast=s.fast_on(device),
               data_dir=None if s.data_dir is None else str(Path(s.data_dir).resolve()))
    return _Plan(s, ds, model.to(device), meta, device, run)


# ------------------------------------------------------------ output folder
def _read_config(out: Path) -> Optional[dict]:
    try:
        return json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _prepare_out(p: _Plan, resume: bool, force: bool) -> Optional[dict]:
    """Decide what to do with the output folder; returns the old config when
    resuming. Raises UsageError (touching nothing) when it holds another run."""
    out = Path(p.settings.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    old = _read_config(out)
    if force:
        for name in OUTPUT_NAMES:
            t = out / name
            if t.is_dir():
                shutil.rmtree(t)
            elif t.exists():
                t.unlink()
        return None
    if not resume:
        what = "a run" if old is not None else "other files"
        raise UsageError(f"{out} already holds {what}; pass --resume to continue it or --force "
                         "to overwrite it")
    if old is None or old.get("format") != CONFIG_FORMAT:
        raise UsageError(f"{out} holds no nrrdd distill run to resume (no valid config.json); "
                         "pass --force to overwrite it")
    old_run = dict(old.get("run") or {})
    new_run = dict(p.run)
    if "teacher_sha256" not in old_run:  # a run from before the fingerprint was kept
        new_run.pop("teacher_sha256")
    elif old_run["teacher_sha256"] != new_run["teacher_sha256"]:
        raise UsageError(f"{out} was begun with other teacher weights than {p.meta['path']} holds now "
                         "(retrained or replaced?): pass the teacher it was begun with, or --force "
                         "to start over")
    if old_run != new_run:
        diff = sorted(k for k in set(old_run) | set(new_run) if old_run.get(k) != new_run.get(k))
        raise UsageError(f"{out} holds a different run (settings differ: {', '.join(diff)}); "
                         "pass --force to overwrite it")
    return old


def _versions() -> Dict[str, str]:
    import nrrdd
    import torchvision

    v = {"nrrdd": nrrdd.__version__, "torch": torch.__version__,
         "torchvision": torchvision.__version__, "python": platform.python_version()}
    try:
        import nrrdd_ext

        v["nrrdd_ext"] = nrrdd_ext.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        import timm

        v["timm"] = timm.__version__
    except Exception:  # pragma: no cover
        pass
    return v


def _config(p: _Plan, status: str, timings: Dict[str, float], started: float) -> dict:
    s, ds, meta = p.settings, p.dataset, p.meta
    from nrrdd.teacher import teacher_record

    return {
        "format": CONFIG_FORMAT, "status": status, "run": p.run,
        "settings": {**asdict(s), "out": str(Path(s.out).resolve())},
        "method": s.derived_method(), "dataset": s.dataset, "data_dir": p.run["data_dir"],
        "ipc": s.ipc, "num_classes": ds.num_classes, "classes": ds.classes,
        "holdout_per_class": s.holdout_per_class,
        "in_channels": ds.in_channels, "image_size": ds.image_size, "factor": s.factor,
        "mean": list(ds.mean), "std": list(ds.std), "seed": s.seed,
        "teacher": {**teacher_record(meta), "num_classes": meta["num_classes"]},
        "teacher_path": meta["path"], "refine": s.refine_config(p.device).as_dict(),
        "fast_path": p.fast_info if p.run.get("fast") else None,
        "versions": _versions(), "device": str(p.device), "command": sys.argv,
        "world_size": D.world(),
        "started_unix": started, "timings": timings,
    }


# --------------------------------------------------------------------- run
def _load_initial(cidd_dir: Path, ipc: int, idx: torch.Tensor) -> torch.Tensor:
    """The CIDD images of flat (class-major) indices ``idx``, read from the
    per-class files (memory-mapped: only the rows asked for are read)."""
    cls, slot = idx // ipc, idx % ipc
    out: Optional[torch.Tensor] = None
    for c in cls.unique().tolist():
        f = cidd_dir / f"{c:05d}.pt"
        try:
            images = torch.load(f, mmap=True)["images"]
        except Exception as e:
            raise RuntimeError(f"cannot read {f} ({e}): delete it and rerun with --resume") from e
        if out is None:
            out = images.new_empty((idx.numel(), *images.shape[1:]))
        sel = cls == c
        out[sel] = images[slot[sel]]
    return out


def _patch_provenance(cidd_dir: Path, ds, nc: int, ipc: int, beta: int) -> Dict[str, torch.Tensor]:
    """``patches.pt`` (module docstring) from the per-class CIDD units."""
    parts: Dict[str, List[torch.Tensor]] = {"source": [], "box": [], "confidence": []}
    for c in range(nc):
        unit = torch.load(cidd_dir / f"{c:05d}.pt")
        parts["source"].append(ds.split_index(unit["patch_source"]).view(ipc, beta))
        parts["box"].append(unit["patch_box"].to(torch.int64).view(ipc, beta, 4))
        parts["confidence"].append(unit["patch_confidence"].float().view(ipc, beta))
    return {k: torch.cat(v) for k, v in parts.items()}


def refine_batches(num_classes: int, ipc: int, batch_size: int) -> List[torch.Tensor]:
    """Flat (class-major) image indices of each refinement batch: slot-major
    across classes, ``batch_size`` per batch."""
    order = torch.arange(num_classes * ipc).view(num_classes, ipc).t().reshape(-1)
    return list(order.split(batch_size))


def distill(settings: DistillSettings, *, resume: bool = False, force: bool = False,
            on_unit: Optional[Callable[[str, int], None]] = None, checkpoint_every_s: float = 120.0,
            log=print) -> DistillResult:
    """Run CIDD + NRR as the module docstring says. ``on_unit(stage, index)`` is
    called after each finished, saved unit ('cidd', class) / ('refine', batch), and
    after each saved mid-batch state ('refine_state', batch; every
    ``checkpoint_every_s`` seconds of a batch's refinement)."""
    from tqdm import tqdm

    from nrrdd import images as png
    from nrrdd.teacher import progress_enabled

    t0 = time.perf_counter()
    p = plan(settings)
    s, ds, device = p.settings, p.dataset, p.device
    out = Path(s.out)
    timings: Dict[str, float] = {"load": time.perf_counter() - t0}
    show = progress_enabled(s.quiet) and D.is_main()

    def open_out():  # rank 0 only: the folder's fate, decided once
        old = _prepare_out(p, resume, force)
        started = old.get("started_unix", time.time()) if old else time.time()
        finished = old is not None and old.get("status") == "done" and (out / "images.pt").is_file()
        if not finished:
            storage.write_json(_config(p, "running", timings, started), out / "config.json")
        return old, started, finished

    old, started, finished = D.on_main(open_out)
    if finished:
        if not s.quiet and D.is_main():
            log(f"{out} already holds this finished run; nothing to do")
        return DistillResult(out, torch.load(out / "images.pt") if D.is_main() else None,
                             torch.load(out / "labels.pt"), old.get("timings", {}), resumed_units=-1)
    resumed = 0
    resumed_iterations = 0  # refinement iterations of interrupted batches taken from their saved state

    # ---- CIDD, one class at a time
    t = time.perf_counter()
    nc, ipc = ds.num_classes, s.ipc
    cidd_dir = out / "partial" / "cidd"
    todo = D.on_main(lambda: [c for c in range(nc) if not (cidd_dir / f"{c:05d}.pt").is_file()])
    resumed += nc - len(todo)
    for c in tqdm(D.shard(todo), desc="CIDD", unit="class", disable=not show):
        r = cidd_class(p.teacher, ds, c, ipc, s.seed, device, mipc=s.mipc, factor=s.factor,
                       num_crop=s.num_crop, top_t=s.top_t, select=s.select, batch_size=s.batch_size,
                       crop_scale=(s.crop_min_scale, s.crop_max_scale))
        unit = {"images": r.images.cpu(), "patch_confidence": r.patch_confidence.cpu(),
                "patch_source": r.patch_source, "patch_box": r.patch_box}
        storage.save_torch(unit, cidd_dir / f"{c:05d}.pt")
        if on_unit:
            on_unit("cidd", c)
    D.barrier()
    labels = torch.arange(nc).repeat_interleave(ipc)
    timings["cidd"] = time.perf_counter() - t

    # ---- NRR, one batch at a time
    t = time.perf_counter()
    lo, hi = ds.pixel_bounds(device)
    refiner = Refiner(p.teacher, s.refine_config(device), lo, hi,
                      input_shape=(ds.in_channels, ds.image_size, ds.image_size))
    p.fast_info = refiner.fast_info
    if refiner.fast_info.get("fold_bn") and D.is_main() and not s.quiet:
        fold = refiner.fast_info["fold_bn"]
        log("fast path: " + (f"fold refused ({fold['error']})" if "error" in fold else
                             f"{len(fold['folded'])} of {len(fold['folded']) + len(fold['kept'])} "
                             "BatchNorm layers folded into their convs")
            + (", bf16 autocast, channels_last" if refiner.config.bf16 else "")
            + (", CUDA graph" if refiner.config.cuda_graph else ""))
    refine_dir = out / "partial" / "refine"
    batches = refine_batches(nc, ipc, s.batch_size)
    todo = D.on_main(lambda: [b for b in range(len(batches)) if not (refine_dir / f"{b:05d}.pt").is_file()])
    resumed += len(batches) - len(todo)
    for b in tqdm(D.shard(todo), desc="NRR", unit="batch", disable=not show):
        idx = batches[b]
        xb, yb = _load_initial(cidd_dir, ipc, idx).to(device), labels[idx].to(device)
        state_file = refine_dir / f"{b:05d}.state.pt"
        state = torch.load(state_file) if resume and state_file.is_file() else None
        lines: List[dict] = [{"batch": b, **rec} for rec in state["log"]] if state else []
        if state:
            resumed_iterations += int(state["step"])

        def save_state(snap: dict, b: int = b, state_file: Path = state_file) -> None:
            storage.save_torch(snap, state_file)
            if on_unit:
                on_unit("refine_state", b)

        if s.iterations > 0:
            res = refiner.refine(xb, yb, generator_for(s.seed, "refine", b), progress=show,
                                 desc=f"batch {b + 1}/{len(batches)}",
                                 on_log=lambda rec: lines.append({"batch": b, **rec}),
                                 resume=state, on_checkpoint=save_state,
                                 checkpoint_every_s=checkpoint_every_s)
            xr, mb, secs = res.images, res.masks, res.seconds
        else:
            with refiner:
                xr, mb, secs = xb, refiner.masks(xb, yb), 0.0
        unit = {"indices": idx, "images": xr.cpu(), "masks": mb.to(torch.float16).cpu(),
                "log": lines, "seconds": secs}
        storage.save_torch(unit, refine_dir / f"{b:05d}.pt")
        state_file.unlink(missing_ok=True)
        if on_unit:
            on_unit("refine", b)
    D.barrier()
    timings["refine"] = time.perf_counter() - t
    if not D.is_main():  # rank 0 writes the outputs; the others wait for them
        D.barrier()
        return DistillResult(out, None, labels, timings, resumed)

    # ---- outputs (rank 0)
    t = time.perf_counter()
    log_lines = []
    final: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None
    refine_work = 0.0
    for b in range(len(batches)):
        unit = torch.load(refine_dir / f"{b:05d}.pt")
        refine_work += float(unit.get("seconds", 0.0))
        if final is None:
            final = unit["images"].new_empty((nc * ipc, *unit["images"].shape[1:]))
            masks = torch.zeros(nc * ipc, 1, *unit["images"].shape[2:])
        final[unit["indices"]] = unit["images"]
        masks[unit["indices"]] = unit["masks"].float()
        log_lines += unit["log"]
    storage.write_bytes("".join(json.dumps(r, sort_keys=True) + "\n" for r in log_lines).encode(),
                        out / "log.jsonl")
    if (out / "images").exists():
        shutil.rmtree(out / "images")
    png.save_image_files(final, labels, ds.classes, ds.mean, ds.std, out / "images")
    png.save_grid(final, labels, nc, ds.mean, ds.std, out / "grid.png")
    png.save_mask_grid(final, masks, labels, nc, ds.mean, ds.std, s.cam_eps, out / "masks.png")
    storage.save_torch(_patch_provenance(cidd_dir, ds, nc, ipc, s.factor ** 2), out / "patches.pt")
    storage.save_torch(labels, out / "labels.pt")
    storage.save_torch(final.contiguous(), out / "images.pt")
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    timings["resumed_units"] = resumed
    timings["resumed_iterations"] = resumed_iterations
    timings["refine_work"] = refine_work
    storage.write_json(timings, out / "timings.json")
    storage.write_json(_config(p, "done", timings, started), out / "config.json")
    shutil.rmtree(out / "partial", ignore_errors=True)
    D.barrier()
    return DistillResult(out, final, labels, timings, resumed)
