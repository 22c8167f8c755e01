"""A distilled folder as the later stages read it, and its DD-Ranking export.

``nrrdd distill`` (and ``nrrdd run --method random``) write a folder holding

- ``images.pt``: float tensor (N, C, H, W) in the teacher's normalised space;
- ``labels.pt``: int64 tensor (N,), the class of each image;
- ``config.json``: the settings (dataset, data_dir, teacher path, mean/std, seed, ipc, ...).

Relabeling and student evaluation only read these three files.

DD-Ranking export (:func:`export_ddranking`): DD-Ranking's evaluators take
``syn_images = torch.load('images.pt')`` (float N×C×H×W) and
``labels = torch.load('labels.pt')`` (hard labels, int64 N, for its hard-label
evaluator; or an N×num_classes soft-label tensor for its soft-label mode 'S').
The export writes both in that layout, the images in the dataset-normalised space
the students train on (the same space as MTT/DATM/RDED exports), plus
``soft_labels.pt`` (the teacher's logits on the un-augmented images, float32 N×K)
when a teacher is given, and ``meta.json`` with the mean/std needed to undo the
normalisation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from nrrdd import storage
from nrrdd.errors import UsageError


@dataclass
class DistilledSet:
    """The three files of a distilled folder, loaded on the CPU."""

    path: Path
    images: torch.Tensor
    labels: torch.Tensor
    config: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def num_classes(self) -> int:
        """``config['num_classes']`` when recorded, else one past the largest label."""
        n = self.config.get("num_classes")
        return int(n) if n is not None else int(self.labels.max()) + 1

    def fingerprint(self) -> str:
        """sha256 of the image and label tensors: which images a labels folder belongs to."""
        return storage.tensor_fingerprint(self.images, self.labels)


def load_distilled(path: str | Path) -> DistilledSet:
    """Read ``images.pt``, ``labels.pt`` and (if present) ``config.json`` from ``path``.

    Raises :class:`UsageError` when the folder or a tensor file is missing or malformed.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"distilled folder {path} does not exist")
    for name in ("images.pt", "labels.pt"):
        if not (path / name).is_file():
            raise UsageError(f"{path} holds no {name} (not a distilled folder, or distill not finished)")
    try:
        images = torch.load(path / "images.pt", map_location="cpu", weights_only=True)
        labels = torch.load(path / "labels.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read the tensors in {path}: {e}") from None
    if not (isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point()):
        raise UsageError(f"{path / 'images.pt'} must hold a float N×C×H×W tensor")
    if not (isinstance(labels, torch.Tensor) and labels.dim() == 1 and not labels.is_floating_point()):
        raise UsageError(f"{path / 'labels.pt'} must hold an integer N tensor")
    if labels.shape[0] != images.shape[0] or images.shape[0] == 0:
        raise UsageError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    if int(labels.min()) < 0:
        raise UsageError(f"{path / 'labels.pt'} holds negative labels")
    config = {}
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    return DistilledSet(path, images.float().contiguous(), labels.long(), config)


def save_distilled(path: str | Path, images: torch.Tensor, labels: torch.Tensor, config: dict) -> None:
    """Write the three files atomically (used for ``--method random`` and in tests)."""
    path = Path(path)
    storage.save_torch(images.detach().cpu().float().contiguous(), path / "images.pt")
    storage.save_torch(labels.detach().cpu().long(), path / "labels.pt")
    storage.write_json(config, path / "config.json")


def import_distilled(source: DistilledSet, dest: str | Path) -> None:
    """Copy ``source``'s set into ``dest`` (``nrrdd run --images-from``): its tensors, and
    its config.json with ``images_from`` (the source folder and the images' sha256) added,
    and ``patches.pt`` (the patches' provenance) when the source has one. Labels,
    evaluations and pictures of the source are not copied: the copy is labelled anew."""
    dest = Path(dest)
    if (source.path / "patches.pt").is_file():
        storage.write_bytes((source.path / "patches.pt").read_bytes(), dest / "patches.pt")
    config = dict(source.config, images_from={"path": str(source.path.resolve()),
                                              "images_sha256": source.fingerprint()})
    save_distilled(dest, source.images, source.labels, config)


def export_ddranking(distilled: str | Path | DistilledSet, out: str | Path,
                     teacher: Optional[torch.nn.Module] = None, device: str = "cpu",
                     batch_size: int = 256) -> Path:
    """Write ``out/images.pt``, ``out/labels.pt`` (and ``soft_labels.pt`` with a teacher).

    Returns ``out``. See the module docstring for the layout.
    """
    ds = distilled if isinstance(distilled, DistilledSet) else load_distilled(distilled)
    out = Path(out)
    storage.save_torch(ds.images.clone(), out / "images.pt")
    storage.save_torch(ds.labels.clone(), out / "labels.pt")
    meta = {"num_images": len(ds), "num_classes": ds.num_classes,
            "mean": ds.config.get("mean"), "std": ds.config.get("std"),
            "dataset": ds.config.get("dataset"), "ipc": ds.config.get("ipc"),
            "images_space": "normalised with mean/std", "source": str(ds.path)}
    if teacher is not None:
        teacher.eval()
        chunks = []
        with torch.no_grad():
            for s in range(0, len(ds), batch_size):
                chunks.append(teacher(ds.images[s:s + batch_size].to(device)).float().cpu())
        storage.save_torch(torch.cat(chunks), out / "soft_labels.pt")
        meta["soft_labels"] = "teacher logits on the un-augmented images (float32 N×K)"
    storage.write_json(meta, out / "meta.json")
    return out
