"""Line charts as PNG with PIL alone (no plotting dependency): loss curves, accuracy
against IPC. Axes with rounded ticks, one colour per series, a legend."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def nice_ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    """About ``count`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"axis range must be finite, got [{lo}, {hi}]")
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def line_chart(series: Dict[str, Sequence[Tuple[float, float]]], path: Path | str, *, title: str = "",
               xlabel: str = "", ylabel: str = "", size: Tuple[int, int] = (720, 440),
               log_x: bool = False) -> Path:
    """Draw each series (name -> [(x, y), ...]) as a polyline with dots; write a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    pts = {k: [(float(x), float(y)) for x, y in v if math.isfinite(float(y))] for k, v in series.items()}
    pts = {k: v for k, v in pts.items() if v}
    if not pts:
        raise ValueError("no finite points to draw")
    fx = (lambda x: math.log10(x)) if log_x else (lambda x: x)
    xs = [fx(x) for v in pts.values() for x, _ in v]
    ys = [y for v in pts.values() for _, y in v]
    xt = nice_ticks(min(xs), max(xs)) if not log_x else sorted({x for v in pts.values() for x, _ in v})
    yt = nice_ticks(min(ys), max(ys))
    x0, x1 = (xt[0], xt[-1]) if not log_x else (min(xs), max(xs))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = yt[0], yt[-1]
    W, H = size
    left, right, top, bottom = 70, 20 + 170, 36, 56
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def col(x):
        return left + (fx(x) - x0) / (x1 - x0) * (W - left - right)

    def row(y):
        return H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)

    def px(x, y):
        return col(x), row(y)

    for t in yt:
        v = row(t)
        d.line([left - 4, v, W - right, v], fill=(225, 225, 225))
        d.text((6, v - 6), f"{t:g}", fill=(0, 0, 0), font=font)
    for t in xt:
        u = col(t)
        d.line([u, top, u, H - bottom + 4], fill=(225, 225, 225))
        d.text((u - 10, H - bottom + 8), f"{t:g}", fill=(0, 0, 0), font=font)
    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for k, (name, v) in enumerate(pts.items()):
        c = COLOURS[k % len(COLOURS)]
        line = [px(x, y) for x, y in sorted(v)]
        if len(line) > 1:
            d.line(line, fill=c, width=2)
        for u, w in line if len(line) <= 40 else []:
            d.ellipse([u - 3, w - 3, u + 3, w + 3], fill=c)
        ly = top + 6 + 16 * k
        d.line([W - right + 12, ly + 6, W - right + 32, ly + 6], fill=c, width=3)
        d.text((W - right + 38, ly), name[:24], fill=(0, 0, 0), font=font)
    d.text((left, 10), title, fill=(0, 0, 0), font=font)
    d.text(((left + W - right) // 2 - 3 * len(xlabel), H - 22), xlabel, fill=(0, 0, 0), font=font)
    d.text((6, top - 18), ylabel, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path
