"""``make gpu-check``'s CPU rehearsal (marker ``comfyui``): ``python -m tools.measure.gpu_check
--dry-run`` runs every phase at tiny size (each memory way forced through DRaFT Memory Options,
emulated cards with ``auto``, DRaFT-1 against ComfyUI's KSampler) and writes the JSON and table the
GPU run writes; its own verdicts hold where they mean something at tiny size (the estimate's
headroom does not: ComfyUI's per-family formulas do not describe tiny models). The package check
names what is missing and fails."""
import json
import os
import subprocess
import sys

import pytest

from conftest import comfyui_path

pytestmark = pytest.mark.comfyui

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = {"device", "torch", "comfyui", "rows", "cards", "speed", "verdicts", "seconds"}
WAYS = ("fast", "rows", "decoder", "all")
HOLDS_ON_CPU = ("all_updates_ran", "ways_as_forced", "estimate_is_the_trainers", "cards_no_oom", "cards_fitting_ran",
                "auto_picked_as_estimated", "small_card_refused_before_first_update",
                "speed_measured")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tools.measure.gpu_check", "--dry-run", "--out", str(out),
         "--comfyui", comfyui_path()], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "gpu_check.json") as f:
        report = json.load(f)
    return report, (out / "gpu_check.txt").read_text()


def test_report_has_the_agreed_structure(dry_run):
    report, text = dry_run
    assert set(report) == TOP
    assert report["device"] == "cpu (dry run)" and report["comfyui"] != "unknown"
    assert 0 < report["seconds"] < 120
    for key in HOLDS_ON_CPU + ("estimate_covers_measured", "estimate_within_headroom",
                               "estimate_verdicts_meaningful"):
        assert isinstance(report["verdicts"][key], bool), key
        assert f"{key}: {report['verdicts'][key]}" in text
    assert report["verdicts"]["estimate_verdicts_meaningful"] is False


def test_every_way_of_every_model_and_method_ran_as_forced(dry_run):
    rows = dry_run[0]["rows"]
    assert {(r["model"], r["method"], r["way"]) for r in rows} == {
        (m, k, w) for m in ("sd15_tiny", "sdxl_tiny") for k in ("k1", "lv2") for w in WAYS}
    for r in rows:
        assert r["outcome"] == "ran" and r["plan_as_forced"], r
        assert r["measured_gib"] > 0 and r["estimate_gib"] > 0 and r["seconds"] > 0
        assert r["vram_gib"] is None  # make vram has no tiny rows: the table shows "-"
        assert r["estimate_covers"] == (r["estimate_gib"] >= r["measured_gib"])
    # the meter sees the ways differ: DRaFT-LV's two rows at once peak above one at a time
    for model in ("sd15_tiny", "sdxl_tiny"):
        lv = {r["way"]: r["measured_gib"] for r in rows if r["model"] == model and r["method"] == "lv2"}
        assert lv["fast"] > lv["all"], (model, lv)


def test_cards_pick_the_estimated_way_and_the_smallest_is_refused(dry_run):
    cards = dry_run[0]["cards"]
    assert {c["model"] for c in cards} == {"sd15_tiny", "sdxl_tiny"}
    for model in ("sd15_tiny", "sdxl_tiny"):
        mine = sorted((c for c in cards if c["model"] == model), key=lambda c: -c["card_gib"])
        assert mine[0]["picked"] == "off / all at once"  # the largest card: the fast way
        assert mine[-1]["outcome"] == "refused" and mine[-1]["measured_gib"] is None
        assert "DRaFT update needs about" in mine[-1]["message"]
        assert len({c["picked"] for c in mine}) == len(mine)  # each card a different choice
        for c in mine[:-1]:
            assert c["outcome"] == "ran" and c["picked"] == c["expected"], c


def test_speed_and_the_cpu_verdicts(dry_run):
    report = dry_run[0]
    for name, s in report["speed"].items():
        assert s["draft1_seconds"] > 0 and s["ksampler_seconds"] > 0, name
        assert len(s["draft1_all"]) == len(s["ksampler_all"]) >= 2
    failed = [k for k in HOLDS_ON_CPU if report["verdicts"][k] is not True]
    assert failed == []


def test_package_check_names_what_is_missing(monkeypatch, capsys):
    sys.path.insert(0, REPO)
    from tools.measure import gpu_check
    assert gpu_check.main(["--check-packages"]) == 0
    assert "missing: none" in capsys.readouterr().out
    monkeypatch.setitem(gpu_check.NEEDED, "no_such_module_gpu_check", "no-such-wheel")
    assert gpu_check.main(["--check-packages"]) == 1
    out = capsys.readouterr().out
    assert "no_such_module_gpu_check (pip: no-such-wheel)" in out and "-d .whl no-such-wheel" in out
