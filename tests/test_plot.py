"""training/plot.py: the reward-curve image the trainer outputs, with and without the held-out
check's curves (CPU)."""
import math

import numpy as np
import pytest

from training.plot import HELDOUT_COLOURS, curve_layout, reward_curve_image

SERIES = [{"key": "judge1", "label": "PickScore", "kind": "judge"},
          {"key": "judge2", "label": "HPSv2", "kind": "judge"},
          {"key": "reward", "label": "training reward (aesthetic)", "kind": "reward"},
          {"key": "similarity", "label": "similarity across seeds (pixels)", "kind": "similarity"}]
# PickScore peaks at update 20 and falls to its minimum at 50; similarity rises to its maximum at 50.
FIGURES = {0: {"judge1": 0.200, "judge2": 0.250, "reward": 5.00, "similarity": 0.30},
           10: {"judge1": 0.212, "judge2": 0.260, "reward": 5.20, "similarity": 0.32},
           20: {"judge1": 0.221, "judge2": 0.270, "reward": 5.35, "similarity": 0.36},
           30: {"judge1": 0.214, "judge2": None, "reward": 5.50, "similarity": 0.41},
           40: {"judge1": 0.208, "judge2": 0.270, "reward": 5.60, "similarity": 0.47},
           50: {"judge1": 0.196, "judge2": 0.265, "reward": 5.70, "similarity": 0.52}}
STOP = "judge PickScore fell for 3 evaluations after update 20; kept update 20"
REWARDS = [5.0 + 0.02 * i + 0.05 * math.sin(i) for i in range(1, 51)]
REWARDS[7] = float("nan")


def summary(stop_reason=STOP, best=20):
    return {"series": SERIES, "ranking": "judge1", "best_iteration": best, "best": FIGURES[20],
            "keep": "best", "stop_reason": stop_reason,
            "evaluations": [{"iteration": u, "figures": f} for u, f in FIGURES.items()]}


def count(img, colour, box=None):
    """Pixels of exactly ``colour`` (PIL draws lines without antialiasing) in ``box`` (x0, y0, x1, y1)."""
    a = np.asarray(img if box is None else img.crop(box))
    return int(np.all(a == np.array(colour, dtype=a.dtype), axis=-1).sum())


def reddish(img, box=None):
    """Pixels of red text (antialiased: any shade where red leads by far), as the stop reason's."""
    a = np.asarray(img if box is None else img.crop(box)).astype(int)
    return int((a[..., 0] - np.maximum(a[..., 1], a[..., 2]) > 60).sum())


@pytest.mark.parametrize("rewards", [REWARDS, [0.5], [], [float("nan"), 1.0, 2.0],
                                     [math.sin(i / 50) for i in range(3000)]])
def test_without_heldout_the_image_is_as_before(rewards):
    plain = reward_curve_image(rewards, title="t")
    assert reward_curve_image(rewards, title="t", heldout=None).tobytes() == plain.tobytes()
    assert reward_curve_image(rewards, title="t", heldout={}).tobytes() == plain.tobytes()
    for colour in HELDOUT_COLOURS.values():  # the held-out colours are their own
        assert count(plain, colour) == 0
    assert reddish(plain, (0, 0, plain.width, 30)) == 0
    assert reward_curve_image(rewards, title="t", heldout=summary()).tobytes() != plain.tobytes()


def test_heldout_curves_legend_best_marker_and_stop_reason_are_drawn():
    img = reward_curve_image(REWARDS, title="DRaFT reward: aesthetic", heldout=summary())
    left, top, pw, ph = curve_layout(img.width, img.height, summary())
    assert (img.width, img.height) == (640, 400) and top > 30 and top + ph < 400 - 50 - 5 * 12 + 1
    plot = (left + 1, top + 1, left + pw, top + ph)
    legend = (0, top + ph + 40, img.width, img.height)

    def x_of(u):  # update 0 at the left edge, update u one slot per update (50 updates here)
        return left + pw * u / 50

    def y_of(fraction):  # a series' own min (0) .. max (1)
        return top + ph * (1 - (0.05 + 0.9 * fraction))

    for s in SERIES:
        colour = HELDOUT_COLOURS[s["key"]]
        assert count(img, colour, plot) > 150, s  # its dashed curve and dots
        assert count(img, colour, legend) > 20, s  # its legend swatch

    def near(colour, u, fraction, r=4):
        x, y = x_of(u), y_of(fraction)
        return count(img, colour, (round(x) - r, round(y) - r, round(x) + r + 1, round(y) + r + 1))

    assert near(HELDOUT_COLOURS["judge1"], 50, 0.0) >= 20  # PickScore's minimum, at the bottom
    assert near(HELDOUT_COLOURS["similarity"], 50, 1.0) >= 20  # similarity's maximum, at the top
    assert near(HELDOUT_COLOURS["similarity"], 0, 0.0) >= 20  # update 0, the base model, at the left
    assert near(HELDOUT_COLOURS["judge2"], 30, 0.5, r=8) == 0  # HPSv2 has no figure at update 30

    # The best marker: a full-height line at update 20 in the ranking judge's colour, nowhere else.
    a = np.asarray(img.crop(plot))
    judge = np.all(a == np.array(HELDOUT_COLOURS["judge1"], dtype=a.dtype), axis=-1)
    full = np.nonzero(judge.sum(axis=0) > 0.8 * ph)[0] + plot[0]
    assert len(full) and set(full) <= {round(x_of(20)) - 1, round(x_of(20)), round(x_of(20)) + 1}, full

    # The stop reason, under the title.
    assert reddish(img, (0, 18, img.width, top)) > 50
    quiet = reward_curve_image(REWARDS, title="DRaFT reward: aesthetic", heldout=summary(stop_reason=""))
    assert reddish(quiet, (0, 0, quiet.width, 30)) == 0
    assert curve_layout(640, 400, summary(stop_reason=""))[1] == 30 + 13  # the best label's row
    assert curve_layout(640, 400, summary(stop_reason="", best=None))[1] == 30
    no_best = reward_curve_image(REWARDS, heldout=summary(best=None))
    a = np.asarray(no_best.crop(plot))
    judge = np.all(a == np.array(HELDOUT_COLOURS["judge1"], dtype=a.dtype), axis=-1)
    assert (judge.sum(axis=0) > 0.8 * ph).sum() == 0


def test_heldout_without_rewards_or_series_list_still_draws():
    # The first evaluation (update 0) arrives before any reward; a summary without "series" uses
    # the keys of the figures.
    img = reward_curve_image([], heldout={"evaluations": [{"iteration": 0, "figures": {"judge1": 0.2}}],
                                          "best_iteration": 0, "stop_reason": ""})
    assert count(img, HELDOUT_COLOURS["judge1"]) > 20
    long = reward_curve_image([math.sin(i / 50) for i in range(3000)], heldout={
        "series": SERIES[2:], "best_iteration": 2500, "stop_reason": "",
        "evaluations": [{"iteration": u, "figures": {"reward": math.log(u + 2), "similarity": u / 1e4}}
                        for u in range(0, 3001, 5)]})
    assert count(long, HELDOUT_COLOURS["similarity"]) > 300 and count(long, HELDOUT_COLOURS["reward"]) > 300
