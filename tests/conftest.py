"""Shared test settings.

The repository root is on ``sys.path`` (pytest ``pythonpath``), so tests import ``training`` and
``reward_models`` as top-level packages. Tests marked ``comfyui`` need a ComfyUI checkout named by
``COMFYUI_PATH``; tests marked ``browser`` also need Chromium. Without them they are skipped with a
one-line reason. Tests marked ``kohya`` / ``musubi`` import kohya-ss sd-scripts / musubi-tuner
code from the checkouts named by ``KOHYA_SD_SCRIPTS_PATH`` / ``MUSUBI_TUNER_PATH`` (skipped without).
``make test`` finds or clones all three (tools/test_sources.py). In CI (``CI=true``) nothing is
skipped for a missing dependency: such a test fails, naming what is missing. The run ends with one
line per tier (browser, kohya, musubi, distributed, comfyui, cpu) counting its outcomes.
"""
import os
import shutil
import sys

import pytest

from tools.test_sources import in_ci  # CI runs every tier: a test missing a dependency fails there


def comfyui_path():
    """The ComfyUI checkout to test against, or None."""
    path = os.environ.get("COMFYUI_PATH")
    if path and os.path.isfile(os.path.join(path, "main.py")):
        return os.path.abspath(path)
    # Installed as custom_nodes/<pack> inside a ComfyUI tree.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = os.path.dirname(os.path.dirname(here))
    if os.path.basename(os.path.dirname(here)) == "custom_nodes" and os.path.isfile(os.path.join(parent, "main.py")):
        return parent
    return None


def import_comfy():
    """Put ``$COMFYUI_PATH`` on sys.path and import the comfy modules the tests use (CPU)."""
    path = comfyui_path()
    if path is None:
        raise RuntimeError("ComfyUI not found: set COMFYUI_PATH")
    if path not in sys.path:
        sys.path.insert(0, path)
    import torch
    from comfy.cli_args import args
    if not torch.cuda.is_available():
        args.cpu = True
    import comfy.lora  # noqa: F401
    import comfy.model_base  # noqa: F401
    import comfy.model_detection  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.ops  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.supported_models  # noqa: F401
    import comfy.utils  # noqa: F401
    return sys.modules["comfy"]


def kohya_sd_scripts_path():
    """The kohya-ss/sd-scripts checkout named by ``KOHYA_SD_SCRIPTS_PATH``, or None."""
    path = os.environ.get("KOHYA_SD_SCRIPTS_PATH")
    if path and os.path.isfile(os.path.join(path, "networks", "lora_flux.py")):
        return os.path.abspath(path)
    return None


def musubi_tuner_path():
    """The ``src`` folder of the kohya-ss/musubi-tuner checkout named by ``MUSUBI_TUNER_PATH``
    (the checkout's root or its ``src``), or None."""
    path = os.environ.get("MUSUBI_TUNER_PATH")
    for src in ((os.path.join(path, "src"), path) if path else ()):
        if os.path.isfile(os.path.join(src, "musubi_tuner", "networks", "lora_qwen_image.py")):
            return os.path.abspath(src)
    return None


def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Each test belongs to one tier, the first of these whose marker it carries ("cpu" otherwise).
TIERS = ("browser", "kohya", "musubi", "distributed", "comfyui")
_TIER_OF: dict = {}  # test node id -> its tier


def tier_of(item) -> str:
    return next((t for t in TIERS if item.get_closest_marker(t)), "cpu")


def missing_dependency(item, comfy, chromium, kohya, musubi):
    """Why ``item`` cannot run on this machine (a missing checkout or browser), or None."""
    if item.get_closest_marker("comfyui") and comfy is None:
        return "ComfyUI not found: set COMFYUI_PATH to a ComfyUI 0.3.64+ checkout (or let make test clone one)"
    if item.get_closest_marker("browser") and chromium is None:
        return "Chromium not found: apt-get install chromium"
    if item.get_closest_marker("kohya") and kohya is None:
        return "kohya sd-scripts not found: set KOHYA_SD_SCRIPTS_PATH to a checkout (or let make test clone one)"
    if item.get_closest_marker("musubi") and musubi is None:
        return "musubi-tuner not found: set MUSUBI_TUNER_PATH to a checkout (or let make test clone one)"
    return None


def pytest_collection_modifyitems(config, items):
    found = comfyui_path(), chromium_path(), kohya_sd_scripts_path(), musubi_tuner_path()
    ci = in_ci()
    for item in items:
        _TIER_OF[item.nodeid] = tier_of(item)
        reason = missing_dependency(item, *found)
        if reason and ci:
            item.add_marker(pytest.mark.draft_missing(reason))
        elif reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("draft_missing")
    if marker is not None:
        pytest.fail(f"CI runs every tier, but {marker.args[0]}", pytrace=False)


_TIER_COUNTS: dict = {}  # tier -> {outcome: number of tests}


def pytest_runtest_logreport(report):
    """Counts each test once: its call's outcome, or its set-up's when that did not pass, plus a
    teardown error."""
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = "error" if report.when == "setup" and report.failed else report.outcome
    elif report.when == "teardown" and report.failed:
        outcome = "error"
    else:
        return
    tier = _TIER_COUNTS.setdefault(_TIER_OF.get(report.nodeid, "cpu"), {})
    tier[outcome] = tier.get(outcome, 0) + 1


def pytest_terminal_summary(terminalreporter):
    """One line per tier: how many of its tests passed, failed, errored and were skipped."""
    if not _TIER_COUNTS:
        return
    terminalreporter.section("tiers")
    for tier in (*TIERS, "cpu"):
        if tier in _TIER_COUNTS:
            terminalreporter.write_line(f"{tier}: " + ", ".join(
                f"{n} {outcome}" for outcome, n in sorted(_TIER_COUNTS[tier].items())))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    import torch
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: as fast, and immune to a busy CPU (two
    OpenMP threads on a shared 2-core machine spin against each other). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def loras_dir(tmp_path, monkeypatch):
    """A temporary, empty ``models/loras`` folder that ComfyUI's ``folder_paths`` lists (and
    DRaFT Save LoRA writes to) for one test; ComfyUI is imported first."""
    import_comfy()
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    folder_paths.filename_list_cache.clear()
    yield tmp_path
    folder_paths.filename_list_cache.clear()
