"""The reward-curve image: reward per iteration and its moving average, with labelled axes; with
the held-out check's summary, its figures as dashed curves over the same update axis."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# The held-out series by key (training/heldout.py: judge1..judge3, reward, similarity); apart from
# the reward's blue, the mean's orange and the skipped steps' red. Unknown keys take HELDOUT_EXTRA.
HELDOUT_COLOURS = {"judge1": (0, 160, 80), "judge2": (140, 70, 210), "judge3": (215, 40, 150),
                   "reward": (0, 160, 170), "similarity": (175, 135, 0)}
HELDOUT_EXTRA = ((110, 150, 30), (200, 90, 90), (90, 120, 200))
LEGEND_ROW = 12  # px per held-out legend row
STOP_ROW = 14  # px for the stop reason under the title
BEST_ROW = 13  # px above the plot for the best evaluation's label


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


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def heldout_series(heldout: Optional[dict]) -> list:
    """The series of a held-out summary (``{"series": [{key, label, kind}], "evaluations": ...}``),
    each with its colour: ``[(key, label, kind, colour)]``; [] without a summary."""
    if not heldout:
        return []
    series = [s for s in heldout.get("series") or [] if isinstance(s, dict) and "key" in s]
    if not series:  # no list: the keys the figures carry
        keys = sorted({k for e in heldout.get("evaluations") or [] for k in (e.get("figures") or {})})
        series = [{"key": k, "label": k, "kind": "similarity" if k == "similarity" else
                   "judge" if k.startswith("judge") else "reward"} for k in keys]
    return [(s["key"], str(s.get("label", s["key"])), str(s.get("kind", "")),
             HELDOUT_COLOURS.get(s["key"], HELDOUT_EXTRA[i % len(HELDOUT_EXTRA)]))
            for i, s in enumerate(series)]


def curve_layout(width: int, height: int, heldout: Optional[dict] = None) -> tuple:
    """``(left, top, plot width, plot height)`` of :func:`reward_curve_image`'s plot."""
    left, right, top, bottom = 70, 20, 30, 50
    rows = len(heldout_series(heldout))
    if rows:
        bottom += (rows + 1) * LEGEND_ROW
        if heldout.get("stop_reason"):
            top += STOP_ROW
        if _finite(heldout.get("best_iteration")):
            top += BEST_ROW
    return left, top, width - left - right, height - top - bottom


def _evaluations(heldout: dict) -> list:
    out = [e for e in heldout.get("evaluations") or []
           if isinstance(e, dict) and _finite(e.get("iteration"))]
    return sorted(out, key=lambda e: e["iteration"])


def _dashed(draw, pts, colour, width, dash=6, gap=4) -> None:
    """A dashed polyline (the pattern runs on across the points)."""
    on, left = True, dash
    for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
        seg = math.hypot(xb - xa, yb - ya)
        pos = 0.0
        while pos < seg:
            step = min(left, seg - pos)
            if on:
                t0, t1 = pos / seg, (pos + step) / seg
                draw.line([xa + (xb - xa) * t0, ya + (yb - ya) * t0,
                           xa + (xb - xa) * t1, ya + (yb - ya) * t1], fill=colour, width=width)
            pos += step
            left -= step
            if left <= 1e-9:
                on = not on
                left = dash if on else gap


def _nice_step(raw: float) -> int:
    """1, 2 or 5 x 10^k, at least ``raw`` / 1.5 (update ticks)."""
    if raw <= 1:
        return 1
    mag = 10 ** math.floor(math.log10(raw))
    norm = raw / mag
    return int((1 if norm < 1.5 else 2 if norm < 3.5 else 5 if norm < 7.5 else 10) * mag)


def _fit(draw, text: str, font, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def reward_curve_image(rewards: Sequence[float], width: int = 640, height: int = 400,
                       title: str = "DRaFT reward", window: int = 10,
                       heldout: Optional[dict] = None) -> Image.Image:
    """Draw ``rewards`` (one per iteration; NaN for skipped steps) as an RGB PIL image.

    Blue: reward per iteration; orange: moving average over ``window`` iterations; skipped
    (non-finite) iterations are marked with red ticks on the x axis.

    ``heldout``: the held-out check's summary (:meth:`training.heldout.HeldoutCheck.summary`:
    ``{"series", "evaluations": [{"iteration", "figures"}], "best_iteration", "stop_reason", ...}``).
    Each series is drawn dashed, with dots at the evaluations, scaled to its own min..max (their
    units differ), over the same update axis (update 0, the base model, one slot left of update
    1); a legend under the axis gives each label and last value, a vertical line marks the best
    evaluation, and a stop reason shows under the title. Without it the image is as before.
    """
    series = heldout_series(heldout)
    evaluations = _evaluations(heldout) if series else []
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, top, pw, ph = curve_layout(width, height, heldout)
    draw.text((left, 8), title, fill="black", font=font)
    if series and heldout.get("stop_reason"):
        draw.text((left, 8 + STOP_ROW), _fit(draw, f"stopped: {heldout['stop_reason']}", font, width - left - 8),
                  fill=(170, 30, 30), font=font)
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    draw.text((left + pw // 2 - 25, top + ph + 30), "iteration", fill="black", font=font)
    draw.text((6, top + ph // 2 - 6), "reward", fill="black", font=font)

    finite = [v for v in rewards if v is not None and math.isfinite(v)]
    n = len(rewards)
    if not finite:
        draw.text((left + 10, top + 10), "no finite rewards yet", fill="gray", font=font)
        if not series:
            return img
        lo, hi = 0.0, 1.0
    else:
        lo, hi = min(finite), max(finite)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    # x of update u: rewards[i] is update i + 1; with held-out figures update 0 takes one more slot.
    off = 1 if series else 0
    x_max = max([n] + [int(e["iteration"]) for e in evaluations])

    def xu(u):
        return left + (pw * ((u - 1 + off) / max(1, x_max - 1 + off)))

    def xy(i, v):
        x = xu(i + 1)
        y = top + ph * (1 - (v - lo) / (hi - lo))
        return x, y

    if finite:
        for t in _ticks(lo, hi):
            _, y = xy(0, t)
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((4, y - 6), f"{t:.4g}", fill="black", font=font)
    if not series:
        for i in sorted({0, n - 1} | {round(k * (n - 1) / 4) for k in range(5)}):
            x, _ = xy(i, lo)
            draw.line([x, top + ph, x, top + ph + 4], fill="black")
            draw.text((x - 6, top + ph + 6), str(i + 1), fill="black", font=font)
    else:
        step = _nice_step(x_max / 4)
        for u in sorted({0, x_max} | set(range(0, x_max, step))):
            if 0 < x_max - u < step / 2:  # too close to the last tick
                continue
            x = xu(u)
            draw.line([x, top + ph, x, top + ph + 4], fill="black")
            draw.text((x - 6, top + ph + 6), str(u), fill="black", font=font)

    for values, colour, w in ((list(rewards), (70, 110, 220), 1),
                              (moving_average(rewards, window), (240, 140, 20), 2)):
        pts = []
        for i, v in enumerate(values):
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
    if series:
        _draw_heldout(draw, font, heldout, series, evaluations, xu, left, top, pw, ph)
    draw.text((left + pw - 150, top + 6), f"-- reward  -- mean of {window}", fill="black", font=font)
    return img


def _draw_heldout(draw, font, heldout, series, evaluations, xu, left, top, pw, ph) -> None:
    best = heldout.get("best_iteration")
    if _finite(best):
        ranking = next((s for s in series if s[0] == heldout.get("ranking")), series[0])
        best_x = round(xu(best))
        draw.line([best_x, top + 1, best_x, top + ph - 1], fill=ranking[3], width=2)
    spread = (xu(evaluations[-1]["iteration"]) - xu(evaluations[0]["iteration"])) / (len(evaluations) - 1) \
        if len(evaluations) > 1 else pw
    for key, _, _, colour in series:
        points = [(e["iteration"], (e.get("figures") or {}).get(key)) for e in evaluations]
        values = [v for _, v in points if _finite(v)]
        if not values:
            continue
        lo, hi = min(values), max(values)
        span = hi - lo if hi - lo > 1e-12 else 0.0

        def y_of(v):
            return top + ph * (1 - (0.05 + 0.9 * ((v - lo) / span if span else 0.5)))

        run = []
        for u, v in points + [(None, None)]:
            if _finite(v):
                run.append((xu(u), y_of(v)))
                continue
            if len(run) > 1:
                _dashed(draw, run, colour, 2)
            run = []
        if spread >= 7 or len(values) == 1:
            for u, v in points:
                if _finite(v):
                    x, y = xu(u), y_of(v)
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    if _finite(best):  # its label above the plot, where it hides no point
        label = f"best: update {int(best)}"
        tw = draw.textlength(label, font=font)
        lx = best_x + 4 if best_x + 4 + tw <= left + pw + 15 else best_x - 4 - tw
        draw.line([best_x, top - BEST_ROW + 2, best_x, top], fill=ranking[3], width=2)
        draw.text((lx, top - BEST_ROW + 1), label, fill=ranking[3], font=font)

    # legend: under the axis, one row per series with its last value
    y = top + ph + 46
    last = evaluations[-1]["iteration"] if evaluations else None
    heading = "held-out (dashed, each scaled to its own range)" + (
        f"; last: update {int(last)}" if last is not None else "; no evaluation yet")
    draw.text((left, y), heading, fill=(90, 90, 90), font=font)
    for key, label, kind, colour in series:
        y += LEGEND_ROW
        _dashed(draw, [(left, y + 6), (left + 20, y + 6)], colour, 2, dash=5, gap=3)
        draw.ellipse([left + 7, y + 3, left + 13, y + 9], fill=colour)
        value = next((e["figures"][key] for e in reversed(evaluations)
                      if _finite((e.get("figures") or {}).get(key))), None)
        text = f"{label}{' (lower is better)' if kind == 'similarity' else ''}: " + (
            f"{value:.4g}" if value is not None else "-")
        draw.text((left + 26, y), text, fill="black", font=font)
