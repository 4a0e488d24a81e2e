"""The DRaFT engine: ComfyUI-free (never imports ``comfy``).

* :mod:`.sampler`: differentiable DDIM sampling in sigma space with DRaFT's gradient truncation.
* :mod:`.trainer`: the update loop (AdamW, clipping, accumulation, mixed precision, NaN guard).
* :mod:`.lora`: LoRA deltas applied as weight wrappers.
* LoRA files (imports run one way, top to bottom): :mod:`.lora_diffusers` (the diffusers/PEFT
  folder) -> :mod:`.lora_file` (the kohya ``.safetensors``: write and read) -> :mod:`.lora_metadata`
  (metadata strings, base-model facts) -> :mod:`.lora_naming` (kohya/ComfyUI/PEFT keys <-> module
  names); :mod:`.lora_resume` (the ``.draft_state`` optimizer side file). The files are written and
  read through :mod:`.safe_files` (atomic saves, checked reads), which holds ``LoRAFileError``.
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
