"""Which torch device a command runs on (--device, checked before any work starts),
and the peak memory each stage of a run takes on it."""
from __future__ import annotations

from nrrdd.errors import UsageError


def resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {name!r}")
    return dev


class StagePeaks:
    """Peak GPU memory (GiB, ``torch.cuda.max_memory_allocated``) of each stage of a
    run: ``start()`` resets the counter, ``stop(stage)`` keeps the largest peak seen
    for that stage. ``as_dict()`` is None on the CPU (nothing to measure there)."""

    def __init__(self, device) -> None:
        import torch

        self.device = torch.device(device)
        self.peaks: dict = {}

    @property
    def active(self) -> bool:
        return self.device.type == "cuda"

    def start(self) -> None:
        if self.active:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self, stage: str) -> None:
        if self.active:
            import torch

            gib = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            self.peaks[stage] = round(max(self.peaks.get(stage, 0.0), gib), 4)

    def as_dict(self):
        return dict(self.peaks) if self.active else None
