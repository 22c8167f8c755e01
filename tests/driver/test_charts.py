"""nrrdd.charts: tick choice and the PNG a line chart writes."""
import numpy as np
import pytest
import torch

from nrrdd.charts import COLOURS, line_chart, nice_ticks


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (62.3, 91.7), (-3.2, 0.4), (1e-4, 3e-4), (5.0, 5.0)])
def test_nice_ticks_cover_the_range_with_round_steps(lo, hi):
    t = nice_ticks(lo, hi)
    assert t[0] <= lo and t[-1] >= hi and 3 <= len(t) <= 12
    steps = {round(b - a, 12) for a, b in zip(t, t[1:])}
    assert len(steps) == 1
    (step,) = steps
    mant = step / 10 ** torch.tensor(step).log10().floor().item()
    assert any(abs(mant - m) < 1e-6 for m in (1, 2, 2.5, 5, 10))


def test_line_chart_draws_each_series_in_its_colour(tmp_path):
    from PIL import Image

    p = line_chart({"a": [(0, 1.0), (100, 0.5), (200, 0.2)], "b": [(0, 0.8), (200, 0.9)],
                    "empty": [(1, float("nan"))]}, tmp_path / "c.png", title="loss", xlabel="iteration",
                   ylabel="total", size=(400, 300))
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (400, 300)
        px = torch.from_numpy(np.asarray(im.convert("RGB")).copy())
    for c in COLOURS[:2]:
        assert int((px == torch.tensor(c)).all(-1).sum()) > 50
    assert int((px == torch.tensor(COLOURS[2])).all(-1).sum()) == 0  # the all-NaN series is dropped
    with pytest.raises(ValueError, match="no finite points"):
        line_chart({"x": []}, tmp_path / "d.png")
