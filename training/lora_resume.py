"""The resume side file: optimizer state and step count beside a LoRA file.

``<name>.safetensors`` (the LoRA, :mod:`training.lora_file`) gets ``<name>.draft_state`` beside it: a
safetensors file (an extension ComfyUI does not list among LoRAs) holding

* tensors ``optimizer/<param name>/<state key>``, e.g. ``optimizer/input_blocks.1.1.proj_in.down/exp_avg``
  (AdamW: ``exp_avg`` and ``exp_avg_sq``, shaped like the parameter, float32; ``step``, 0-dim) where
  the parameter names are ``<ldm module>.down`` / ``<ldm module>.up`` in
  ``LoRASet.trainable_parameters()`` order (the order the trainer built its optimizer with);
* metadata (strings, JSON where structured): ``draft_state.format``, ``draft_state.step`` (the
  trainer's ``iteration``), ``draft_state.param_names``, ``draft_state.param_shapes``,
  ``draft_state.param_groups`` (hyper-parameters: lr, betas, eps, weight_decay, ...; each group's
  parameters by name), ``draft_state.scalars`` (non-tensor per-parameter state),
  ``draft_state.extra`` (the rest of the trainer's state: skipped steps, reward history, grad
  scaler, ...) and ``draft_state.lora_digest`` (sha256 of the LoRA factors the state belongs to).

:func:`load_training_state` returns the dict :func:`save_training_state` was given, with the
optimizer's per-parameter state re-indexed for the LoRA it is given (matched by name), ready for
``optimizer.load_state_dict`` / ``DraftTrainer.load_state_dict``: a further AdamW step is then
bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping

import torch

from .lora import LoRASet
from .safe_files import LoRAFileError, atomic_save, read_safetensors

STATE_SUFFIX = ".draft_state"
FORMAT = "comfyui-draft-state/1"
_PREFIX = "draft_state."


def state_path_for(lora_path: str) -> str:
    """The side file beside a LoRA: ``x.safetensors`` -> ``x.draft_state``."""
    stem = lora_path[: -len(".safetensors")] if lora_path.endswith(".safetensors") else lora_path
    return stem + STATE_SUFFIX


def param_names(lora: LoRASet) -> list[str]:
    """``[<module>.down, <module>.up, ...]`` in ``lora.trainable_parameters()`` order."""
    return [f"{name}.{part}" for name, _ in lora.items() for part in ("down", "up")]


def lora_digest(lora: LoRASet) -> str:
    """sha256 over the names, shapes, alphas and float32 bytes of the LoRA factors (in name
    order: the same LoRA in another layer order has the same digest)."""
    h = hashlib.sha256()
    for name, delta in sorted(lora.items(), key=lambda item: item[0]):
        h.update(f"{name}|{delta.weight_shape}|{delta.rank}|{float(delta.alpha)!r}".encode())
        for p in (delta.down, delta.up):
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# -- a JSON codec that keeps tensors, tuples and int dict keys --------------------------------------
def _encode(obj, tensors: dict, where: str):
    if isinstance(obj, torch.Tensor):
        key = f"extra/{where}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj and "__tuple__" not in obj:
            return {k: _encode(v, tensors, f"{where}/{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{where}/k{i}"), _encode(v, tensors, f"{where}/{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {where!r} in a training-state file")


def _decode(obj, tensors: Mapping):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _dumps(obj) -> str:
    return json.dumps(obj, allow_nan=True)  # NaN rewards in a history survive the round trip


# -- save / load ------------------------------------------------------------------------------------
def save_training_state(path: str, trainer_state: Mapping, lora: LoRASet, *,
                        optimizer: torch.optim.Optimizer | None = None, overwrite: bool = True) -> str:
    """Write the trainer's resume state beside its LoRA (atomically); returns ``path``.

    Args:
        trainer_state: ``{"iteration": int, "optimizer": optimizer.state_dict(), ...}`` as
            ``DraftTrainer.state_dict()`` returns (other entries: numbers, strings, lists, dicts,
            tensors).
        lora: the LoRA being trained (names and shapes of the optimizer's parameters).
        optimizer: the optimizer itself, to match its parameters to LoRA names by identity.
            Without it, the optimizer's parameters (group after group) must be
            ``lora.trainable_parameters()`` in that order, as DraftTrainer builds it (shapes are
            checked).
    """
    names = param_names(lora)
    shapes = [list(p.shape) for p in lora.trainable_parameters()]
    if "iteration" not in trainer_state:
        raise ValueError("trainer_state needs the step count under 'iteration'")
    tensors: dict = {}
    scalars: dict = {}
    groups = []
    opt = trainer_state.get("optimizer")
    if opt is not None:
        indices = [i for g in opt["param_groups"] for i in g["params"]]
        if sorted(indices) != list(range(len(names))):
            raise ValueError(f"the optimizer has {len(indices)} parameters, the LoRA {len(names)}: "
                             "build it on lora.trainable_parameters()")
        chain = names
        if optimizer is not None:
            name_of = {id(p): n for n, p in zip(names, lora.trainable_parameters())}
            chain = [name_of.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
            if None in chain or len(chain) != len(indices):
                raise ValueError("the optimizer holds parameters that are not this LoRA's factors")
        name_of_index = dict(zip(indices, chain))  # state_dict numbers parameters group after group
        shape_of = dict(zip(names, shapes))
        for index, state in opt["state"].items():
            pname = name_of_index[int(index)]
            shape = shape_of[pname]
            for k, v in state.items():
                if torch.is_tensor(v):
                    if v.ndim and list(v.shape) != shape:
                        raise ValueError(f"optimizer state {k!r} of {pname} has shape "
                                         f"{tuple(v.shape)}, the parameter {tuple(shape)}")
                    tensors[f"optimizer/{pname}/{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars.setdefault(pname, {})[k] = _encode(v, tensors, f"scalars/{pname}/{k}")
        for gi, g in enumerate(opt["param_groups"]):
            hyper = {k: _encode(v, tensors, f"group{gi}/{k}") for k, v in g.items() if k != "params"}
            groups.append({"hyper": hyper, "params": [name_of_index[i] for i in g["params"]]})
    extra = {k: v for k, v in trainer_state.items() if k not in ("optimizer", "iteration")}
    meta = {
        _PREFIX + "format": FORMAT,
        _PREFIX + "step": str(int(trainer_state["iteration"])),
        _PREFIX + "param_names": _dumps(names),
        _PREFIX + "param_shapes": _dumps(shapes),
        _PREFIX + "has_optimizer": "true" if opt is not None else "false",
        _PREFIX + "param_groups": _dumps(groups),
        _PREFIX + "scalars": _dumps(scalars),
        _PREFIX + "extra": _dumps(_encode(extra, tensors, "extra")),
        _PREFIX + "lora_digest": lora_digest(lora),
    }
    return atomic_save(tensors, path, meta, overwrite)


def load_training_state(path: str, lora: LoRASet, *, check_weights: bool = True) -> dict:
    """The trainer state saved by :func:`save_training_state`, checked against ``lora``.

    The optimizer's per-parameter state is matched by parameter name and re-indexed in ``lora``'s
    order. ``check_weights`` also requires ``lora``'s factors to be bit-identical to those the state
    was saved with (a LoRA file replaced since, or re-saved in float16, would not resume exactly).

    Raises:
        LoRAFileError: unreadable/truncated file, not a state file, other layers or ranks, weights
            that differ (``check_weights``).
    """
    file = os.path.basename(path)
    tensors, meta = read_safetensors(path)
    if meta.get(_PREFIX + "format") != FORMAT:
        raise LoRAFileError(f"{file} is not a DRaFT training-state file "
                            f"(format {meta.get(_PREFIX + 'format')!r}, expected {FORMAT!r})")
    try:
        saved_names = json.loads(meta[_PREFIX + "param_names"])
        saved_shapes = json.loads(meta[_PREFIX + "param_shapes"])
        groups = json.loads(meta[_PREFIX + "param_groups"])
        scalars = json.loads(meta[_PREFIX + "scalars"])
        extra = _decode(json.loads(meta[_PREFIX + "extra"]), tensors)
        step = int(meta[_PREFIX + "step"])
    except (KeyError, ValueError) as e:
        raise LoRAFileError(f"{file}: damaged training-state metadata ({e})") from e

    names = param_names(lora)
    shapes = dict(zip(names, (list(p.shape) for p in lora.trainable_parameters())))
    saved = dict(zip(saved_names, saved_shapes))
    if set(saved) != set(names) or any(saved[n] != shapes[n] for n in names):
        missing = sorted(set(names) - set(saved))[:3]
        extra_names = sorted(set(saved) - set(names))[:3]
        wrong = [n for n in names if n in saved and saved[n] != shapes[n]][:3]
        raise LoRAFileError(
            f"{file} was saved for other LoRA layers or ranks; it cannot resume this LoRA "
            f"(not in the file: {missing}, not in the LoRA: {extra_names}, other shapes: {wrong})")
    if check_weights and meta.get(_PREFIX + "lora_digest") != lora_digest(lora):
        raise LoRAFileError(
            f"{file}: the LoRA weights differ from those this optimizer state was saved with (the "
            "LoRA file was replaced or re-saved in float16 since); delete the side file to resume "
            "without optimizer state")

    index = {n: i for i, n in enumerate(names)}
    state: dict = {}
    for key, value in tensors.items():
        if not key.startswith("optimizer/"):
            continue
        pname, _, k = key[len("optimizer/"):].rpartition("/")
        if pname not in index:
            raise LoRAFileError(f"{file}: optimizer state for unknown parameter {pname!r}")
        if value.ndim and list(value.shape) != shapes[pname]:
            raise LoRAFileError(f"{file}: optimizer state {k!r} of {pname} has shape "
                                f"{tuple(value.shape)}, the parameter {tuple(shapes[pname])}")
        state.setdefault(index[pname], {})[k] = value
    for pname, entries in scalars.items():
        for k, v in entries.items():
            state.setdefault(index[pname], {})[k] = _decode(v, tensors)
    out = dict(extra)
    out["iteration"] = step
    if meta.get(_PREFIX + "has_optimizer") == "true":
        # Each group lists its parameters in the given LoRA's order: an optimizer built on
        # lora.trainable_parameters() (per group, in that order) maps the state back by position.
        param_groups = [dict(_decode(g["hyper"], tensors), params=sorted(index[n] for n in g["params"]))
                        for g in groups]
        out["optimizer"] = {"state": {i: state[i] for i in sorted(state)}, "param_groups": param_groups}
    else:
        out["optimizer"] = None
    return out
