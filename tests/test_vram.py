"""``make vram``: the live-bytes counter agrees on real and fake tensors, and a full-size row runs.

The full table (every model, method, batch and memory mode) takes tens of minutes on 2 cores and
is not run here; this runs its code on one full-size SD1.5 row (fake tensors: seconds of compute).
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_counter_on_fake_tensors_matches_real_tensors_within_2_percent():
    from tools.measure.memory import vram
    result = vram.validate(steps=2)
    for mode, figures in result.items():
        assert figures["real_bytes"] > 100_000, figures
        assert figures["relative_difference"] <= 0.02, (mode, figures)
    # and lean memory is lean on the real tensors too
    assert result["lean"]["real_bytes"] < result["fast"]["real_bytes"]


@pytest.mark.slow
def test_make_vram_smoke_full_size_sd15_row():
    out = subprocess.run(
        [sys.executable, "-m", "tools.measure.memory.vram", "--only", "sd15_512",
         "--methods", "k1", "--batches", "1", "--modes", "lean", "--jobs", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    row = summary["rows"][0]
    # the full-size SD1.5 UNet in half precision: 860 M parameters, 1.6 GiB
    assert 1.55 < row["unet_weights_gib"] < 1.65
    assert 0 < row["peak_update_gib"] < 4
    assert summary["sd15_512_k1_gib"] == pytest.approx(row["total_gib"], abs=1e-3)
