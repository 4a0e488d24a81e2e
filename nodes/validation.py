"""Every input of the DRaFT nodes checked before a model is loaded onto the device or an
iteration runs; all problems of a node are reported together, once, one line each naming its input.

Two moments, because of what ComfyUI 0.3.64 does when a prompt is queued (``execution.py``,
``validate_inputs``; seen by experiment through ``/prompt``):

* it never checks a V3 combo's value against its options (a V3 combo's type is ``"COMBO"``, not
  the list the check looks for), and it skips its own min/max checks for every input a node's
  ``validate_inputs`` declares (all of them with ``**kwargs``);
* a ``validate_inputs`` that *returns* a message gets it attached to *every* declared input (one
  missing resume file was 29 red inputs); one that *raises* gets one error for the node.

So each DRaFT node's ``validate_inputs(cls, **kwargs)`` calls :func:`check_queued`: every widget's
range, finiteness and choices from the node's own schema, plus the node's own rules
(:data:`NODE_RULES`: file names, prompts, the resume file's rank/alpha/step, k_min <= k_max), and
raises one :class:`InputError` listing every problem, whether the graph came from the frontend
or straight to ``/prompt``. ComfyUI shows it as one error on the node.

What needs the connected objects is checked at the start of the trainer's execute
(:func:`check_trainer`), before prompts are encoded, models are loaded to the device or an
iteration runs: the DRaFT Sampler's K against the schedule (steps or SIGMAS), width/height against
the VAE, the LoRA rank against the layers, the resume file against the model's layers and the
target modules (plus everything above once more, for callers that bypass ``/prompt``).

Settings that live on the trainer's optional nodes (DRaFT LoRA Settings, Optimizer, Save &
Preview: :data:`OPTION_INPUTS`) are checked on their own node when queued; a cross-check with the
trainer's inputs names the node and its input (``lora_rank of DRaFT LoRA Settings (node 11)``), or
says the default was used when none is connected. A node's values reach the trainer only when it
runs, so a resume file against a *connected* LoRA Settings node is checked at the start of execute
(against the defaults, when none is connected, already when queued).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch
from comfy_api.latest import io

import folder_paths

from ..training import input_rules
from ..training.lora_resume import state_path_for
from ..training.prompt_sets import PROMPT_SETS, parse_prompt_lines, resolve_prompts
from ..training.run_options import LoRAOptions
from ..training.safe_files import LoRAFileError
from . import architectures, comfy_glue, lora_files
from .trainer_options import OPTION_INPUTS


class InputError(ValueError):
    """One or more DRaFT node inputs cannot be used; the message names each of them."""


# -- generic: the node's own schema -----------------------------------------------------------------
def schema_problems(node_cls, values: dict) -> list:
    """``(input, problem)`` for values outside the widget's range or choices, or not finite.
    Inputs absent from ``values`` or None (linked from another node) are not checked here."""
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
        elif isinstance(inp, io.Combo.Input) and inp.options is not None and v not in inp.options:
            shown = list(inp.options) if len(inp.options) <= 12 else f"the {len(inp.options)} choices of the list"
            problems.append((name, f"{v!r} is not one of {shown}"))
    return problems


def _raise(title: str, problems: list, tail: str = "nothing was run") -> None:
    if problems:
        lines = "\n".join(f"- {name}: {text}" for name, text in problems)
        n = len(problems)
        raise InputError(f"{title}: {n} input{'s' if n > 1 else ''} to fix ({tail}):\n{lines}")


def check_queued(node_cls, values: dict):
    """A DRaFT node's ``validate_inputs``: True, or raises :class:`InputError` listing every
    problem (see the module docstring for why it raises rather than returns)."""
    schema = node_cls.define_schema()
    rules = NODE_RULES.get(schema.node_id)
    problems = rules(values) if rules is not None else []  # their words for files say more
    named = {name for name, _ in problems}
    problems += [(n, t) for n, t in schema_problems(node_cls, values) if n not in named]
    order = {inp.id: i for i, inp in enumerate(schema.inputs)}
    problems.sort(key=lambda p: order.get(p[0], len(order)))
    _raise(schema.display_name or schema.node_id, problems)
    return True


# -- node rules (values of linked inputs are None) -------------------------------------------------
def name_problem(name) -> Optional[str]:
    """Why ``name`` cannot be a file prefix inside models/loras, or None (no file is touched)."""
    try:
        lora_files.safe_lora_path(name if isinstance(name, str) else "", ".safetensors")
    except ValueError as e:
        return str(e)
    return None


def resume_header(path: str) -> dict:
    """What a resume file says without loading it: ``ranks``, ``alphas`` (per layer), ``step``
    (the side file's, else the metadata's ``draft_iteration``, else 0) and ``side_file``."""
    from safetensors import safe_open
    ranks, alphas = [], []
    with safe_open(path, "pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        for key in f.keys():
            if key.endswith("lora_down.weight") or key.endswith("lora_A.weight"):
                ranks.append(f.get_slice(key).get_shape()[0])
            elif key.endswith(".alpha"):
                alphas.append(float(f.get_tensor(key).float().item()))
    if not alphas:
        alphas = list(ranks)  # kohya's default
    side = state_path_for(path)
    step = None
    if os.path.exists(side):
        with safe_open(side, "pt", device="cpu") as f:
            step = (f.metadata() or {}).get("draft_state.step")
    if step is None:
        step = meta.get("draft_iteration", "0")
    return {"ranks": ranks, "alphas": alphas, "step": int(step), "side_file": os.path.exists(side)}


def trainer_options(values: dict) -> dict:
    """``{input: options}`` for the trainer's optional settings inputs (:data:`OPTION_INPUTS`): the
    connected node's dataclass, or its defaults where nothing is connected (absent or None)."""
    return {name: values[name] if values.get(name) is not None else entry.options()
            for name, entry in OPTION_INPUTS.items()}


def linked_node(prompt, node_id, name) -> Optional[str]:
    """The id of the node linked to input ``name`` of node ``node_id`` in a queued ``prompt``."""
    link = ((prompt or {}).get(str(node_id)) or {}).get("inputs", {}).get(name)
    return str(link[0]) if isinstance(link, list) and link else None


def option_node_label(option_input: str, source: Optional[str]) -> str:
    """``DRaFT LoRA Settings (node 11)``: the node feeding the trainer's ``option_input``
    (``source``: its id, "" if unknown, None if nothing is connected: ``no DRaFT LoRA Settings
    node connected``)."""
    title = OPTION_INPUTS[option_input].title
    if source is None:
        return f"no {title} node connected"
    return title + (f" (node {source})" if source else "")


def setting_label(option_input: str, name: str, source: Optional[str]) -> str:
    """How a problem names setting ``name`` of the trainer's ``option_input``: ``lora_rank of
    DRaFT LoRA Settings (node 11)``, or ``lora_rank (the default: no DRaFT LoRA Settings node
    connected)``."""
    node = option_node_label(option_input, source)
    return f"{name} (the default: {node})" if source is None else f"{name} of {node}"


def _trainer_rules(v: dict, sources: Optional[dict] = None) -> list:
    """The trainer's own rules. ``sources``: ``{optional input: linked node id}`` (see
    :func:`setting_label`); None when queued, where an option input is absent when nothing is
    connected (the defaults apply) and None when linked (its values are not known yet)."""
    out = []
    if v.get("prompt_set") in ("custom", *PROMPT_SETS) and v.get("prompts") is not None:
        try:
            resolve_prompts(v["prompt_set"], v["prompts"])
        except ValueError as e:
            out.append(("prompts", str(e)))
    if v.get("lora_name") is not None:
        problem = name_problem(v["lora_name"])
        if problem:
            out.append(("lora_name", problem))
    resume = v.get("resume_lora")
    if isinstance(resume, str) and resume != "none":  # not a string: not one of the choices (schema)
        path = folder_paths.get_full_path("loras", resume)
        if not path:
            out.append(("resume_lora", f"{resume!r} is not in models/loras ({lora_files.loras_root()})"))
            return out
        try:
            head = resume_header(path)
        except Exception as e:  # unreadable: the loader says exactly why at execute time
            out.append(("resume_lora", f"{resume!r} is not a readable LoRA file ({e})"))
            return out
        lora = v.get("lora_settings", LoRAOptions())
        if lora is not None:
            source = (sources or {}).get("lora_settings")
            node = option_node_label("lora_settings", source)
            where = f"{node} says" if source is not None else f"the trainer's defaults ({node}) are"
            bad = input_rules.resume_mismatch(head["ranks"], head["alphas"], lora.lora_rank,
                                              lora.lora_alpha, where)
            if bad:
                out.append(("resume_lora", bad))
        if v.get("iterations") is not None:
            bad = input_rules.resume_iteration_problem(head["step"], int(v["iterations"]))
            if bad:
                out.append(("iterations", bad))
    return out


def _sampler_rules(v: dict) -> list:
    if v.get("k_min") is not None and v.get("k_max") is not None and v["k_min"] > v["k_max"]:
        return [("k_min", f"{v['k_min']} is above k_max {v['k_max']}")]
    return []


def _heldout_rules(v: dict) -> list:
    if v.get("prompts") is not None and not parse_prompt_lines(v["prompts"]):
        return [("prompts", "no held-out prompt: write one per line")]
    return []


def _save_rules(v: dict) -> list:
    problem = name_problem(v["filename_prefix"]) if v.get("filename_prefix") is not None else None
    return [("filename_prefix", problem)] if problem else []


NODE_RULES: dict[str, Callable[[dict], list]] = {
    "DRaFTTrainer": _trainer_rules,
    "DRaFTSampler": _sampler_rules,
    "DRaFTSaveLoRA": _save_rules,
    "DRaFTHeldoutCheck": _heldout_rules,
}


# -- execute time: the trainer with its connected objects ------------------------------------------
def _num_steps(values: dict, sigmas) -> tuple:
    """(steps of the schedule, problem or None) from SIGMAS if connected, else steps."""
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
    return {n: (int(modules[n].weight.shape[0]), int(math.prod(modules[n].weight.shape[1:])))
            for n in names}


def other_node_problems(prompt, own_id) -> list:
    """``(node, problem)`` for the other DRaFT nodes of the queued ``prompt`` whose widgets fail
    :func:`check_queued`. ComfyUI runs a prompt's valid outputs and drops the invalid ones, so a
    bad Save LoRA prefix would otherwise let the trainer run for hours and its result be lost."""
    import nodes as comfy_nodes  # ComfyUI's node registry
    out = []
    for nid, node in (prompt or {}).items():
        kind = node.get("class_type", "") if isinstance(node, dict) else ""
        node_cls = comfy_nodes.NODE_CLASS_MAPPINGS.get(kind)
        if str(nid) == str(own_id) or not kind.startswith("DRaFT") or node_cls is None \
                or not hasattr(node_cls, "define_schema"):
            continue
        values = {k: None if isinstance(v, list)  # a link, as validate_inputs sees it
                  else v["__value__"] if isinstance(v, dict) and "__value__" in v else v
                  for k, v in node.get("inputs", {}).items()}
        try:
            check_queued(node_cls, values)
        except InputError as e:
            first, _, rest = str(e).partition("\n")
            out.append((f"node {nid}", first + " " + "; ".join(line[2:] for line in rest.splitlines())))
    return out


def _experts_problems(experts, model, family, settings, values, sigmas, steps) -> list:
    """DRaFT Wan 2.2 Experts against the trainer's model and schedule: both experts Wan 2.2 A14B's
    (each a Wan 2.1 14B to ComfyUI, the same configuration), and an update's differentiated steps
    (the last K) not all the other expert's (:func:`training.sampler.tail_problem`)."""
    from ..training.sampler import expert_steps, tail_problem
    if family is None or not family.expert_pairs:
        return [("experts", "DRaFT Wan 2.2 Experts is for Wan 2.2 A14B's two experts (ComfyUI loads "
                 f"each as a Wan 2.1 T2V 14B); the trainer's model is "
                 f"{family.name if family else 'not a supported family'}: disconnect it")]
    other = experts.model

    def config(m):
        return dict(getattr(getattr(m.model, "model_config", None), "unet_config", {}) or {})
    if type(getattr(other.model, "model_config", None)) is not type(model.model.model_config) \
            or config(other) != config(model):
        return [("experts", "the other expert of DRaFT Wan 2.2 Experts is not a model of the same "
                 "kind as the trainer's (Wan 2.2 A14B's two experts have one configuration)")]
    if settings is None or not steps:
        return []
    schedule = comfy_glue.sampling_schedule(model, sigmas, values["scheduler"], int(values["steps"]))
    bad = tail_problem(settings, schedule.numel() - 1,
                       expert_steps(schedule, experts.boundary, experts.trained))
    if bad:
        return [("sampler", f"{bad} (DRaFT Wan 2.2 Experts: the trainer's model is the "
                 f"{experts.trained} expert, boundary sigma {experts.boundary:g})")]
    return []


def check_trainer(node_cls, values: dict, model, vae, sampler, sigmas=None, prompt=None,
                  node_id=None) -> dict:
    """DRaFT Trainer's checks at the start of execute; raises :class:`InputError` listing every
    problem (one line each, ``input: what is wrong``). Nothing is loaded to the device.
    ``prompt`` (the queued graph) adds the other DRaFT nodes' problems (:func:`other_node_problems`).

    ``values`` holds the trainer's inputs; its optional settings inputs (:data:`OPTION_INPUTS`)
    are the connected nodes' dataclasses, or None where nothing is connected (the defaults).
    Returns what it worked out on the way: ``{"prompts": [...], "steps": int, "options":
    {optional input: dataclass}}``.
    """
    problems = schema_problems(node_cls, values) + other_node_problems(prompt, node_id)
    bad_inputs = {name for name, _ in problems}

    def add(name, text):
        if name not in bad_inputs:
            problems.append((name, text))
            bad_inputs.add(name)

    options = trainer_options(values)
    sources = {name: None if values.get(name) is None else (linked_node(prompt, node_id, name) or "")
               for name in options}
    lora: LoRAOptions = options["lora_settings"]
    # a LoRA Settings node with bad values of its own: reported above, nothing to cross-check
    lora_ok = sources["lora_settings"] is None or f"node {sources['lora_settings']}" not in bad_inputs
    for name, text in _trainer_rules({**values, **options, **({} if lora_ok else {"lora_settings": None})},
                                     sources):
        add(name, text)
    settings = getattr(sampler, "draft_settings", None)
    if settings is None:
        add("sampler", "connect a DRaFT Sampler node (a plain ComfyUI sampler has no gradients)")

    steps, sched_problem = _num_steps(values, sigmas)
    if sched_problem:
        add(*sched_problem)
    elif settings is not None and "steps" not in bad_inputs:
        bad = input_rules.schedule_problem(settings, steps)
        if bad:
            add("sampler", bad)

    if vae is not None and not {"width", "height"} & bad_inputs:
        down = vae.spacial_compression_encode()
        for side in ("width", "height"):
            if int(values[side]) % down:
                add(side, f"{values[side]} is not a multiple of {down}, the VAE's downscale factor")

    try:
        family = architectures.family_of(model)
    except architectures.UnsupportedModelError:
        family = None  # reported below, by the target layers' check
    reward_model = getattr(values.get("reward"), "model", None)
    video_reward = bool(getattr(reward_model, "scores_videos", False))
    if family is not None and family.video_frames:
        video = options["video"]
        try:
            latent_frames = video.latent_frames(family.video_frames, family.time_compression)
        except ValueError as e:
            add(setting_label("video", "length", sources["video"]), f"{e} ({family.name})")
        else:
            try:
                choice = video.frame_choice(latent_frames, family.time_compression)
            except ValueError as e:
                add(setting_label("video", "reward_frames", sources["video"]), f"{e} ({family.name})")
            else:
                if video_reward and choice.frames_per_video < 2:
                    add("reward", f"{values['reward'].label} compares consecutive frames, but "
                        f"{setting_label('video', 'reward_frames', sources['video'])} scores 1 "
                        "frame per video: raise it to 2 or more (0 = every decoded frame)")
    elif family is not None and video_reward:
        add("reward", f"{values['reward'].label} compares the frames of videos; {family.name} is an "
            "image model: use an image reward (or a Combine without the Temporal Consistency reward)")

    if values.get("experts") is not None:
        for name, text in _experts_problems(values["experts"], model, family, settings, values,
                                            sigmas, steps):
            add(name, text)

    diffusion_model = model.model.diffusion_model
    names = []
    if lora_ok:
        try:
            names = comfy_glue.target_module_names(diffusion_model, lora.target_modules)
        except ValueError as e:
            add("model", str(e))
    resume = values.get("resume_lora")
    if names and resume in (None, "none"):
        bad = input_rules.rank_problem(int(lora.lora_rank), _layer_widths(diffusion_model, names))
        if bad:
            add(setting_label("lora_settings", "lora_rank", sources["lora_settings"]), bad)
    if resume not in (None, "none") and names and not {"resume_lora", "iterations"} & bad_inputs:
        try:
            lora_files.load_for_resume(resume, diffusion_model, names, model)
        except (LoRAFileError, OSError) as e:
            text = str(e)
            if "target layers" in text or "matches no target layer" in text:
                where = setting_label("lora_settings", "target_modules", sources["lora_settings"])
                text += (f" -- {where} is {lora.target_modules!r}: choose the target set the file "
                         "was trained with")
            add("resume_lora", text)

    _raise("DRaFT Trainer", problems, "nothing was loaded or trained")
    return {"prompts": resolve_prompts(values["prompt_set"], values["prompts"]), "steps": steps,
            "options": options}


def check_save_lora(filename_prefix) -> None:
    """DRaFT Save LoRA at execute time (validate_inputs has said the same when queued)."""
    problem = name_problem(filename_prefix)
    if problem:
        raise InputError(f"DRaFT Save LoRA: filename_prefix: {problem}")
