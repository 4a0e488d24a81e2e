"""``make bench`` keeps working: a miniature run of ``tools.measure.speed.bench`` (4 steps, 64 px,
one round).

The real figures (50 steps, the targets) come from ``make bench`` on an idle machine; this test only
checks that the script runs end to end, prints its JSON summary as the last line, and that the
memory it measures shows what checkpointing is for: without it the differentiated chain holds
activations for every step, with it almost none.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_and_checkpointing_cuts_saved_activations():
    cmd = [sys.executable, "-m", "tools.measure.speed.bench", "--device", "cpu",
           "--steps", "4", "--ks", "1,4", "--resolution", "64", "--cfg", "0", "--reps", "1",
           "--threads", "1", "--no-components", "--timeout", "300", "--no-peers",
           "--only", "sample,k1_ckpt,k4_ckpt,k4_nockpt,lv2_ckpt,k1_lean,lv2_lean,heldout_eval"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    for key in ("peak_mem_ratio_k50_k1", "time_ratio_draft1_vs_sampling",
                "time_ratio_lv2_vs_sampling", "time_ratio_full_vs_sampling"):
        assert isinstance(summary[key], float) and summary[key] > 0, (key, summary[key])
    rows = {row["name"]: row for row in summary["results"]}
    assert not [row for row in rows.values() if "error" in row or "time_error" in row], rows
    # Activations autograd keeps for backward: 4 uncheckpointed steps hold several times what the
    # checkpointed chain holds (its inputs only).
    assert rows["k4_nockpt"]["saved_peak_mib"] > 4 * rows["k4_ckpt"]["saved_peak_mib"], rows
    # The lean settings (block checkpointing, LV copies one at a time) hold less than the fast way.
    assert rows["lv2_lean"]["mem_added_mib"] < rows["lv2_ckpt"]["mem_added_mib"], rows
    assert isinstance(summary["lean_time_ratio_draft1_vs_sampling"], float), summary
    # against the floor (T + 3K)/T of plain sampling: the measured ratio over it
    assert abs(summary["time_ratio_draft1_vs_floor"]
               - rows["k1_ckpt"]["time_ratio_vs_sampling"] / ((4 + 3) / 4)) < 2e-3, summary
    assert abs(summary["time_ratio_full_vs_floor"]
               - rows["k4_ckpt"]["time_ratio_vs_sampling"] / ((4 + 12) / 4)) < 2e-3, summary
    assert "full DRaFT" in proc.stdout and "plain sampling" in proc.stdout
    # the held-out check's evaluation over its 16 plain samples (one per baseline batch of 1)
    assert abs(summary["heldout_check_overhead"]
               - rows["heldout_eval"]["time_ratio_vs_sampling"] / 16) < 2e-3, summary


def test_bench_peers_against_trl_alignprop_runs_and_the_lean_update_holds_less():
    """TRL 0.23.1's AlignProp update beside ours on the same UNet, SD VAE decoder and LoRA (4 steps,
    64 px, one round): both run, and ours (decoder blocks checkpointed) holds less memory."""
    cmd = [sys.executable, "-m", "tools.measure.speed.peers", "--steps", "4",
           "--resolution", "64", "--reps", "1", "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "trl_error" not in out, out
    for key in ("mem_vs_trl_k1", "mem_vs_trl_full", "time_vs_trl_k1", "time_vs_trl_full",
                "auto_time_vs_trl_k1", "auto_time_vs_trl_full", "auto_time_vs_trl_k1_nchw",
                "auto_time_vs_trl_full_nchw", "auto_mem_vs_trl_k1", "auto_mem_vs_trl_full",
                "decode_channels_last_vs_nchw"):
        assert isinstance(out[key], float) and out[key] > 0, (key, out)
        assert "mem" in key or key.startswith("decode") or len(out[f"{key}_rounds"]) == 1
    assert out["mem_vs_trl_k1"] < 1.0 and out["mem_vs_trl_full"] < 1.0, out
    # auto on a roomy device is the fast way: more memory than the middle way, which is leaner
    for which in ("k1", "full"):
        assert out[f"auto_{which}_peak_mib"] > out[f"ours_{which}_peak_mib"], out
    assert "COMFYUI_PATH" in out["ksampler_error"]
