"""``make fidelity`` keeps working: the whole pipeline (denoiser and classifier training on the
real digits, every DRaFT method through the engine's sampler and trainer, gradient variance and
norm, DRaFT-LV's variance given the chain, strength sweep, long runs and the KL sweep, the
held-out check beside every run, plots, docs) at a tiny budget.

The real figures come from ``make fidelity`` (docs/fidelity.md); this checks the wiring, that
every method's LoRA moves the held-out reward, and the shape of the final JSON line."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = ("draft_full", "draft_k1", "draft_k5", "draft_k10", "draft_lv2", "random_k")
CLAIMS = ("small_k_beats_full", "lv_lower_variance", "lv_fewer_updates", "strength_interpolates",
          "long_runs_exploit", "kl_reduces_exploitation", "heldout_keeps_best",
          "kl_curbs_at_equal_reward", "lv_conditional_variance")


@pytest.mark.slow
def test_fidelity_pipeline_tiny_budget(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, "-m", "tools.measure.fidelity.run", "--tiny", "--out", str(out),
           "--cache", str(cache)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    assert set(summary["reward_after"]) == set(METHODS)
    for m in METHODS:  # every method's LoRA changed the samples of the held-out seeds
        assert summary["reward_after"][m]["mean"] != summary["reward_before"], m
    assert set(summary["grad_variance"]) == {"draft_k1", "draft_lv2", "draft_lv4"}
    assert all(v["trace_var"] > 0 for v in summary["grad_variance"].values())
    assert all(v["mean"] > 0 for v in summary["grad_norm_by_k"].values())
    sweep = summary["strength_sweep"]
    assert set(sweep) == {"0", "0.25", "0.5", "1", "1.5"}
    # strength 0 is the base model exactly: same held-out seeds, same reward
    assert sweep["0"]["reward"] == pytest.approx(summary["reward_before"], abs=1e-4)
    # the held-out check ran beside every run: kept, best and last judged fractions, stop replay
    held = summary["heldout"]
    assert set(held) == set(METHODS) | {"long_runs"}
    for m in METHODS:
        d = held[m]
        assert len(d["kept_update"]) == len(d["stop_update"]) == 2  # the tiny budget's 2 seeds
        assert all(u in (0, 1, 2) for u in d["kept_update"])
        assert 0 <= d["kept_frac"] <= d["best_frac"] <= 1 and d["last_frac"] <= d["best_frac"]
        assert all(0 <= s <= 2 for s in d["saved_updates"])
    assert set(held["long_runs"]) == {"0", "0.1", "1"}
    # the KL sweep: every coefficient, no KL always compared at the common level
    kl = summary["kl_sweep"]
    assert set(kl["coeffs"]) == {"0", "0.1", "1"}
    assert kl["coeffs"]["0"]["compared"]
    assert kl["coeffs"]["0"]["at_level"]["reward"] == pytest.approx(kl["level"], abs=1e-3)
    # LV given the chain: DRaFT-1 has no re-noising, so its gradient does not vary at all
    cv = summary["lv_conditional_variance"]
    assert set(cv) == {"draft_k1", "draft_lv1", "draft_lv2", "draft_lv4"}
    assert cv["draft_k1"]["cond_var"] == 0
    assert all(cv[f"draft_lv{n}"]["cond_var"] > 0 for n in (1, 2, 4))
    assert set(summary["claims"]) == set(CLAIMS)
    assert set(summary["claims"].values()) <= {"held", "not", "unclear"}

    doc = (out / "fidelity.md").read_text()
    for png in ("reward_vs_updates.png", "reward_vs_time.png", "grad_variance.png",
                "grad_norm_by_k.png", "strength_sweep.png", "hacking.png", "heldout.png",
                "samples_base.png",
                "samples_methods.png", "samples_strengths.png", "samples_long_runs.png"):
        assert (out / "fidelity" / png).stat().st_size > 0, png
        assert f"fidelity/{png}" in doc, png
    assert sorted(p.name for p in cache.glob("*.pt")) == [
        "denoiser_w32_s8_b16_seed0.pt", "judge_clf_s10_seed2.pt", "reward_clf_s10_seed1.pt"]

    # the report re-renders from the saved results without training
    from tools.measure.fidelity.run import main
    (out / "fidelity.md").unlink()
    assert main(["--redoc", "--out", str(out)]) == 0
    assert (out / "fidelity.md").read_text() == doc

    # a second run takes the models from the cache instead of training them again
    from tools.measure.fidelity.data import splits
    from tools.measure.fidelity.run import TINY, build_models
    *_, seconds, from_cache = build_models(TINY, str(cache), splits(0))
    assert from_cache and all(v > 0 for v in seconds.values())  # the recorded build times
