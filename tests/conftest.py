"""Shared test settings.

The repository root is on ``sys.path`` (pytest ``pythonpath``), so tests import ``training`` and
``reward_models`` as top-level packages. Tests marked ``comfyui`` need a ComfyUI checkout named by
``COMFYUI_PATH``; tests marked ``browser`` also need Chromium. Without them they are skipped with a
one-line reason.
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
    for item in items:
        if "comfyui" in item.keywords and comfy is None:
            item.add_marker(skip_comfy)
        if "browser" in item.keywords and (comfy is None or chromium is None):
            item.add_marker(skip_browser)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    import torch
    torch.manual_seed(0)
    yield
