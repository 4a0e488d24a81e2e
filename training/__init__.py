"""The DRaFT engine: ComfyUI-free (never imports ``comfy``).

* :mod:`.sampler`: differentiable DDIM sampling in sigma space with DRaFT's gradient truncation.
* :mod:`.trainer`: the update loop (AdamW, clipping, accumulation, mixed precision, NaN guard).
* :mod:`.lora`: LoRA deltas applied as weight wrappers.
"""
from .lora import LoRADelta, LoRASet, wrap_module
from .sampler import (METHODS, DifferentiableSampler, Rollout, SamplerSettings, ddim_step,
                      karras_sigmas, ve_renoise)
from .trainer import DraftTrainer, StepReport, TrainSettings, derived_generator

__all__ = [
    "LoRADelta", "LoRASet", "wrap_module", "METHODS", "DifferentiableSampler", "Rollout",
    "SamplerSettings", "ddim_step", "karras_sigmas", "ve_renoise", "DraftTrainer", "StepReport",
    "TrainSettings", "derived_generator",
]
