"""LoRA files in ComfyUI's ``models/loras``: safe paths, saving, resume.

The file formats live in ``training/``: kohya keys with diffusers module names and metadata
(``lora_file.py``), the diffusers folder (``lora_diffusers.py``), the optimizer side file
(``lora_resume.py``); this module adds ComfyUI's folders and model objects.
"""
from __future__ import annotations

import datetime
import hashlib
import os

import torch

import folder_paths

from ..training import lora_diffusers, lora_file, lora_resume, safe_files
from ..training.lora import LoRADelta, LoRASet
from .lora_keys import diffusers_folder_facts, lora_file_facts


class DraftLoRA(dict):
    """ComfyUI's ``LORA_MODEL`` (a dict of ``diffusion_model.<name>.lora_up.weight`` ... tensors,
    usable by the stock LoraModelLoader) that also carries what a portable export needs."""

    def __init__(self, sd, lora_set=None, facts=None, metadata=None, diffusers=None):
        super().__init__(sd)
        self.lora_set = lora_set
        self.facts = facts  # lora_keys.lora_file_facts of the model it was trained on
        self.metadata = metadata or {}
        self.diffusers = diffusers  # lora_keys.diffusers_folder_facts of that model (or None)


# -- paths ----------------------------------------------------------------------------------------
def loras_root() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def safe_lora_path(prefix: str, suffix: str) -> str:
    """``<loras>/<prefix><suffix>``, refusing anything that would land outside models/loras."""
    prefix = (prefix or "").replace("\\", "/").strip()
    if not prefix:
        raise ValueError("the LoRA file name is empty")
    parts = prefix.split("/")
    if prefix.startswith("/") or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"LoRA name {prefix!r} must be a plain name inside models/loras "
                         "(sub-folders allowed; no absolute paths, '..' or empty parts)")
    problem = safe_files.portable_name_problem(prefix)
    if problem:
        raise ValueError(f"LoRA name {prefix!r}: {problem}; choose another name (letters, digits, "
                         "'-', '_', '.', sub-folders with '/')")
    root = os.path.realpath(loras_root())
    path = os.path.realpath(os.path.join(root, *parts[:-1], parts[-1] + suffix))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"LoRA name {prefix!r} resolves outside models/loras")
    return path


def next_free_path(prefix: str, ext: str = ".safetensors") -> str:
    """``<prefix>_00001_<ext>``, the first counter not taken (files are never overwritten)."""
    for counter in range(1, 100000):
        path = safe_lora_path(prefix, f"_{counter:05d}_{ext}")
        if not os.path.exists(path):
            return path
    raise RuntimeError(f"no free file name for {prefix!r}")


def relative_to_loras(path: str) -> str:
    return os.path.relpath(path, os.path.realpath(loras_root())).replace(os.sep, "/")


def resume_choices() -> list:
    return ["none", *folder_paths.get_filename_list("loras")]


def file_fingerprint(name) -> str:
    if not name or name == "none":
        return "none"
    path = folder_paths.get_full_path("loras", name)
    if not path or not os.path.exists(path):
        return f"missing:{name}"
    st = os.stat(path)
    return f"{name}:{st.st_size}:{st.st_mtime_ns}"


# -- model facts ------------------------------------------------------------------------------
def base_fingerprint(model) -> str:
    """A cheap fingerprint of the base UNet's weights (sha256 over a sample of every 16th tensor);
    ComfyUI's MODEL does not know which file it came from."""
    h = hashlib.sha256()
    sd = model.model.diffusion_model.state_dict()
    for i, (k, v) in enumerate(sd.items()):
        if i % 16 == 0:
            h.update(k.encode())
            h.update(v.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _metadata(meta: dict, model, partial: bool, title: str) -> dict:
    out = {f"draft_{k}": v for k, v in meta.items()}
    out["draft_partial"] = partial
    if model is not None and "base_model_fingerprint" not in meta:
        out["draft_base_model_fingerprint"] = base_fingerprint(model)
    out["modelspec.title"] = title
    out["modelspec.date"] = datetime.datetime.now().isoformat(timespec="seconds")
    return out


# -- saving -----------------------------------------------------------------------------------
def save_training_lora(prefix: str, tag: str, lora: LoRASet, model, meta: dict, trainer=None) -> str:
    """Periodic/partial save from the trainer: ``<prefix>_<tag>.safetensors`` plus the optimizer
    side file; returns the absolute path. An existing file of that name is replaced atomically."""
    path = safe_lora_path(prefix, f"_{tag}.safetensors")
    partial = bool(meta.get("partial", True))
    metadata = _metadata(meta, model, partial, os.path.basename(path))
    lora_file.save_kohya(path, lora, metadata=metadata, dtype=torch.float32, overwrite=True,
                         **lora_file_facts(model))
    if trainer is not None:
        lora_resume.save_training_state(lora_resume.state_path_for(path), trainer.state_dict(),
                                        lora, optimizer=trainer.optimizer)
    return path


def lora_set_from_comfy_dict(sd: dict, diffusion_model) -> LoRASet:
    """Rebuild a LoRASet from ComfyUI's ``diffusion_model.<name>.lora_up.weight`` dict (e.g. from
    ComfyUI's own Train LoRA node); weight shapes come from ``diffusion_model``. Keys of other kinds
    (bias or full-weight diffs) cannot be written as a kohya LoRA: refused, never dropped."""
    modules = dict(diffusion_model.named_modules())
    lora, used = LoRASet(), set()
    for key in sorted(sd):
        if not key.endswith(".lora_up.weight"):
            continue
        stem = key[: -len(".lora_up.weight")]
        name = stem[len("diffusion_model."):] if stem.startswith("diffusion_model.") else None
        if name not in modules:
            raise ValueError(f"LoRA key {key!r} names no layer of this model's UNet")
        up, down = sd[key], sd[f"{stem}.lora_down.weight"]
        rank = up.shape[1]
        alpha = float(sd[f"{stem}.alpha"]) if f"{stem}.alpha" in sd else float(rank)
        delta = LoRADelta(modules[name].weight.shape, rank, alpha)
        with torch.no_grad():
            delta.up.copy_(up.reshape(delta.up.shape))
            delta.down.copy_(down.reshape(delta.down.shape))
        lora.add(name, delta)
        used |= {key, f"{stem}.lora_down.weight", f"{stem}.alpha"}
    other = sorted(set(sd) - used)
    if other:
        raise ValueError(f"this LoRA has {len(other)} weights that are not plain LoRA factors "
                         f"(e.g. {other[:3]}); they cannot be saved in the portable kohya format")
    if not len(lora):
        raise ValueError("this LORA_MODEL holds no lora_up/lora_down UNet weights")
    return lora


def save_final(lora_dict, prefix: str, precision: str, also_diffusers: bool, model=None) -> str:
    """Save LoRA node: a new file ``<prefix>_NNNNN_.safetensors``; returns it relative to loras."""
    facts = getattr(lora_dict, "facts", None)
    lora = getattr(lora_dict, "lora_set", None)
    folder = getattr(lora_dict, "diffusers", None)
    if lora is None or facts is None:
        if model is None:
            raise ValueError("this LoRA did not come from DRaFT Trainer: connect the model it was "
                             "trained on to Save LoRA's 'model' input so module names can be mapped")
        facts = lora_file_facts(model)
        lora = lora_set_from_comfy_dict(lora_dict, model.model.diffusion_model)
        folder = None
    if also_diffusers and folder is None:
        folder = diffusers_folder_facts(model) if model is not None else (
            {"name_map": facts["name_map"], "prefix": "unet"} if facts.get("name_map") else None)
        if folder is None:
            raise ValueError("no diffusers/PEFT layout for this model family (available for SD "
                             "UNets, FLUX.1 and SD3); switch also_diffusers_folder off")
    path = next_free_path(prefix)
    meta = dict(getattr(lora_dict, "metadata", {}) or {})
    metadata = _metadata(meta, model, bool(meta.get("partial", False)), os.path.basename(path))
    lora_file.save_kohya(path, lora, metadata=metadata,
                         dtype=torch.float16 if precision == "fp16" else torch.float32, **facts)
    if also_diffusers:
        lora_diffusers.save_diffusers_folder(path[: -len(".safetensors")] + "_diffusers", lora,
                                             folder["name_map"], metadata=metadata,
                                             prefix=folder["prefix"])
    return relative_to_loras(path)


def load_for_resume(name: str, diffusion_model, names, model):
    """(LoRASet over ``names`` in their order, trainer state or None) from a file in models/loras.

    The file must hold exactly the target layers (strict: a LoRA of other targets or another
    architecture is refused). Optimizer state (our side file) is restored when it is there;
    without it, :func:`state_from_metadata` continues the step count with a fresh optimizer.
    """
    path = folder_paths.get_full_path("loras", name)
    if not path:
        raise FileNotFoundError(f"resume LoRA {name!r} not found in {loras_root()}")
    modules = dict(diffusion_model.named_modules())
    shapes = {n: tuple(modules[n].weight.shape) for n in names}
    lora = lora_file.load_kohya(path, lora_file_facts(model)["name_map"], shapes)
    state_file = lora_resume.state_path_for(path)
    if os.path.exists(state_file):
        return lora, lora_resume.load_training_state(state_file, lora)
    return lora, state_from_metadata(path)


def state_from_metadata(path: str) -> dict:
    """Trainer state for a LoRA without its side file: the step count its metadata records
    (``draft_iteration``; 0 for a file from another trainer), no optimizer state (a fresh AdamW),
    unknown (NaN) rewards for the earlier updates. ``"fresh_optimizer": True`` marks it."""
    from safetensors import safe_open
    with safe_open(path, "pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
    try:
        done = max(0, int(meta.get("draft_iteration", "0")))
        skipped = max(0, int(meta.get("draft_skipped_steps", "0")))
    except ValueError:
        done, skipped = 0, 0
    return {"iteration": done, "skipped_steps": skipped, "history": [float("nan")] * done,
            "optimizer": None, "scaler": None, "fresh_optimizer": True}
