"""``make vram`` rows for the DiT / flow families (called by :mod:`.vram`; same method, the traced
update of :mod:`tools.measure.setup`).

Full-size diffusers transformers built under ``FakeTensorMode`` (nothing allocated or computed),
the project's own update (``DifferentiableSampler`` + ``DraftTrainer.step()``, lean mode: block
checkpointing of every transformer block and VAE decoder block, one row at a time; or ``fast``,
without them; see :mod:`.vram` for every mode), counted by
:class:`training.memory_trace.LiveBytes`:

* ``flux_dev_1024``: FLUX.1-dev (``FluxTransformer2DModel``: 19 double + 38 single blocks, 3072
  wide) at 1024 px (4096 image + 512 T5 tokens), base weights stored in float8 e4m3 and cast to
  bf16 per use as ComfyUI's ``weight_dtype=fp8_e4m3fn`` does (``cast_bias_weight``), cfg 1 (one
  branch: guidance-distilled), embedded guidance 3.5; DRaFT-1.
* ``sd35m_1024``: SD3.5 medium (``SD3Transformer2DModel``: 24 MMDiT blocks, 1536 wide, attn2 in
  blocks 0-12, q/k RMS norm) at 1024 px (4096 image + 333 text tokens), bf16, cfg 4.5 (both
  branches in one batch); DRaFT-LV n = 2.

* ``wan21_1_3b_480p``: Wan 2.1 T2V 1.3B (``WanTransformer3DModel``: 30 blocks, 1536 wide, 12
  heads, FFN 8960) at 480x832, 33 frames (9 latent frames of 30 x 52 patches: 14,040 tokens; 512
  T5 tokens), bf16, cfg 5 (both branches in one batch); only the first 3 latent frames (9 frames)
  are decoded, by the Wan 2.1 VAE decoder (``AutoencoderKLWan``'s, causal, frame by frame), and
  every frame is scored (the reward of a video is their mean). DRaFT-1 and DRaFT-LV n = 2.

FLUX and SD3 decode with the 16-channel FLUX/SD3 VAE decoder (``AutoencoderKL``, no quant convs, bf16) and
score with the LAION aesthetic reward (CLIP ViT-L/14, bf16); LoRA rank 8 on the attention targets
of ``nodes/architectures.py`` in diffusers naming (FLUX: ``to_q/k/v``, ``to_out.0``,
``add_*_proj``, ``to_add_out``, single blocks' ``to_q/k/v``, ``proj_mlp``, ``proj_out``; SD3:
``attn`` and ``attn2`` projections). Text encoders are not counted (ComfyUI offloads them once the
prompts are encoded); their outputs are.
"""
from __future__ import annotations

import time

from tools.measure.setup import (build_aesthetic_reward, trace_update, update_sampler,
                                 update_trainer, vae_decoder)

DIT_MODELS = {"flux_dev_1024": 1024, "sd35m_1024": 1024, "wan21_1_3b_480p": 480}
# Wan: (height, width, frames, decoded latent frames); frames = 4 (latent frames - 1) + 1
WAN_VIDEO = {"wan21_1_3b_480p": (480, 832, 33, 3)}


def build_transformer(model: str):
    if model == "flux_dev_1024":
        from diffusers import FluxTransformer2DModel
        return FluxTransformer2DModel(guidance_embeds=True)  # the FLUX.1-dev configuration
    if model == "sd35m_1024":
        from diffusers import SD3Transformer2DModel
        return SD3Transformer2DModel(  # stabilityai/stable-diffusion-3.5-medium
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    raise ValueError(model)


def attention_targets(transformer) -> list:
    """The ``attention`` target set in diffusers names (see the module docstring)."""
    ends = (".to_q", ".to_k", ".to_v", ".to_out.0", ".add_q_proj", ".add_k_proj", ".add_v_proj",
            ".to_add_out")
    names = [n for n, _ in transformer.named_modules() if n.endswith(ends)
             and (".attn." in n or ".attn2." in n)]
    names += [n for n, _ in transformer.named_modules()
              if n.startswith("single_transformer_blocks.") and n.endswith((".proj_mlp", ".proj_out"))]
    return names


def store_fp8(transformer) -> None:
    """Every Linear weight in the blocks kept in float8 e4m3, cast to bf16 on use (ComfyUI's fp8)."""
    import torch
    from torch.nn.utils import parametrize

    class CastOnUse(torch.nn.Module):
        def forward(self, w):
            return w.to(torch.bfloat16)
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name:
            module.weight = torch.nn.Parameter(module.weight.detach().to(torch.float8_e4m3fn),
                                               requires_grad=False)
            parametrize.register_parametrization(module, "weight", CastOnUse(), unsafe=True)


def block_units(transformer) -> list:
    units = list(getattr(transformer, "transformer_blocks", []) or [])
    units += list(getattr(transformer, "blocks", []) or [])  # Wan
    return units + list(getattr(transformer, "single_transformer_blocks", []) or [])


def wan_attention_targets(transformer) -> list:
    """Wan's ``attention`` set in diffusers names: self- (attn1) and cross-attention (attn2)
    q, k, v, out."""
    return [n for n, _ in transformer.named_modules() if n.startswith("blocks.")
            and n.endswith((".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out.0",
                            ".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0"))]


def measure_wan(model: str, method: str, batch: int, steps: int, mode: str = "lean") -> dict:
    """Peak bytes of one Wan 2.1 video update (see the module docstring; modes as measure_dit)."""
    import torch
    from torch import nn
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from training import wrap_module
    from training.memory_trace import fake_mode

    torch.set_default_dtype(torch.bfloat16)
    height, width, frames, decoded = WAN_VIDEO[model]
    latent_t, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    shift = 8.0  # ComfyUI's WAN21_T2V sampling shift
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    sigmas = (shift * t / (1 + (shift - 1) * t)).float()

    def renoise(s, n, x0):
        s = s.reshape(-1, 1, 1, 1, 1).to(n)
        return s * n + (1 - s) * x0
    sampler = update_sampler(method, sigmas, renoise=renoise)
    started = time.perf_counter()
    with fake_mode():
        transformer = WanTransformer3DModel(  # Wan-AI/Wan2.1-T2V-1.3B
            num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
        autoencoder = AutoencoderKLWan()
        del autoencoder.encoder, autoencoder.quant_conv
        reward = build_aesthetic_reward()
        for m in (transformer, autoencoder, reward):
            m.eval().requires_grad_(False)
        lora = wrap_module(transformer, wan_attention_targets(transformer), rank=8, alpha=8.0, seed=0)
        tokens, cfg = 512, 5.0
        context, uncond = torch.randn(4, tokens, 4096), torch.randn(1, tokens, 4096)
        mean = torch.tensor(autoencoder.config.latents_mean).view(1, 16, 1, 1, 1)
        std = torch.tensor(autoencoder.config.latents_std).view(1, 16, 1, 1, 1)

        class Denoiser(nn.Module):
            """Flow model: x0 = x - sigma * v; CFG with both branches in one batch."""

            def forward(self, x, sigma, index):
                s = sigma.to(x.dtype)
                b = x.shape[0]
                v_u, v_c = transformer(torch.cat([x, x]), torch.cat([s, s]) * 1000,
                                       torch.cat([uncond.expand(b, -1, -1), context[index]]),
                                       return_dict=False)[0].chunk(2)
                v = v_u + cfg * (v_c - v_u)
                return x - s.reshape(-1, 1, 1, 1, 1) * v.to(x.dtype)

        def decode(z):  # the first `decoded` latent frames -> (B*F, 3, H, W), as the trainer's
            video = autoencoder.decode(z[:, :, :decoded] * std + mean, return_dict=False)[0]
            return (video.float() * 0.5 + 0.5).clamp(0, 1).movedim(2, 1).flatten(0, 1)

        trainer = update_trainer(sampler, Denoiser(), autoencoder, 1.0, None, reward, lora,
                                 (16, latent_t, h, w), batch, mode, block_units(transformer),
                                 decode=decode)
    row = dict(model=model, method=method, batch=batch, mode=mode, lowvram=False, steps=steps,
               resolution=height)
    return trace_update(trainer, row, transformer, autoencoder, reward, lora, started)


def measure_dit(model: str, method: str, batch: int, steps: int, resolution: int,
                mode: str = "lean") -> dict:
    """Peak bytes of one update (vram.py's ``measure`` for a DiT). ``mode``: ``lean`` (block
    checkpointing, one row at a time), ``lean_decoder`` (the decoder's blocks only, one row at a
    time), ``fast`` (per-step checkpointing, every row at once) or ``before`` (``fast`` with the
    whole decode checkpointed)."""
    if model in WAN_VIDEO:
        return measure_wan(model, method, batch, steps, mode)
    import torch
    from torch import nn
    from training import wrap_module
    from training.memory_trace import fake_mode

    torch.set_default_dtype(torch.bfloat16)
    flux = model == "flux_dev_1024"
    shift = 3.0  # SD3's; FLUX's resolution-dependent shift gives a schedule of the same length
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    sigmas = (shift * t / (1 + (shift - 1) * t)).float()
    sampler = update_sampler(method, sigmas,
                             renoise=lambda s, n, x0: s.reshape(-1, 1, 1, 1).to(n) * n
                             + (1 - s.reshape(-1, 1, 1, 1).to(n)) * x0)
    started = time.perf_counter()
    with fake_mode():
        latent = resolution // 8
        transformer = build_transformer(model)
        vae = vae_decoder(16)
        reward = build_aesthetic_reward()
        for m in (transformer, vae, reward):
            m.eval().requires_grad_(False)
        if flux:
            store_fp8(transformer)
        lora = wrap_module(transformer, attention_targets(transformer), rank=8, alpha=8.0, seed=0)
        tokens, pooled_dim = (512, 768) if flux else (333, 2048)
        context = torch.randn(4, tokens, 4096)
        pooled = torch.randn(4, pooled_dim)
        uncond, uncond_pooled = torch.randn(1, tokens, 4096), torch.randn(1, pooled_dim)
        cfg = 1.0 if flux else 4.5
        h = latent // 2
        rows = torch.arange(h, dtype=torch.float32)
        img_ids = torch.stack([torch.zeros(h, h), rows[:, None].expand(h, h),
                               rows[None, :].expand(h, h)], -1).reshape(-1, 3).float()
        txt_ids = torch.zeros(tokens, 3, dtype=torch.float32)

        def velocity(x, s, ctx, pool):
            if not flux:
                return transformer(x, encoder_hidden_states=ctx, pooled_projections=pool,
                                   timestep=s * 1000, return_dict=False)[0]
            b, c = x.shape[:2]
            packed = x.reshape(b, c, h, 2, h, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * h, c * 4)
            out = transformer(packed, encoder_hidden_states=ctx, pooled_projections=pool, timestep=s,
                              img_ids=img_ids, txt_ids=txt_ids,
                              guidance=torch.full((b,), 3.5), return_dict=False)[0]
            return out.reshape(b, h, h, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, latent, latent)

        class Denoiser(nn.Module):
            """Flow model: x0 = x - sigma * v; CFG with both branches in one batch unless cfg 1."""

            def forward(self, x, sigma, index):
                s = sigma.to(x.dtype)
                if cfg == 1.0:
                    v = velocity(x, s, context[index], pooled[index])
                else:
                    b = x.shape[0]
                    v_u, v_c = velocity(torch.cat([x, x]), torch.cat([s, s]),
                                        torch.cat([uncond.expand(b, -1, -1), context[index]]),
                                        torch.cat([uncond_pooled.expand(b, -1), pooled[index]])).chunk(2)
                    v = v_u + cfg * (v_c - v_u)
                return x - s.reshape(-1, 1, 1, 1) * v.to(x.dtype)

        scale, shift_z = (0.3611, 0.1159) if flux else (1.5305, 0.0609)
        trainer = update_trainer(sampler, Denoiser(), vae, scale, shift_z, reward, lora,
                                 (16, latent, latent), batch, mode, block_units(transformer))
    row = dict(model=model, method=method, batch=batch, mode=mode, lowvram=False, steps=steps,
               resolution=resolution)
    return trace_update(trainer, row, transformer, vae, reward, lora, started)
