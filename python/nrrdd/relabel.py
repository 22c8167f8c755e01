"""Relabeling: run the teacher once over every replayed student batch and store its labels.

For each epoch e < epochs and batch b, the mixed view x_mix of (seed, e, b)
(``nrrdd.augment.replay_batch``) goes through the teacher in eval mode; the mode's
reduction of the logits (``nrrdd.labels.teacher_targets``: for DBR the two
distances of Eq. 8) is scattered into row ``i`` of an epoch array for each image i
of the batch, and the epoch is written as one shard (atomically). ``resume``
skips every complete shard; the manifest states the settings and bytes
(``nrrdd.labels``).

Several ranks (``torchrun``, :mod:`nrrdd.distributed`): the work is split by
epoch. Rank 0 checks the folder, writes the manifest and lists the epochs
without a complete shard; the ranks take them round-robin, each writing whole
epoch shards, computed exactly as a single process computes them (so the
stored bytes do not depend on the rank count); after a barrier rank 0 writes
the final manifest. Ranks beyond the epoch count have nothing to do.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

import nrrdd
from nrrdd import distributed as D
from nrrdd import labels as L
from nrrdd.augment import AugmentConfig, num_batches, replay_epoch
from nrrdd.distilled_set import DistilledSet, load_distilled
from nrrdd.errors import UsageError


def default_augment(ds: DistilledSet, batch_size: int = 100, mix: str = "cutmix",
                    min_scale: Optional[float] = None) -> AugmentConfig:
    """The student protocol's augmentation for a distilled set.

    ``min_scale`` defaults to 1/factor of the set's stitching factor (RDED's
    student loader: RandomResizedCrop scale (1/factor, 1)), 0.08 (torchvision,
    SRe2L) when the set records no factor.
    """
    if min_scale is None:
        factor = ds.config.get("factor")
        min_scale = 1.0 / float(factor) if factor else 0.08
    return AugmentConfig(batch_size=batch_size, min_scale=min(1.0, float(min_scale)), mix=mix)


def check_teacher_fits(meta: dict, ds: DistilledSet, what: str = "teacher") -> None:
    """The teacher must see the distilled images as it was trained to: channels, size, classes."""
    if meta.get("in_channels") is not None and int(meta["in_channels"]) != ds.in_channels:
        raise UsageError(f"{what} takes {meta['in_channels']}-channel images, the distilled set "
                         f"has {ds.in_channels} channels")
    if meta.get("image_size") is not None and int(meta["image_size"]) != ds.image_size:
        raise UsageError(f"{what} takes {meta['image_size']} px images, the distilled set has "
                         f"{ds.image_size} px")
    nc = int(meta["num_classes"])
    if "num_classes" in ds.config and int(ds.config["num_classes"]) != nc:
        raise UsageError(f"{what} has {nc} classes, the distilled set {ds.config['num_classes']}")
    if int(ds.labels.max()) >= nc:
        raise UsageError(f"{what} has {nc} classes, the distilled set has label {int(ds.labels.max())}")
    if ds.config.get("dataset") and meta.get("dataset") and ds.config["dataset"] != meta["dataset"]:
        raise UsageError(f"{what} was trained on {meta['dataset']}, the distilled set comes from "
                         f"{ds.config['dataset']}")
    for key in ("mean", "std"):  # the set's images are normalised as its config says
        have, want = ds.config.get(key), meta.get(key)
        if have is not None and want is not None and (
                len(have) != len(want) or any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(have, want))):
            raise UsageError(f"{what} normalises images with {key} {list(want)}, the distilled set's images "
                             f"are normalised with {key} {list(have)}")


def resolve_teacher_path(ds: DistilledSet, teacher: Optional[str | Path]) -> Path:
    """``teacher`` if given, else the teacher recorded in the set's config.json."""
    if teacher is None:
        recorded = ds.config.get("teacher") or ds.config.get("teacher_path")
        if isinstance(recorded, dict):
            recorded = recorded.get("path")
        if not recorded:
            raise UsageError(f"{ds.path}/config.json names no teacher: give --teacher")
        teacher = recorded
    return Path(teacher)


@torch.no_grad()
def relabel(distilled: str | Path | DistilledSet, teacher_model: nn.Module, teacher_meta: dict,
            mode: str, epochs: int, *, seed: int = 0, augment: Optional[AugmentConfig] = None,
            temperature: Optional[float] = None, device: str | torch.device = "cpu",
            resume: bool = False, force: bool = False, quiet: bool = False,
            log: Callable[[str], None] = print) -> dict:
    """Store ``mode`` labels for ``epochs`` replayed epochs in ``DIR/labels_<mode>/``.

    Returns the manifest. Raises :class:`UsageError` (before any work) for a bad
    mode or epoch count, a teacher that does not fit the set, or an existing
    labels folder made with other settings (without ``force``) or at all (without
    ``resume`` or ``force``).
    """
    from tqdm import tqdm

    from nrrdd.teacher import progress_enabled, same_teacher, teacher_record

    ds = distilled if isinstance(distilled, DistilledSet) else load_distilled(distilled)
    if mode not in L.MODES:
        raise UsageError(f"unknown label mode {mode!r} (choose from {', '.join(L.MODES)})")
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    if seed < 0:
        raise UsageError(f"--seed must be non-negative, got {seed}")
    check_teacher_fits(teacher_meta, ds)
    num_classes = int(teacher_meta["num_classes"])
    augment = augment or default_augment(ds)
    if temperature is None:
        temperature = L.DEFAULT_TEMPERATURE[augment.mix]
    flds = L.fields(mode, num_classes)
    N = len(ds)
    fingerprint = ds.fingerprint()
    settings = {
        "format_version": L.FORMAT_VERSION, "mode": mode, "seed": int(seed), "epochs": int(epochs),
        "batch_size": augment.batch_size, "augment": augment.to_dict(),
        "temperature": float(temperature) if mode == "compact" else None,
        "num_images": N, "num_classes": num_classes, "images_sha256": fingerprint,
        "fields": [f.to_dict() for f in flds], "layout": "epoch_<e>.bin: each field (num_images, width) "
        "little-endian row-major, fields in order; row i = image i",
        "teacher": teacher_record(teacher_meta),
    }
    store = L.LabelStore(ds.path, mode)

    def open_store():  # rank 0 only: check the folder, write the manifest, list the epochs to do
        todo = list(range(epochs))
        if store.exists() and not force:
            old = store.manifest()
            if not resume:
                raise UsageError(f"{store.path} already holds labels: --resume to continue, --force to redo")
            same = {k: old.get(k) for k in settings if k != "teacher"} == \
                   {k: v for k, v in settings.items() if k != "teacher"}
            if not same or not same_teacher(old.get("teacher"), teacher_meta):
                raise UsageError(f"{store.path} was made with other settings (seed, epochs, batch size, "
                                 f"augmentation, teacher or images): use --force to redo it")
            if flds:
                todo = [e for e in todo if not store.complete_epoch(e, N, flds)]
            elif old.get("complete"):
                todo = []
        elif force:
            store.clear()
        manifest = {**settings, **L.storage_summary(mode, N, num_classes, epochs),
                    "complete": False, "epochs_done": epochs - len(todo),
                    "nrrdd_version": nrrdd.__version__, "torch_version": torch.__version__,
                    "device": str(device), "world_size": D.world(), "seconds": 0.0}
        if store.exists():
            manifest["seconds"] = float(store.manifest().get("seconds", 0.0))
        store.write_manifest(manifest)
        return manifest, todo

    manifest, todo = D.on_main(open_store)
    seconds = 0.0  # this run's compute time on this rank
    if flds and todo:
        teacher_model.eval()
        images = ds.images.to(device)
        ys = ds.labels.to(device)
        nb = num_batches(N, augment.batch_size)
        mine = D.shard(todo)
        bar = tqdm(total=len(mine) * nb, desc=f"relabel {mode}", unit="batch",
                   disable=not progress_enabled(quiet) or not D.is_main())
        if len(todo) < epochs and D.is_main():
            log(f"resuming {store.path}: {epochs - len(todo)}/{epochs} epochs done before")
        for e in mine:
            t0 = time.perf_counter()
            arrays = {f.name: torch.empty((N, f.width), dtype=f.torch_dtype) for f in flds}
            for mb in replay_epoch(images, ys, augment, seed, e):
                logits = teacher_model(mb.x)
                for name, t in L.teacher_targets(mode, logits, mb.y_org, mb.y_aug, temperature).items():
                    arrays[name][mb.indices] = t.cpu()
                bar.update(1)
            store.write_epoch(e, arrays, flds)
            seconds += time.perf_counter() - t0
            if not D.active():  # one process: the manifest follows every epoch
                manifest["epochs_done"] += 1
                manifest["seconds"] += time.perf_counter() - t0
                store.write_manifest(manifest)
                seconds = 0.0
        bar.close()
    seconds = D.all_sum(seconds)
    D.barrier()

    def finish():  # rank 0 only, after every rank's shards are written
        manifest["seconds"] += seconds
        manifest["epochs_done"] = epochs
        manifest["complete"] = True
        manifest["bytes_on_disk"] = (sum(store.shard_path(e).stat().st_size for e in range(epochs))
                                     if flds else 0)
        store.write_manifest(manifest)
        return manifest

    return D.on_main(finish)
