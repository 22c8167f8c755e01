"""Student evaluation: train a fresh network on the distilled set, report real test top-1.

Protocol (paper Appendix A.2, RDED's validation code): AdamW (lr 1e-3, weight
decay 0.01 on the weight matrices/kernels only, as RDED's ``get_parameters``),
a cosine schedule per epoch lr_e = lr · ½(1 + cos(π e / E)) (RDED's code uses
the half period ½(1 + cos(π e / 2E)); the appendix says cosine), batch 100, 300
epochs, and the replayed augmentation of ``nrrdd.augment`` — exactly the x_mix the
relabel step labelled. The student starts from scratch (``build_model``; its arch
may differ from the teacher's, Table 3) with its own init seed per run, and is
scored once, after the LAST epoch, on the real test set (never the best epoch:
that would select on the test set).

The loss per label mode, on the student's logits s = S(x_mix):

- ``dbr`` (Eq. 10): ``nrrdd_ext.dbr_loss(s, y_org, y_aug, d_org^T, d_aug^T, r=0.4, α=1)``
  = max(0, d_org - r) + max(0, d_aug - r) + α(|d_org - d_org^T| + |d_aug - d_aug^T|),
  d = CE(s, y) (Eq. 8);
- ``soft`` (SRe2L/RDED): KL(softmax(t/τ) ‖ softmax(s/τ)), ``batchmean``, no τ²
  factor, τ = 20 with CutMix and 4 with Mixup (RDED's ``argument.py``);
- ``compact``: the same KL against the top-2 distribution
  (``nrrdd.labels.compact_distribution``; τ was applied when it was stored);
- ``onehot``: λ·CE(s, y_org) + (1 - λ)·CE(s, y_aug), λ the mix weight.

With ``online`` the teacher runs on each x_mix during training (RDED's way) and
nothing is stored; its numbers are rounded to the stored dtypes, so an online run
trains on bit-identical targets to a stored one.

Several ranks (``torchrun``, :mod:`nrrdd.distributed`): DistributedDataParallel
over the same global batches and schedule as one process. Every rank replays
the whole global batch (the replay is a pure function of (seed, epoch, batch);
CutMix needs the partner images anyway) and trains on its contiguous slice of
it; its loss, the mean over the slice, is scaled by world × slice / batch, so
DDP's gradient average is the gradient of the global batch mean. BatchNorm
layers are synchronised (statistics over the global batch), so the gradients
are the single-process ones up to floating-point rounding (layers other than
plain BatchNorm, e.g. dropout, draw per rank). Rank 0 writes the checkpoints
and the json and scores the test set; the others receive its top-1.
"""
from __future__ import annotations

import math
import shutil
import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import nrrdd
from nrrdd import distributed as D
from nrrdd import labels as L
from nrrdd import storage
from nrrdd.augment import AugmentConfig, MixedBatch, derive_seed, num_batches, replay_epoch
from nrrdd.distilled_set import DistilledSet

DBR_R = 0.4  # the hinge margin r of Eqs. 9-10
DBR_ALPHA = 1.0  # the weight α_dbr of the distance-matching term
LR = 1e-3
WEIGHT_DECAY = 0.01
EPOCHS = 300


def student_loss(mode: str, logits: torch.Tensor, mb: MixedBatch, targets: Dict[str, torch.Tensor],
                 temperature: float, dbr_r: float = DBR_R) -> torch.Tensor:
    """The training loss of one batch for label ``mode`` (module docstring)."""
    if mode == "dbr":
        import nrrdd_ext

        d = targets["d"].float()
        return nrrdd_ext.dbr_loss(logits, mb.y_org, mb.y_aug, d[:, 0].contiguous(),
                                  d[:, 1].contiguous(), r=dbr_r, alpha=DBR_ALPHA)
    if mode == "soft":
        q = torch.softmax(targets["logits"].float() / temperature, dim=1)
        return F.kl_div(F.log_softmax(logits / temperature, dim=1), q, reduction="batchmean")
    if mode == "compact":
        q = L.compact_distribution(targets["prob"], targets["cls"], logits.shape[1])
        return F.kl_div(F.log_softmax(logits / temperature, dim=1), q, reduction="batchmean")
    if mode == "onehot":
        return (mb.lam * F.cross_entropy(logits, mb.y_org)
                + (1.0 - mb.lam) * F.cross_entropy(logits, mb.y_aug))
    raise ValueError(f"unknown label mode {mode!r}")


class StoredLabels:
    """Targets read from ``labels_<mode>/``, one epoch shard in memory at a time."""

    def __init__(self, store: L.LabelStore, manifest: dict, device: torch.device | str):
        self.store, self.manifest, self.device = store, manifest, device
        self.fields = [L.Field(**f) for f in manifest["fields"]]
        self._epoch: Optional[int] = None
        self._arrays: Dict[str, torch.Tensor] = {}

    def __call__(self, mb: MixedBatch) -> Dict[str, torch.Tensor]:
        if self._epoch != mb.epoch:
            arrays = self.store.read_epoch(mb.epoch, self.manifest["num_images"], self.fields)
            self._arrays = {k: v.to(self.device) for k, v in arrays.items()}
            self._epoch = mb.epoch
        idx = mb.indices.to(self.device)
        return {k: v[idx] for k, v in self._arrays.items()}


class OnlineLabels:
    """Targets computed by the teacher on each x_mix as training runs (nothing stored)."""

    def __init__(self, teacher: nn.Module, mode: str, temperature: float):
        self.teacher, self.mode, self.temperature = teacher.eval(), mode, temperature

    @torch.no_grad()
    def __call__(self, mb: MixedBatch) -> Dict[str, torch.Tensor]:
        return L.teacher_targets(self.mode, self.teacher(mb.x), mb.y_org, mb.y_aug, self.temperature)


def no_labels(mb: MixedBatch) -> Dict[str, torch.Tensor]:
    """One-hot mode: the hard labels and λ travel in the batch itself."""
    return {}


def parameter_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Weight decay on weight matrices/kernels only; biases and norm parameters get none (RDED)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if ("weight" in name and p.dim() > 1) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_factor(epoch: int, epochs: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@torch.no_grad()
def test_top1(model: nn.Module, test_set, mean: Sequence[float], std: Sequence[float],
              device: torch.device | str, batch_size: int = 500) -> float:
    """Top-1 (percent) on the real test split, normalised with the distilled set's mean/std."""
    from nrrdd.data import normalize

    model.eval()
    correct = 0
    for x, y in test_set.batches(batch_size, device, normalized=False):
        correct += int((model(normalize(x, mean, std)).argmax(1) == y).sum())
    return 100.0 * correct / max(1, len(test_set))


@dataclass
class StudentRun:
    """One student: its result and how long it took."""

    student_seed: int
    top1: float
    final_loss: float
    seconds: float


def rank_slice(mb: MixedBatch) -> tuple[MixedBatch, float]:
    """This rank's contiguous part of a global batch, and the factor world × part / batch
    that makes DDP's gradient average the gradient of the global batch mean."""
    n = len(mb.indices)
    lo, hi = D.split_range(n)
    part = MixedBatch(mb.epoch, mb.batch, mb.indices[lo:hi], mb.x[lo:hi], mb.y_org[lo:hi],
                      mb.y_aug[lo:hi], mb.lam, mb.perm)
    return part, D.world() * (hi - lo) / n


def train_student(ds: DistilledSet, arch: str, mode: str,
                  targets: Callable[[MixedBatch], Dict[str, torch.Tensor]], augment: AugmentConfig,
                  replay_seed: int, epochs: int, student_seed: int, num_classes: int, test_set,
                  mean: Sequence[float], std: Sequence[float], *, temperature: float = 20.0,
                  dbr_r: float = DBR_R,
                  lr: float = LR, weight_decay: float = WEIGHT_DECAY,
                  device: torch.device | str = "cpu", checkpoint: Optional[Path] = None,
                  checkpoint_every_s: float = 60.0, settings: Optional[dict] = None,
                  quiet: bool = False, channels_last: bool = False, bf16: bool = False) -> StudentRun:
    """Train one fresh student for ``epochs`` replayed epochs; return its last-epoch test top-1.

    With ``checkpoint``, the state is saved there at most every ``checkpoint_every_s``
    seconds (and at the end of training) and training continues from it if it exists
    and was made with the same ``settings``. Each epoch reseeds torch's global RNG
    from (student_seed, epoch), so a resumed run equals an uninterrupted one.

    ``channels_last``: the student's weights and inputs in the channels_last layout (the
    same training to float32 rounding, faster convolutions and pooling); ``bf16``: its
    forward and backward under bfloat16 autocast (fp32 weights, optimizer and loss; the
    test set is scored in fp32). Both are for speed: bf16 on GPUs and CPUs with AMX.
    """
    from tqdm import tqdm

    from nrrdd.models import build_model
    from nrrdd.teacher import progress_enabled

    torch.manual_seed(derive_seed(student_seed))
    model = build_model(arch, num_classes, ds.in_channels, ds.image_size).to(device)
    model = D.sync_batchnorm(model, device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    device_type = torch.device(device).type
    opt = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999))
    start_epoch, seconds, last_loss = 0, 0.0, float("nan")
    if checkpoint is not None and checkpoint.is_file():
        state = storage.load_resume_state(checkpoint, settings, "a student training")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, seconds, last_loss = state["epoch"], state["seconds"], state["loss"]

    net = D.wrap_ddp(model, device)

    def save(epoch: int) -> None:
        if checkpoint is not None and D.is_main():
            storage.save_torch({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "epoch": epoch, "seconds": seconds, "loss": last_loss,
                                "settings": settings}, checkpoint)

    images = ds.images.to(device)
    ys = ds.labels.to(device)
    nb = num_batches(len(ds), augment.batch_size)
    bar = tqdm(range(start_epoch, epochs), initial=start_epoch, total=epochs,
               desc=f"student {arch} seed {student_seed}", unit="ep",
               disable=not progress_enabled(quiet) or not D.is_main())
    last_save = time.perf_counter()
    for epoch in bar:
        t0 = time.perf_counter()
        torch.manual_seed(derive_seed(student_seed, epoch + 1))
        for group in opt.param_groups:
            group["lr"] = lr * cosine_factor(epoch, epochs)
        model.train()
        loss_sum = 0.0
        for mb in replay_epoch(images, ys, augment, replay_seed, epoch):
            if D.active():
                mb, share = rank_slice(mb)
            tg = targets(mb)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                logits = net(mb.x.contiguous(memory_format=layout)).float()
            if D.active() and len(mb.indices) == 0:  # more ranks than images: join the all-reduce
                loss, share = logits.sum() * 0.0, 0.0
            else:
                loss = student_loss(mode, logits, mb, tg, temperature, dbr_r)
            opt.zero_grad(set_to_none=True)
            (loss * share if D.active() else loss).backward()
            opt.step()
            loss_sum += float(loss.detach()) * (share / D.world() if D.active() else 1.0)
        last_loss = D.all_sum(loss_sum) / nb
        seconds += time.perf_counter() - t0
        bar.set_postfix(loss=f"{last_loss:.4f}")
        if time.perf_counter() - last_save >= checkpoint_every_s:
            save(epoch + 1)
            last_save = time.perf_counter()
    bar.close()
    save(epochs)
    t0 = time.perf_counter()
    top1 = D.broadcast(test_top1(model, test_set, mean, std, device) if D.is_main() else None)
    return StudentRun(student_seed, top1, last_loss, seconds + time.perf_counter() - t0)


# short names of the augmentation fields in an evaluation's variant (others: the field name)
_AUGMENT_TAGS = {"batch_size": "b", "min_scale": "ms", "mix": ""}


def protocol_variant(augment: AugmentConfig, default: AugmentConfig, epochs: int,
                     replay_seed: int) -> List[str]:
    """For students trained without a label folder (one-hot without stored labels,
    ``--online``): the epochs, replay seed and augmentation that differ from the
    protocol's defaults, e.g. ``["e50", "s3", "mixup", "ms0.25"]``. (With a label
    folder these are the folder's, so they never differ between evaluations.)"""
    parts = []
    if int(epochs) != EPOCHS:
        parts.append(f"e{int(epochs)}")
    if int(replay_seed) != 0:
        parts.append(f"s{int(replay_seed)}")
    for f in fields(AugmentConfig):
        value = getattr(augment, f.name)
        if value != getattr(default, f.name):
            tag = _AUGMENT_TAGS.get(f.name, f.name)
            parts.append(f"{tag}{value:g}" if isinstance(value, float) else f"{tag}{value}")
    return parts


def eval_variant(mode: str, *, dbr_r: float = DBR_R, lr: float = LR, weight_decay: float = WEIGHT_DECAY,
                 temperature: Optional[float] = None, default_temperature: Optional[float] = None,
                 online: bool = False, protocol: Sequence[str] = (), bf16: bool = False) -> str:
    """The student settings that differ from the defaults, e.g. ``r0.2-lr0.002``
    (empty at the defaults): part of the evaluation's file name, so that an
    evaluation at other settings never overwrites the default one. ``protocol``:
    ``protocol_variant``'s parts, for students trained without a label folder.
    ``bf16`` (students under bfloat16 autocast) is a variant; the channels_last layout,
    which changes nothing but float32 rounding, is not."""
    parts = list(protocol)
    if mode == "dbr" and float(dbr_r) != DBR_R:
        parts.append(f"r{float(dbr_r):g}")
    # stored compact labels fix their own temperature; soft targets take it at training time
    if (mode == "soft" or (online and mode == "compact")) and temperature is not None \
            and float(temperature) != default_temperature:
        parts.append(f"t{float(temperature):g}")
    if float(lr) != LR:
        parts.append(f"lr{float(lr):g}")
    if float(weight_decay) != WEIGHT_DECAY:
        parts.append(f"wd{float(weight_decay):g}")
    if bf16:
        parts.append("bf16")
    return "-".join(parts)


def eval_name(mode: str, arch: str, online: bool, split: str = "test", variant: str = "") -> str:
    """``eval_<labels>_<student>`` (``<labels>-online`` for online runs, ``<labels>-<variant>``
    for non-default student settings (``eval_variant``); ``-holdout`` appended when the
    students are scored on the held-out training images)."""
    return (f"eval_{mode}{'-online' if online else ''}{'-' + variant if variant else ''}_{arch}"
            f"{'' if split == 'test' else '-' + split}")


def evaluate(ds: DistilledSet, *, arch: str, mode: str, test_set, epochs: int, seeds: int,
             augment: AugmentConfig, replay_seed: int,
             targets: Callable[[MixedBatch], Dict[str, torch.Tensor]], num_classes: int,
             mean: Sequence[float], std: Sequence[float], online: bool = False,
             temperature: float = 20.0, dbr_r: float = DBR_R, split: str = "test",
             label_manifest: Optional[dict] = None,
             device: torch.device | str = "cpu", resume: bool = False, quiet: bool = False,
             lr: float = LR, weight_decay: float = WEIGHT_DECAY, checkpoint_every_s: float = 60.0,
             extra: Optional[dict] = None, default_augment: Optional[AugmentConfig] = None,
             channels_last: bool = False, bf16: bool = False, teacher_sha256: Optional[str] = None,
             log: Callable[[str], None] = print) -> dict:
    """Train ``seeds`` students (init seeds 0..seeds-1), write and return ``DIR/eval_*.json``.

    The teacher behind the targets (``teacher_sha256`` for ``online``, else the label
    manifest's) is part of the students' resume settings and of the json.

    Per-seed checkpoints and results live in ``DIR/.<eval name>/`` until the json is
    written; ``resume`` continues from them, otherwise they are discarded.
    ``default_augment``: the protocol's augmentation for this set; given for students
    trained without a label folder, so that other epochs, replay seed or augmentation
    go into the file name (``protocol_variant``) instead of replacing the default run.
    """
    protocol = () if label_manifest is not None or default_augment is None else \
        protocol_variant(augment, default_augment, epochs, replay_seed)
    variant = eval_variant(mode, dbr_r=dbr_r, lr=lr, weight_decay=weight_decay, temperature=temperature,
                           default_temperature=L.DEFAULT_TEMPERATURE[augment.mix], online=online,
                           protocol=protocol, bf16=bf16)
    name = eval_name(mode, arch, online, split, variant)
    work = ds.path / f".{name}"
    labelled_by = teacher_sha256 if online else ((label_manifest or {}).get("teacher") or {}).get("sha256")
    if not resume and work.exists() and D.is_main():
        shutil.rmtree(work)
    D.barrier()
    settings = {"arch": arch, "mode": mode, "online": online, "epochs": epochs,
                "augment": augment.to_dict(), "replay_seed": replay_seed, "temperature": temperature,
                "lr": lr, "weight_decay": weight_decay, "images_sha256": ds.fingerprint(),
                **({"dbr_r": dbr_r} if mode == "dbr" else {}),
                **({"teacher_sha256": labelled_by} if labelled_by else {}),
                # only when set: checkpoints of earlier versions (without the keys) still resume
                **({"channels_last": True} if channels_last else {}), **({"bf16": True} if bf16 else {})}
    start = time.perf_counter()
    runs: List[StudentRun] = []
    for k in range(seeds):
        done = work / f"seed{k}.json"
        if resume and done.is_file():
            import json

            runs.append(StudentRun(**json.loads(done.read_text())))
            log(f"seed {k}: done before, top-1 {runs[-1].top1:.2f}%")
            continue
        run = train_student(ds, arch, mode, targets, augment, replay_seed, epochs, k, num_classes,
                            test_set, mean, std, temperature=temperature, dbr_r=dbr_r, lr=lr,
                            weight_decay=weight_decay, device=device,
                            checkpoint=work / f"seed{k}.pt", checkpoint_every_s=checkpoint_every_s,
                            settings=settings, quiet=quiet, channels_last=channels_last, bf16=bf16)
        if D.is_main():
            storage.write_json(run.__dict__, done)
            (work / f"seed{k}.pt").unlink(missing_ok=True)
        runs.append(run)
        log(f"seed {k}: top-1 {run.top1:.2f}% (last epoch), {run.seconds:.1f}s")
    top1 = [r.top1 for r in runs]
    lm = label_manifest or {}
    result = {
        "top1": top1,
        "top1_mean": statistics.fmean(top1),
        "top1_std": statistics.pstdev(top1) if len(top1) > 1 else 0.0,
        "top1_std_ddof": 0,
        "top1_at": "last epoch",
        "student_seeds": [r.student_seed for r in runs],
        "final_train_loss": [r.final_loss for r in runs],
        "seconds_per_seed": [r.seconds for r in runs],
        "seconds": sum(r.seconds for r in runs),
        "wall_seconds": time.perf_counter() - start,
        "labels": mode, "online": online, "student": arch, "epochs": epochs,
        "label_bytes": 0 if online else int(lm.get("bytes_stored", 0)),
        "label_bytes_per_image": 0 if online else lm.get("bytes_per_image", 0),
        "label_ratio_to_soft": None if online else lm.get("ratio_to_soft"),
        "replay_seed": replay_seed, "augment": augment.to_dict(),
        "temperature": temperature if mode in ("soft", "compact") else None,
        "dbr_r": dbr_r if mode == "dbr" else None, "variant": variant, "eval_split": split, "dbr_alpha": DBR_ALPHA if mode == "dbr" else None,
        "optimizer": {"name": "adamw", "lr": lr, "weight_decay": weight_decay, "schedule": "cosine"},
        "num_images": len(ds), "num_classes": num_classes,
        "teacher_sha256": labelled_by,
        "method": ds.config.get("method"), "ipc": ds.config.get("ipc"),
        "dataset": ds.config.get("dataset"), "distilled": str(ds.path),
        "precision": "bf16" if bf16 else "fp32", "channels_last": channels_last,
        "device": str(device), "nrrdd_version": nrrdd.__version__, "torch_version": torch.__version__,
        "world_size": D.world(),
        **(extra or {}),
    }
    if D.is_main():
        storage.write_json(result, ds.path / f"{name}.json")
        shutil.rmtree(work, ignore_errors=True)
    D.barrier()
    return result
