"""Every input of the DRaFT nodes checked before a model is loaded onto the device or an
iteration runs; each problem is reported once, in one sentence that names the input.

Two moments, because of how ComfyUI 0.3.64 validates a prompt (``execution.py``,
``validate_inputs``):

* **When the prompt is queued** (``/prompt``, from the frontend or a script), before anything
  runs. ComfyUI checks each widget against its range and each choice against its list itself,
  *except* for the inputs a node's ``validate_inputs`` declares (all of them when it takes
  ``**kwargs``), and it attaches a failed ``validate_inputs`` to *every* declared input (one
  missing file became 29 red inputs). So each node's ``validate_inputs`` declares exactly the one
  input it checks by itself (:func:`lora_name_check`), and ComfyUI's own range and choice checks
  cover the rest (a ``resume_lora`` no longer in models/loras included), one message per bad input.
* **At the start of the trainer's execute** (:func:`check_trainer`), before prompts are encoded,
  models are loaded to the device or an iteration runs: what needs the connected objects or more
  than one input: the DRaFT Sampler's K against the schedule (steps or SIGMAS), width/height against
  the VAE, the LoRA rank against the layers, the resume file against the model, rank, alpha,
  target modules and iterations, numbers ComfyUI lets through (NaN), and every range once more for
  callers that bypass ``/prompt``. All problems found are raised together in one ValueError, one
  line each.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from comfy_api.latest import io

import folder_paths

from ..training import input_rules
from ..training.lora_io import LoRAFileError
from ..training.prompt_sets import resolve_prompts
from . import comfy_glue, lora_files


class InputError(ValueError):
    """One or more DRaFT node inputs cannot be used; the message names each of them."""


# -- prompt time (validate_inputs) ------------------------------------------------------------------
def name_problem(name) -> Optional[str]:
    """Why ``name`` cannot be a file prefix inside models/loras, or None (no file is touched)."""
    try:
        lora_files.safe_lora_path(name if isinstance(name, str) else "", ".safetensors")
    except ValueError as e:
        return str(e)
    return None


def lora_name_check(name):
    """``validate_inputs`` result for a LoRA file prefix input: True, or the reason."""
    return name_problem(name) or True


# -- execute time -----------------------------------------------------------------------------------
def _schema_problems(node_cls, values: dict) -> list:
    """``(input, problem)`` for values outside the widget's range or choices, or not finite."""
    problems = []
    for inp in node_cls.define_schema().inputs:
        name = inp.id
        if name not in values or values[name] is None:
            continue
        v = values[name]
        if isinstance(inp, (io.Int.Input, io.Float.Input)):
            bad = input_rules.not_finite(v) or input_rules.out_of_range(
                v, getattr(inp, "min", None), getattr(inp, "max", None))
            if bad:
                problems.append((name, bad))
        elif isinstance(inp, io.Combo.Input) and inp.options and v not in inp.options:
            shown = inp.options if len(inp.options) <= 12 else f"{len(inp.options)} choices"
            problems.append((name, f"{v!r} is not one of {shown}"))
    return problems


def _num_steps(values: dict, model, sigmas) -> tuple:
    """(steps of the schedule, problem or None) from SIGMAS if connected, else steps/scheduler."""
    if sigmas is not None:
        s = sigmas.detach().float().flatten().cpu()
        if s.numel() < 2 or float(s[-1]) != 0.0:
            return 0, ("sigmas", "DRaFT needs a full sampling schedule that ends at sigma 0 "
                       "(a scheduler node with denoise = 1)")
        if not torch.isfinite(s).all():
            return 0, ("sigmas", "the schedule holds NaN or Inf")
        return s.numel() - 1, None
    return int(values["steps"]), None


def _layer_widths(diffusion_model, names) -> dict:
    modules = dict(diffusion_model.named_modules())
    out = {}
    for n in names:
        w = modules[n].weight
        out[n] = (int(w.shape[0]), int(math.prod(w.shape[1:])))
    return out


def check_trainer(node_cls, values: dict, model, vae, sampler, sigmas=None) -> dict:
    """All of DRaFT Trainer's checks that need its connected objects; raises :class:`InputError`
    listing every problem (one line each, ``input: what is wrong``). Nothing is loaded to the device.

    Returns what it worked out on the way: ``{"prompts": [...], "steps": int}``.
    """
    problems = list(_schema_problems(node_cls, values))
    bad_inputs = {name for name, _ in problems}

    def add(name, text):
        if name not in bad_inputs:
            problems.append((name, text))
            bad_inputs.add(name)

    settings = getattr(sampler, "draft_settings", None)
    if settings is None:
        add("sampler", "connect a DRaFT Sampler node (a plain ComfyUI sampler has no gradients)")
    prompts = []
    try:
        prompts = resolve_prompts(values["prompt_set"], values["prompts"])
    except ValueError as e:
        add("prompts", str(e))
    problem = name_problem(values["lora_name"])
    if problem:
        add("lora_name", problem)

    steps, sched_problem = _num_steps(values, model, sigmas)
    if sched_problem:
        add(*sched_problem)
    elif settings is not None:
        bad = input_rules.schedule_problem(settings, steps)
        if bad:
            add("sampler", bad)

    if vae is not None and "width" not in bad_inputs and "height" not in bad_inputs:
        down = vae.spacial_compression_encode()
        for side in ("width", "height"):
            if int(values[side]) % down:
                add(side, f"{values[side]} is not a multiple of {down}, the VAE's downscale factor")

    diffusion_model = model.model.diffusion_model
    names = []
    if "target_modules" not in bad_inputs:
        try:
            names = comfy_glue.target_module_names(diffusion_model, values["target_modules"])
        except ValueError as e:
            add("model", str(e))
    if names and "lora_rank" not in bad_inputs and values.get("resume_lora") in (None, "none"):
        bad = input_rules.rank_problem(int(values["lora_rank"]), _layer_widths(diffusion_model, names))
        if bad:
            add("lora_rank", bad)

    resume = values.get("resume_lora")
    if resume not in (None, "none") and names and "resume_lora" not in bad_inputs:
        _check_resume(resume, values, model, diffusion_model, names, add)

    if problems:
        lines = "\n".join(f"- {name}: {text}" for name, text in problems)
        n = len(problems)
        raise InputError(f"DRaFT Trainer: {n} input{'s' if n > 1 else ''} to fix before training "
                         f"can start (nothing was loaded or trained):\n{lines}")
    return {"prompts": prompts, "steps": steps}


def _check_resume(name, values, model, diffusion_model, names, add) -> None:
    if not folder_paths.get_full_path("loras", name):
        add("resume_lora", f"{name!r} is not in models/loras ({lora_files.loras_root()})")
        return
    try:
        lora, state = lora_files.load_for_resume(name, diffusion_model, names, model)
    except (LoRAFileError, OSError) as e:
        text = str(e)
        if "target layers" in text or "matches no target layer" in text:
            text += (f" -- target_modules is {values['target_modules']!r}: choose the target set "
                     "the file was trained with")
        add("resume_lora", text)
        return
    bad = input_rules.resume_mismatch(lora, values["lora_rank"], values["lora_alpha"])
    if bad:
        add("resume_lora", bad)
        return
    done = int(state["iteration"]) if state is not None else 0
    bad = input_rules.resume_iteration_problem(done, int(values["iterations"]))
    if bad:
        add("iterations", bad)


def check_save_lora(filename_prefix) -> None:
    """DRaFT Save LoRA at execute time (validate_inputs has said the same when queued)."""
    problem = name_problem(filename_prefix)
    if problem:
        raise InputError(f"DRaFT Save LoRA: filename_prefix: {problem}")
