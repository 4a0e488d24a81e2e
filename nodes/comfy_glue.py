"""Glue between ComfyUI objects and the ComfyUI-free engine.

Everything here works around or reuses ComfyUI internals (../shared/COMFYUI_NOTES.md):

* nodes run under ``torch.inference_mode()``; weights loaded there are inference tensors that
  autograd cannot save -> :func:`de_inference_`;
* ComfyUI's guider takes one positive conditioning for a whole batch -> :class:`PromptBatcher`
  builds per-row batched conds from per-prompt processed conds with ComfyUI's own ``concat``;
* LoRA deltas are registered as weight wrappers on a clone and removed from the shared modules
  afterwards -> :func:`attach_lora` / :func:`detach_lora`;
* ``VAE.decode`` has no gradient -> :func:`make_decoder` calls ``first_stage_model.decode``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import comfy.model_management
import comfy.model_patcher

from ..training.lora import LoRADelta, LoRASet
from . import architectures

# The target-set names every family offers (the patterns per family: architectures.FAMILIES).
TARGET_SETS = architectures.TARGET_SET_NAMES


def sampling_schedule(patcher, sigmas: Optional[torch.Tensor], scheduler: str, steps: int) -> torch.Tensor:
    """The sigmas a run samples with, float32 on the CPU: a connected SIGMAS as given, else
    ComfyUI's ``scheduler`` for ``steps`` steps on the model's own ``model_sampling``."""
    if sigmas is not None:
        return sigmas.detach().float().flatten().cpu().clone()
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler,
                                           steps).cpu()


def de_inference_(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters/buffers of ``module`` with normal tensors (same values).

    Must run outside inference mode, after every (re)load to the device. Returns how many were
    replaced. The values are bit-identical, so other users of the shared module see no change.
    """
    replaced = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    replaced += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    replaced += 1
    return replaced


def clone_tensors(obj):
    """Deep-copy the tensors in nested lists/tuples/dicts (conditioning) as normal tensors."""
    if isinstance(obj, torch.Tensor):
        with torch.inference_mode(False):
            return obj.clone()
    if isinstance(obj, dict):
        return {k: clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tensors(v) for v in obj)
    return obj


def target_module_names(model, target_set: str) -> list:
    """Names (relative to ``diffusion_model``) of the layers a LoRA of ``target_set`` wraps.

    ``model`` is a MODEL (ModelPatcher), a BaseModel or its ``diffusion_model``; its family's
    patterns come from ``architectures.FAMILIES`` (an unsupported family raises
    ``UnsupportedModelError`` listing the supported ones). Only ComfyUI-cast layers (those with
    ``weight_function``) of 2+ dimensional weight qualify.
    """
    architectures.family_of(model)  # an unsupported family is refused before anything else
    inner = getattr(model, "model", model)
    diffusion_model = getattr(inner, "diffusion_model", inner)
    names = architectures.select_targets(
        model, diffusion_model, target_set,
        qualifies=lambda m: hasattr(m, "weight_function") and getattr(m, "weight", None) is not None
        and m.weight.ndim >= 2)
    if not names:
        family = architectures.family_of(model)
        raise ValueError(f"this {family.name} model has no layers matching the '{target_set}' LoRA "
                         f"targets ({family.targets[target_set]})")
    return names


def attach_lora(patcher, lora: LoRASet) -> None:
    """Register each delta as a weight wrapper of ``diffusion_model.<name>.weight`` on ``patcher``
    (a clone: the shared model's weights are never written)."""
    for name, delta in lora.items():
        patcher.add_weight_wrapper(f"diffusion_model.{name}.weight", delta)


def detach_lora(module: torch.nn.Module) -> None:
    """Remove every LoRADelta from the shared modules' weight functions (undo of attach+load)."""
    for m in module.modules():
        fns = getattr(m, "weight_function", None)
        if fns and any(isinstance(f, LoRADelta) for f in fns):
            m.weight_function = [f for f in fns if not isinstance(f, LoRADelta)]


def build_lora(diffusion_model: torch.nn.Module, names, rank: int, alpha: float,
               seed: int) -> LoRASet:
    """Fresh LoRA deltas (float32, on the CPU; ComfyUI moves them with the model) for ``names``."""
    modules = dict(diffusion_model.named_modules())
    generator = torch.Generator().manual_seed(seed)
    lora = LoRASet()
    with torch.inference_mode(False):
        for name in names:
            lora.add(name, LoRADelta(modules[name].weight.shape, rank, alpha, generator=generator))
    return lora


def lora_to_comfy_state_dict(lora: LoRASet) -> dict:
    """The LoRA as ComfyUI's ``LORA_MODEL`` dict (``diffusion_model.<name>.lora_up.weight`` ...),
    detached float32 CPU tensors; accepted by ``comfy.sd.load_lora_for_models``."""
    sd = {}
    for name, delta in lora.items():
        key = f"diffusion_model.{name}"
        sd[f"{key}.lora_up.weight"] = delta.up.detach().float().cpu().clone()
        sd[f"{key}.lora_down.weight"] = delta.down.detach().float().cpu().clone()
        sd[f"{key}.alpha"] = torch.tensor(float(delta.alpha))
    return sd


@dataclass
class PromptBatcher:
    """Per-row positive conditioning for a batch of prompt indices.

    ``entries`` are the guider's processed positive conds, one per prompt (in prompt order). For
    a batch ``(i0, i1, ...)`` it returns one cond whose model conds stack the rows' conds along the
    batch dimension (ComfyUI's ``COND*.concat`` pads cross-attention lengths as usual).
    """

    entries: list
    _cache: dict = field(default_factory=dict)

    def __call__(self, index) -> dict:
        key = tuple(int(i) for i in index)
        if key not in self._cache:
            first = self.entries[key[0]]
            merged = dict(first)
            model_conds = {}
            for name, cond in first["model_conds"].items():
                others = [self.entries[i]["model_conds"][name] for i in key[1:]]
                model_conds[name] = cond._copy_with(cond.concat(others)) if others else cond
            merged["model_conds"] = model_conds
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = merged
        return self._cache[key]


def make_decoder(vae, inner_model, latent_frames: Optional[int] = None):
    """``latent (model space) -> images in [0,1]``, differentiable, on the VAE's device.

    Image latents give ``(B,3,H,W)``; latents with a time axis ``(B,C,1,h,w)`` (Qwen-Image, decoded
    by its video VAE) give ``(B,3,1,H,W)`` from the VAE and the single frame is returned.

    ``latent_frames`` (video families): only the first this many latent frames of ``(B,C,T,h,w)``
    are decoded (a causal video VAE's first frames do not depend on later ones; Wan 2.1 gives
    ``1 + 4 (k - 1)`` frames from ``k``), and the ``F`` frames come back as consecutive images,
    ``(B*F,3,H,W)``, sample ``b``'s at ``b*F ...`` (``DraftTrainer.score`` averages each video's)."""
    def decode(latent: torch.Tensor) -> torch.Tensor:
        if latent_frames is not None:
            latent = latent[:, :, :latent_frames]
        z = inner_model.process_latent_out(latent).to(vae.device, vae.vae_dtype)
        images = vae.process_output(vae.first_stage_model.decode(z).float())
        if images.ndim == 5:
            if latent_frames is not None:  # (B,3,F,H,W) -> (B*F,3,H,W)
                return images.movedim(2, 1).flatten(0, 1)
            if images.shape[2] != 1:
                raise ValueError(f"expected one decoded frame, got {images.shape[2]}")
            images = images[:, :, 0]
        return images
    return decode


def update_memory_inputs(patcher, vae, latent_shape, latent_frames: Optional[int] = None) -> tuple:
    """ComfyUI's own inference estimates for this model: ``(bytes of one decode, bytes of one
    denoiser forward of one row)``, the inputs of ``training.memory_plan``'s estimate.

    ``latent_frames`` (video): the decoded latent frames. ComfyUI's estimate of a Wan VAE decode is
    that of one latent frame (it decodes frame by frame, each frame's activations freed before the
    next); under gradient every decoded frame's are kept, so the estimate is taken per frame."""
    one = [1] + list(latent_shape)
    if latent_frames is not None:
        decode = float(vae.memory_used_decode(one[:2] + [1] + one[3:], vae.vae_dtype)) * latent_frames
    else:
        decode = float(vae.memory_used_decode(one, vae.vae_dtype))
    denoiser = float(patcher.model.memory_required(one))
    return decode, denoiser


def denoiser_checkpoint_units(diffusion_model: torch.nn.Module) -> list:
    """Modules of ComfyUI's diffusion model to checkpoint one by one, from the architecture
    table's block lists: every layer (ResBlock, SpatialTransformer, Down/Upsample) inside a UNet's
    input, middle and output blocks (TimestepEmbedSequential: the UNet calls their layers one by
    one, never the block itself), or every transformer block of a DiT."""
    units = []
    for _, blocks in architectures.block_lists(diffusion_model):
        for block in (blocks if isinstance(blocks, torch.nn.ModuleList) else [blocks]):
            units += list(block.children()) if isinstance(block, torch.nn.Sequential) else [block]
    return units


def decoder_checkpoint_units(first_stage_model: torch.nn.Module) -> list:
    """Modules of a ComfyUI VAE's decoder to checkpoint one by one: the mid block's resnets and
    attention and every up level's resnets, attentions and upsampler (ldm ``Decoder``), the middle
    and upsampling blocks of Wan's video decoders (``Decoder3d``; Wan 2.2's up blocks and, nested,
    their residual blocks and resampler), or the layers of a sequential decoder (TAESD)."""
    decoder = getattr(first_stage_model, "decoder", None)
    if decoder is not None and hasattr(decoder, "mid") and hasattr(decoder, "up"):
        units = [m for m in (getattr(decoder.mid, n, None) for n in ("block_1", "attn_1", "block_2"))
                 if m is not None]
        for level in decoder.up:
            units += list(getattr(level, "block", []) or []) + list(getattr(level, "attn", []) or [])
            if hasattr(level, "upsample"):
                units.append(level.upsample)
        return units
    if decoder is not None and hasattr(decoder, "middle") and hasattr(decoder, "upsamples"):
        # Wan 2.1's causal video decoder (Decoder3d): its middle and upsampling blocks, which carry
        # the previous latent frame's cache (training.checkpointing handles it)
        # and the decoder itself, called once per latent frame (its blocks' checkpoints nest in it).
        # Wan 2.2's residual up blocks (Up_ResidualBlock): one with a shortcut is a unit with its
        # residual blocks and resampler nested units, so that recomputed for one frame it holds
        # one of them at a time; the last (no shortcut: residual blocks in a row) is none, its
        # residual blocks each a unit recomputed frame by frame on its own, whose cache and cache
        # gradients are one block's, not the whole up block's (make vram, 5B at 704x1280: 14.71 ->
        # 13.83 GiB; the last up block whole with its blocks nested: 16.51)
        units = [decoder] + list(decoder.middle)
        for up in decoder.upsamples:
            inner = list(getattr(up, "upsamples", ()))
            units += ([up] if not inner or up.avg_shortcut is not None else []) + inner
        return units
    sequential = getattr(first_stage_model, "taesd_decoder", None)
    if isinstance(sequential, torch.nn.Sequential):
        return [m for m in sequential.children() if any(True for _ in m.parameters())]
    return []


def conditional_only_cfg(args: dict) -> list:
    """``sampler_calc_cond_batch_function`` that runs the conditional branch with gradient and the
    unconditional one without (DRaFT Memory Options' "conditional only"); without gradient (the
    no-grad part of a rollout, previews) both branches run batched, as ComfyUI runs them."""
    import comfy.samplers
    cond, uncond = args["conds"][0], args["conds"][1]
    model, x, sigma, options = args["model"], args["input"], args["sigma"], args["model_options"]
    if not torch.is_grad_enabled():
        return comfy.samplers.calc_cond_batch(model, args["conds"], x, sigma, options)
    out_cond = comfy.samplers.calc_cond_batch(model, [cond], x, sigma, options)[0]
    if uncond is None:
        return [out_cond, torch.zeros_like(out_cond)]
    with torch.no_grad():
        out_uncond = comfy.samplers.calc_cond_batch(model, [uncond], x, sigma, options)[0]
    return [out_cond, out_uncond]


def branches_apart_cfg(lora: torch.nn.Module) -> Callable:
    """``sampler_calc_cond_batch_function`` for the leanest way with a video decoder (see
    ``training.memory_plan.whole_step_over_blocks``): under gradient, CFG's conditional and
    unconditional branches each run as a recomputed step of their own
    (``training.step_checkpoint.branches_apart``; ``lora``: the trained LoRA), so the
    differentiated step's backward recomputes and backpropagates one branch at a time: one
    branch's saved block inputs and activations are alive instead of both's. The same values and
    gradient (the rows of a batched call are computed alone). Without gradient, or with one
    branch (cfg 1), the branches run batched, as ComfyUI runs them."""
    import comfy.samplers
    from ..training.step_checkpoint import branches_apart
    state: dict = {}

    def calc(args: dict) -> list:
        conds = args["conds"]
        model, x, sigma, options = args["model"], args["input"], args["sigma"], args["model_options"]
        if not torch.is_grad_enabled() or any(c is None for c in conds):
            return comfy.samplers.calc_cond_batch(model, conds, x, sigma, options)
        return branches_apart(
            [lambda x_in, c=c: comfy.samplers.calc_cond_batch(model, [c], x_in, sigma, options)[0]
             for c in conds], x, [p for p in lora.parameters() if p.requires_grad], state)
    return calc


class _ManagedWeights(torch.nn.Module):
    """The module ComfyUI's ModelPatcher manages for a reward: it holds the reward as a submodule
    and takes the bookkeeping attributes the patcher writes (``device``, ``model_loaded_weight_memory``
    ...), which the reward itself need not know about."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.weights = module


def reward_patcher(module: torch.nn.Module) -> Optional[comfy.model_patcher.ModelPatcher]:
    """A ModelPatcher so ComfyUI's model management loads/offloads a reward model's weights; None
    when the reward has no weights."""
    if not any(True for _ in module.parameters()):
        return None
    return comfy.model_patcher.ModelPatcher(
        _ManagedWeights(module), load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())
