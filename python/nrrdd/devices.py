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


class StageMeter:
    """Wall time and peak GPU memory of each stage of a run: ``start()`` starts the clock
    and resets ``torch.cuda.max_memory_allocated``; ``stop(stage)`` adds the seconds
    since to ``seconds[stage]`` and keeps the largest peak (GiB) seen for that stage.
    ``gpu_peaks()`` is None on the CPU (nothing to measure there)."""

    def __init__(self, device) -> None:
        import torch

        self.device = torch.device(device)
        self.seconds: dict = {}
        self._peaks: dict = {}
        self._t0 = 0.0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def start(self) -> None:
        import time

        if self.on_gpu:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()

    def stop(self, stage: str) -> None:
        import time

        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - self._t0
        if self.on_gpu:
            import torch

            gib = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            self._peaks[stage] = round(max(self._peaks.get(stage, 0.0), gib), 4)

    def gpu_peaks(self):
        return dict(self._peaks) if self.on_gpu else None
