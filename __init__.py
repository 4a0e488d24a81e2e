"""ComfyUI-DRaFT: Direct Reward Fine-Tuning (arXiv 2309.17400) as ComfyUI nodes.

ComfyUI imports this folder as a package (under whatever folder name it was cloned to) and calls
``comfy_entrypoint`` (V3 node API, ComfyUI >= 0.3.64). ``WEB_DIRECTORY`` serves the frontend
extension (the live reward chart on the trainer node).

Outside ComfyUI (tests, tools) nothing here is needed: the engine lives in ``training/`` and the
rewards in ``reward_models/``, both importable without ComfyUI.
"""
WEB_DIRECTORY = "./web"

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # imported by a tool outside ComfyUI: expose no nodes
    __all__ = ["WEB_DIRECTORY"]
else:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
