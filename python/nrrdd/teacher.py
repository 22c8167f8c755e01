"""Training, saving and loading the teacher network.

No teachers are published for the small datasets and an offline machine can
download none, so the driver trains its own: SGD (momentum 0.9, Nesterov) or
AdamW with a per-step cosine schedule to zero, cross entropy, and the standard
augmentation, drawn per batch on the device:

- images <= 64 px: random crop with zero padding of ``image_size // 8`` and a
  horizontal flip (p = 0.5);
- larger images: random resized crop (scale (0.08, 1), ratio (3/4, 4/3)) and flip;
- ``augment='flip'``: the flip only; ``'none'``: nothing. Measured on Fashion-MNIST
  (ConvNet-3, SGD lr 0.05, 2-core CPU): 'standard' for 6 epochs reached 90.23% test
  accuracy (train accuracy 90.3%: underfitting, the crops cost more than they
  regularise on so short a schedule); 'flip' for 8 epochs reached 92.24% (train
  93.6%; 47 min wall on a shared 2-core CPU, about 170 s per epoch when not shared):
  ``nrrdd train-teacher --dataset fashion-mnist --arch convnet3 --epochs 8 --augment flip``.

Speed on a CPU: ``bf16=True`` (bfloat16 autocast) with ``channels_last=True`` uses
the CPU's AMX tiles where it has them. Measured on this project's 2-core Xeon
(AMX-BF16), ResNet-18 (small stem) on 28 px Fashion-MNIST, batch 128, one SGD step:
1.52 s fp32, 0.73 s bf16, 0.61 s bf16 + channels_last (2.5x); an epoch went from
about 12 to 5 minutes.

Long trainings resume: with ``checkpoint`` the full state is saved after every
epoch (``nrrdd train-teacher`` keeps it in ``OUT.partial`` until the checkpoint
is written, and ``--resume`` continues from it).

The checkpoint (``save_teacher``) is a dict of plain values and the state dict,
so it loads with ``torch.load(weights_only=True)``. ``load_teacher`` adds
``meta['sha256']``, the fingerprint of the loaded weights and buffers: distilled
sets, label folders and students record it (``teacher_record``), and ``--resume``
refuses to continue work begun under other weights, e.g. a teacher retrained or
replaced at the same path.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nrrdd import storage
from nrrdd.data import ImageSet
from nrrdd.errors import UsageError
from nrrdd.models import SMALL_IMAGE_MAX, build_model, known_arch

CHECKPOINT_FORMAT = "nrrdd-teacher-v1"
LOG_STEPS = 100  # a progress line every this many steps when no progress bar is shown
PARTIAL_SUFFIX = ".partial"  # teacher.pt -> teacher.pt.partial: the state after each epoch


def progress_enabled(quiet: bool) -> bool:
    """Progress bars only on a terminal and without --quiet."""
    return not quiet and sys.stderr.isatty()


AUGMENTS = ("standard", "flip", "none")


def augment_batch(x: torch.Tensor, generator: torch.Generator, mode: str = "standard") -> torch.Tensor:
    """The teacher's training augmentation (module docstring), batched.

    ``mode``: 'standard' (crop and flip), 'flip' (flip only) or 'none'.
    Random draws come from ``generator`` (CPU) so a seed fixes them on any device.
    """
    from nrrdd.cidd import crop_resize, random_resized_boxes

    if mode == "none":
        return x
    B, _, H, W = x.shape
    flip = torch.rand(B, generator=generator) < 0.5
    if mode == "flip":
        pass
    elif max(H, W) <= SMALL_IMAGE_MAX:
        p = max(1, H // 8)
        i = torch.randint(0, 2 * p + 1, (B,), generator=generator).to(x.device)
        j = torch.randint(0, 2 * p + 1, (B,), generator=generator).to(x.device)
        xp = F.pad(x, (p, p, p, p))
        rows = i[:, None] + torch.arange(H, device=x.device)[None]
        cols = j[:, None] + torch.arange(W, device=x.device)[None]
        b = torch.arange(B, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    else:
        boxes = random_resized_boxes(B, H, W, generator)
        x = crop_resize(x, boxes.to(x.device), (H, W))
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x).contiguous()


@torch.no_grad()
def accuracy(model: nn.Module, images: ImageSet, device: torch.device | str,
             batch_size: int = 500, quiet: bool = True, desc: str = "test") -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode on ``images``."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    correct = 0
    for x, y in tqdm(images.batches(batch_size, device), total=math.ceil(len(images) / batch_size),
                     desc=desc, disable=not progress_enabled(quiet), leave=False):
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / max(1, len(images))


def train_teacher(arch: str, train: ImageSet, test: ImageSet, *, epochs: int,
                  device: torch.device | str = "cpu", seed: int = 0, batch_size: int = 128,
                  lr: Optional[float] = None, optimizer: str = "sgd",
                  weight_decay: Optional[float] = None, augment: str = "standard", quiet: bool = False,
                  bf16: bool = False, channels_last: bool = False, checkpoint: Optional[Path] = None,
                  on_epoch_end: Optional[Callable[[int], None]] = None,
                  log: Optional[Callable[[str], None]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Train ``arch`` on ``train`` for ``epochs``; returns (model in eval mode, meta).

    ``meta`` is the checkpoint's metadata, with the test accuracy on ``test``.
    Defaults: SGD lr 0.05, weight decay 5e-4; AdamW lr 1e-3, weight decay 0.01.

    ``bf16`` runs the forward under bfloat16 autocast (weights, gradients and the
    optimizer stay fp32); ``channels_last`` trains in that memory format. Both pay
    on CPUs with AMX as well as on GPUs (module docstring). The test accuracy is
    always measured in fp32.

    With ``checkpoint``, the whole training state (weights, optimizer, schedule,
    the augmentation generator) is written there atomically after every epoch, and
    training continues from it when it exists and was made with the same settings,
    so a resumed run equals an uninterrupted one. ``on_epoch_end(epoch)`` is called
    after that write (epoch counts from 1).
    """
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, flush=True))
    if optimizer not in ("sgd", "adamw"):
        raise UsageError(f"--optimizer must be sgd or adamw, got {optimizer!r}")
    if augment not in AUGMENTS:
        raise UsageError(f"--augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    torch.manual_seed(seed)
    model = build_model(arch, train.num_classes, train.in_channels, train.image_size).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if optimizer == "sgd":
        lr = 0.05 if lr is None else lr
        wd = 5e-4 if weight_decay is None else weight_decay
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    else:
        lr = 1e-3 if lr is None else lr
        wd = 0.01 if weight_decay is None else weight_decay
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    gen = torch.Generator().manual_seed(seed)
    settings = {"arch": arch, "dataset": train.name, "num_train": len(train), "epochs": epochs,
                "seed": seed, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
                "weight_decay": wd, "augment": augment, "bf16": bf16, "channels_last": channels_last}
    first_epoch, done_seconds = 0, 0.0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = storage.load_resume_state(Path(checkpoint), settings, "a teacher training")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        first_epoch, done_seconds = state["epoch"], state["seconds"]
        log(f"resuming {arch} from {checkpoint} after epoch {first_epoch}/{epochs}")
    device_type = torch.device(device).type
    start = time.perf_counter() - done_seconds
    for epoch in range(first_epoch, epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(train.batches(batch_size, device, indices=order), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{epochs}", disable=not progress_enabled(quiet), leave=False)
        for x, y in bar:
            x = augment_batch(x, gen, augment).contiguous(memory_format=memory_format)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += y.numel()
            loss_sum += float(loss.detach()) * y.numel()
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            step = seen // batch_size
            if bar.disable and not quiet and step % LOG_STEPS == 0:
                log(f"epoch {epoch + 1}/{epochs} step {step}/{steps_per_epoch}: "
                    f"train loss {loss_sum / seen:.4f}, {time.perf_counter() - start:.0f}s")
        if not quiet:
            log(f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / seen:.4f}, "
                f"train acc {correct / seen:.4f}, {time.perf_counter() - start:.0f}s")
        if checkpoint is not None:
            storage.save_torch({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "schedule": sched.state_dict(), "generator": gen.get_state(),
                                "epoch": epoch + 1, "seconds": time.perf_counter() - start,
                                "settings": settings}, Path(checkpoint))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    model = model.to(memory_format=torch.contiguous_format).eval()
    acc = accuracy(model, test, device, quiet=quiet)
    meta = {
        "format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": train.num_classes,
        "in_channels": train.in_channels, "image_size": train.image_size, "dataset": train.name,
        "mean": list(train.mean), "std": list(train.std), "classes": list(train.classes),
        "test_accuracy": acc, "seed": seed, "epochs": epochs, "batch_size": batch_size,
        "optimizer": optimizer, "lr": lr, "weight_decay": wd, "augment": augment,
        "precision": "bf16" if bf16 else "fp32", "channels_last": channels_last,
        "train_seconds": time.perf_counter() - start,
    }
    return model, meta


def partial_path(checkpoint: str | Path) -> Path:
    """Where the training state of the teacher checkpoint ``checkpoint`` lives until the
    training finishes (``teacher.pt`` -> ``teacher.pt.partial``); ``nrrdd status`` finds it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + PARTIAL_SUFFIX)


def save_teacher(model: nn.Module, meta: Dict[str, Any], path: str | Path) -> None:
    """Write the checkpoint atomically: ``meta`` plus ``state_dict`` (on the CPU)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.save_torch({**meta, "state_dict": state}, Path(path))


def _strip_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_teacher(path: str | Path, device: torch.device | str = "cpu", *,
                 arch: Optional[str] = None, num_classes: Optional[int] = None,
                 in_channels: Optional[int] = None, image_size: Optional[int] = None
                 ) -> Tuple[nn.Module, Dict[str, Any]]:
    """(model in eval mode on ``device``, meta) from a checkpoint.

    Reads the file :func:`save_teacher` writes, or a plain timm/torchvision state
    dict (also under a ``state_dict`` or ``model`` key); a plain one needs
    ``arch`` and ``num_classes`` (and ``in_channels`` / ``image_size`` unless 3
    and 224). Keyword values given for a full checkpoint must agree with it.
    Raises :class:`UsageError` when the file is missing, unreadable, names an
    unknown arch or does not fit the arch.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"teacher checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read teacher checkpoint {path}: {e}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state dict")
    if obj.get("format") == CHECKPOINT_FORMAT:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        state = obj["state_dict"]
        for key, want in (("arch", arch), ("num_classes", num_classes),
                          ("in_channels", in_channels), ("image_size", image_size)):
            if want is not None and meta[key] != want:
                raise UsageError(f"teacher {path} has {key} {meta[key]!r}, expected {want!r}")
    else:
        state = obj.get("state_dict", obj.get("model", obj))
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UsageError(f"{path} is neither an nrrdd teacher checkpoint nor a state dict")
        if arch is None or num_classes is None:
            raise UsageError(f"{path} is a plain state dict: give its arch and class count")
        meta = {"format": "state_dict", "arch": arch, "num_classes": int(num_classes),
                "in_channels": int(in_channels or 3), "image_size": int(image_size or 224),
                "test_accuracy": None}
    if not known_arch(meta["arch"]):
        raise UsageError(f"teacher {path} names an unknown arch {meta['arch']!r}")
    model = build_model(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"])
    try:
        model.load_state_dict(_strip_prefix(state))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"teacher {path} does not fit arch {meta['arch']!r} with "
                         f"{meta['num_classes']} classes: {first[1].strip() if len(first) > 1 else first[0]}"
                         ) from None
    meta["path"] = str(path.resolve())
    meta["sha256"] = weights_sha256(model)
    return model.to(device).eval(), meta


def weights_sha256(model: nn.Module) -> str:
    """Fingerprint of a model's state dict (parameters and buffers, by name order)."""
    state = model.state_dict()
    return storage.tensor_fingerprint(*(state[k] for k in sorted(state)))


def teacher_record(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The teacher as a config, manifest or run.json records it."""
    return {"path": meta.get("path"), "arch": meta.get("arch"), "test_accuracy": meta.get("test_accuracy"),
            "sha256": meta.get("sha256")}


def same_teacher(recorded: Optional[Dict[str, Any]], meta: Dict[str, Any]) -> bool:
    """Whether ``meta``'s teacher is the one ``recorded`` (a ``teacher_record``) names: the
    same weights where the record has their fingerprint, else (records made before it
    was kept) the same path."""
    recorded = recorded or {}
    if recorded.get("sha256"):
        return recorded["sha256"] == meta.get("sha256")
    return recorded.get("path") == meta.get("path")
