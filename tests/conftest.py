"""Shared test settings.

The repository root is on ``sys.path`` (pytest ``pythonpath``), so tests import ``training`` and
``reward_models`` as top-level packages. Tests marked ``comfyui`` need a ComfyUI checkout named by
``COMFYUI_PATH``; tests marked ``browser`` also need Chromium. Without them they are skipped with a
one-line reason. Tests marked ``kohya`` / ``musubi`` import kohya-ss sd-scripts / musubi-tuner
code from the checkouts named by ``KOHYA_SD_SCRIPTS_PATH`` / ``MUSUBI_TUNER_PATH`` (skipped without).
"""
import os
import shutil

import pytest


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


def pytest_collection_modifyitems(config, items):
    comfy = comfyui_path()
    chromium = chromium_path()
    skip_comfy = pytest.mark.skip(reason="ComfyUI not found: set COMFYUI_PATH to a ComfyUI 0.3.64+ checkout")
    skip_browser = pytest.mark.skip(reason="Chromium not found: apt-get install chromium (and set COMFYUI_PATH)")
    skip_kohya = pytest.mark.skip(reason="kohya sd-scripts not found: set KOHYA_SD_SCRIPTS_PATH to a checkout")
    skip_musubi = pytest.mark.skip(reason="musubi-tuner not found: set MUSUBI_TUNER_PATH to a checkout")
    kohya, musubi = kohya_sd_scripts_path(), musubi_tuner_path()
    for item in items:
        if "comfyui" in item.keywords and comfy is None:
            item.add_marker(skip_comfy)
        if "browser" in item.keywords and (comfy is None or chromium is None):
            item.add_marker(skip_browser)
        if item.get_closest_marker("kohya") and kohya is None:
            item.add_marker(skip_kohya)
        if item.get_closest_marker("musubi") and musubi is None:
            item.add_marker(skip_musubi)


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
    from lora_fixtures import import_comfy
    import_comfy()
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    folder_paths.filename_list_cache.clear()
    yield tmp_path
    folder_paths.filename_list_cache.clear()
