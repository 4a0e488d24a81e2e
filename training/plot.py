"""The reward-curve image: reward per iteration and its moving average, with labelled axes."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def moving_average(values: Sequence[float], window: int = 10) -> list:
    """Trailing mean over the last ``window`` finite values (NaN where none)."""
    out, buf = [], []
    for v in values:
        if v is not None and math.isfinite(v):
            buf.append(v)
        buf = buf[-window:]
        out.append(float(np.mean(buf)) if buf else float("nan"))
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def reward_curve_image(rewards: Sequence[float], width: int = 640, height: int = 400,
                       title: str = "DRaFT reward", window: int = 10) -> Image.Image:
    """Draw ``rewards`` (one per iteration; NaN for skipped steps) as an RGB PIL image.

    Blue: reward per iteration; orange: moving average over ``window`` iterations; skipped
    (non-finite) iterations are marked with red ticks on the x axis.
    """
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, 20, 30, 50
    pw, ph = width - left - right, height - top - bottom
    draw.text((left, 8), title, fill="black", font=font)
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    draw.text((left + pw // 2 - 25, height - 20), "iteration", fill="black", font=font)
    draw.text((6, top + ph // 2 - 6), "reward", fill="black", font=font)

    finite = [v for v in rewards if v is not None and math.isfinite(v)]
    n = len(rewards)
    if not finite:
        draw.text((left + 10, top + 10), "no finite rewards yet", fill="gray", font=font)
        return img
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def xy(i, v):
        x = left + (pw * (i / max(1, n - 1)))
        y = top + ph * (1 - (v - lo) / (hi - lo))
        return x, y

    for t in _ticks(lo, hi):
        _, y = xy(0, t)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{t:.4g}", fill="black", font=font)
    for i in sorted({0, n - 1} | {round(k * (n - 1) / 4) for k in range(5)}):
        x, _ = xy(i, lo)
        draw.line([x, top + ph, x, top + ph + 4], fill="black")
        draw.text((x - 6, top + ph + 6), str(i + 1), fill="black", font=font)

    for series, colour, w in ((list(rewards), (70, 110, 220), 1),
                              (moving_average(rewards, window), (240, 140, 20), 2)):
        pts = []
        for i, v in enumerate(series):
            if v is None or not math.isfinite(v):
                if len(pts) > 1:
                    draw.line(pts, fill=colour, width=w)
                pts = []
                continue
            pts.append(xy(i, v))
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=w)
        elif len(pts) == 1:
            x, y = pts[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    for i, v in enumerate(rewards):
        if v is None or not math.isfinite(v):
            x, _ = xy(i, lo)
            draw.line([x, top + ph - 6, x, top + ph], fill="red", width=2)
    draw.text((left + pw - 150, top + 6), f"-- reward  -- mean of {window}", fill="black", font=font)
    return img
