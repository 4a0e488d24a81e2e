"""Engine rules on settings, checked before a run starts (ComfyUI-free).

Each function returns None when the setting is usable, else one sentence saying what is wrong and
what to do; callers (``nodes/validation.py``) prefix the name of the input it came from.
"""
from __future__ import annotations

import math
from typing import Optional

from .lora import LoRASet
from .sampler import SamplerSettings


def not_finite(value) -> Optional[str]:
    """A number input that is NaN or infinite (JSON sent to ComfyUI's /prompt can carry both)."""
    try:
        if math.isfinite(float(value)):
            return None
    except (TypeError, ValueError):
        return f"{value!r} is not a number"
    return f"{value!r} is not a finite number"


def out_of_range(value, lo, hi) -> Optional[str]:
    """``value`` outside ``[lo, hi]`` (either bound may be None)."""
    if lo is not None and value < lo:
        return f"{value!r} is below the minimum {lo!r}"
    if hi is not None and value > hi:
        return f"{value!r} is above the maximum {hi!r}"
    return None


def schedule_problem(settings: SamplerSettings, num_steps: int) -> Optional[str]:
    """Whether the sampler's differentiated steps fit a schedule of ``num_steps`` steps.

    DRaFT-K differentiates the last ``k`` steps, random K draws from ``[k_min, k_max]``: both must
    lie within the schedule (never silently clipped). DRaFT-LV and full DRaFT fit any schedule."""
    if num_steps < 1:
        return f"the sampling schedule has {num_steps} steps; DRaFT needs at least one"
    if settings.method == "draft_k" and settings.k > num_steps:
        return (f"DRaFT-K with k = {settings.k} differentiates more steps than the schedule's "
                f"{num_steps}; lower the DRaFT Sampler's k to at most {num_steps} or raise steps")
    if settings.method == "random_k" and settings.k_max > num_steps:
        return (f"random K draws up to k_max = {settings.k_max} steps but the schedule has "
                f"{num_steps}; lower the DRaFT Sampler's k_max to at most {num_steps} or raise steps")
    return None


def rank_problem(rank: int, widths: dict) -> Optional[str]:
    """``rank`` larger than a target layer can use. ``widths``: ``{layer name: (out, in)}`` with
    ``in`` the flattened input size; a rank above ``min(out, in)`` adds parameters, not capacity."""
    too_narrow = {n: w for n, w in widths.items() if rank > min(w)}
    if not too_narrow:
        return None
    name, (out, inp) = min(too_narrow.items(), key=lambda item: min(item[1]))
    narrowest = min(min(w) for w in widths.values())
    return (f"{rank} exceeds the width of {len(too_narrow)} of the {len(widths)} target layers "
            f"(e.g. {name}: {out} x {inp}); a LoRA's rank can be at most min(out, in) of its "
            f"layer: use at most {narrowest}")


def resume_mismatch(ranks, alphas, rank: int, alpha: float,
                    where: str = "this node says") -> Optional[str]:
    """The ranks/alphas a resume file's layers were trained with, when they differ from the
    settings' ``rank``/``alpha``; ``where`` says where those come from (e.g. "DRaFT LoRA Settings
    (node 11) says").

    A resumed LoRA keeps the file's factors, so a different rank or alpha in the settings would
    be silently ignored: refuse it instead."""
    ranks, alphas = sorted({int(r) for r in ranks}), sorted({float(a) for a in alphas})
    if not ranks:
        return "the file holds no LoRA layers"
    if ranks != [int(rank)] or not all(math.isclose(a, float(alpha), rel_tol=1e-6) for a in alphas):
        shown_r = ranks[0] if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
        shown_a = f"{alphas[0]:g}" if len(alphas) == 1 else f"{alphas[0]:g}..{alphas[-1]:g}"
        return (f"the file was trained with rank {shown_r}, alpha {shown_a}; {where} "
                f"lora_rank {rank}, lora_alpha {float(alpha):g}: set them to the file's values to "
                "resume, or choose resume_lora 'none' to start a new LoRA")
    return None


def lora_ranks_alphas(lora: LoRASet) -> tuple:
    """``(ranks, alphas)`` of a LoRASet's layers, for :func:`resume_mismatch`."""
    return [d.rank for _, d in lora.items()], [float(d.alpha) for _, d in lora.items()]


def resume_iteration_problem(done: int, total: int) -> Optional[str]:
    """A resume file already at or past the requested number of iterations."""
    if done >= total:
        return (f"the file already holds {done} updates and iterations is {total}: set "
                f"iterations above {done} to train further")
    return None
