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
* ``lumina2_1024``: Lumina Image 2.0 (``Lumina2Transformer2DModel``: 2 + 2 refiner blocks and 26
  main blocks, 2304 wide, 24 query / 8 key-value heads; Gemma 2 2B text features, 2304 wide) at
  1024 px (4096 image + 256 text tokens), bf16, cfg 4.0 (both branches in one batch); DRaFT-LV
  n = 2; the 16-channel FLUX VAE (ComfyUI's Lumina 2 uses FLUX's latent format).
* ``hunyuanimage21_2048``: HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``: 20 double + 40
  single blocks, 3584 wide, patch 1, with its byT5 glyph mapper) at 2048 px (64 x 64 = 4096 image
  tokens of its 32x VAE, 256 Qwen2.5-VL tokens; no byT5 tokens: ComfyUI adds them only for quoted
  text in the prompt, and diffusers' boolean-mask reordering of them cannot run on fake tensors),
  base weights in float8 e4m3 cast to bf16 per use,
  cfg 3.5 (both branches); DRaFT-1; decoded with its own 64-channel 32x VAE decoder
  (``AutoencoderKLHunyuanImage``, block widths 128 ... 1024, bf16).
* ``wan21_1_3b_480p``: Wan 2.1 T2V 1.3B (``WanTransformer3DModel``: 30 blocks, 1536 wide, 12
  heads, FFN 8960) at 480x832, 33 frames (9 latent frames of 30 x 52 patches: 14,040 tokens; 512
  T5 tokens), bf16, cfg 5 (both branches in one batch); only the first 3 latent frames (9 frames)
  are decoded, by the Wan 2.1 VAE decoder (causal, frame by frame), and
  every frame is scored (the reward of a video is their mean). DRaFT-1 and DRaFT-LV n = 2.
  The decoder is the one a ComfyUI user's trainer runs: ComfyUI's own ``comfy.ldm.wan.vae.WanVAE``
  (Wan 2.1) or ``comfy.ldm.wan.vae2_2.WanVAE`` (Wan 2.2) as ``comfy.sd.VAE`` configures it from
  the VAE file, at full size in bf16 (``vae_dtype`` on a bf16 GPU; no encoder), its checkpoint
  units ``nodes/comfy_glue.py`` ``decoder_checkpoint_units`` and its call the trainer node's
  ``comfy_glue.make_decoder`` (the first latent frames, ComfyUI's ``Wan21`` / ``Wan22`` latent
  format out, ``first_stage_model.decode``, ``process_output``); ``nodes/`` modules are imported
  without ``nodes/__init__.py`` (:func:`tools.measure.setup.pack_module`) and ComfyUI is found
  through ``COMFYUI_PATH``, the ComfyUI the pack is installed in or ``.cache/ComfyUI``
  (:func:`import_comfyui`; an error without one). (diffusers' ``AutoencoderKLWan``, traced before,
  normalises and upsamples in float32: the 5B row's update was 0.96 GiB more.)
  Lean as the trainer node runs a video family: the decoder checkpointed once per latent frame
  around its blocks (its blocks given several frames recomputed one frame at a time), and the
  single differentiated
  step checkpointed whole on top of its blocks (``trainer_memory_kwargs(video=True)``), CFG's two
  branches recomputed one at a time inside it (``training.step_checkpoint.branches_apart``, as
  the node's ``comfy_glue.branches_apart_cfg``).
* ``wan22_5b_720p``: Wan 2.2 TI2V-5B (``WanTransformer3DModel`` in Wan-AI/Wan2.2-TI2V-5B's
  configuration: 30 blocks, 3072 wide, 24 heads, FFN 14336, 48 latent channels) at 704x1280, 33
  frames (9 latent frames of its 16x VAE, 44 x 80 latents, 22 x 40 patches: 7,920 tokens), bf16,
  cfg 5; the first 3 latent frames decoded by the Wan 2.2 VAE decoder (ComfyUI's ``vae2_2``:
  decoder width 256, 48 channels, residual up blocks, patch 2, 16x); DRaFT-1.
* ``wan22_14b_480p``: one Wan 2.2 A14B expert (the low-noise one; each expert is a Wan 2.1 14B
  transformer: 40 blocks, 5120 wide, 40 heads, FFN 13824), base weights in float8 e4m3 cast to
  bf16 per use (ComfyUI's fp8 expert files), at 480x832, 33 frames (14,040 tokens), cfg 5 (Wan
  2.2's T2V guide scale on its low-noise steps is 3; 5 keeps both branches, the same memory),
  the Wan 2.1 VAE decoding 3 latent frames; DRaFT-1. The other expert denoises the high-noise
  steps without gradient (the no-grad prefix): its weights sit beside these if both are resident
  (14 GiB more in fp8); ComfyUI may offload either between the two.

FLUX, SD3.5 and Lumina 2 decode with the 16-channel FLUX/SD3 VAE decoder (``AutoencoderKL``, no
quant convs, bf16); all score with the LAION aesthetic reward (CLIP ViT-L/14, bf16); LoRA rank 8 on the
attention targets of ``nodes/architectures.py`` in diffusers naming (FLUX / HunyuanImage:
``to_q/k/v``, ``to_out.0``, ``add_*_proj``, ``to_add_out``, single blocks' ``to_q/k/v``,
``proj_mlp``, ``proj_out``; SD3: ``attn`` and ``attn2`` projections; Lumina 2: every block's
``attn.to_q/k/v/to_out.0``, refiners included), inside the blocks only (HunyuanImage's text token
refiner has attention too; it is not a target). Text encoders are not counted (ComfyUI offloads
them once the prompts are encoded); their outputs are.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

from tools.measure.setup import (build_aesthetic_reward, pack_module, trace_update, update_sampler,
                                 update_trainer, vae_decoder)

DIT_MODELS = {"flux_dev_1024": 1024, "sd35m_1024": 1024, "wan21_1_3b_480p": 480, "lumina2_1024": 1024,
              "hunyuanimage21_2048": 2048, "wan22_5b_720p": 704, "wan22_14b_480p": 480}
# Wan: (height, width, frames, decoded latent frames); frames = 4 (latent frames - 1) + 1
WAN_VIDEO = {"wan21_1_3b_480p": (480, 832, 33, 3), "wan22_5b_720p": (704, 1280, 33, 3),
             "wan22_14b_480p": (480, 832, 33, 3)}
# Wan: (transformer configuration, Wan 2.2 VAE, fp8 base weights, ComfyUI's sampling shift)
WAN_SPECS = {
    "wan21_1_3b_480p": (dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,  # Wan2.1-T2V-1.3B
                             num_layers=30), False, False, 8.0),
    "wan22_5b_720p": (dict(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336,  # Wan2.2-TI2V-5B
                           num_layers=30, in_channels=48, out_channels=48), True, False, 8.0),
    "wan22_14b_480p": (dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824,  # Wan2.2-T2V-A14B
                            num_layers=40), False, True, 8.0),                               # (one expert)
}
# model -> (latent channels, VAE downscale, VAE scale, VAE shift or None, cfg, text tokens, text
# width, pooled width or None, fp8 base weights, schedule shift)
SPECS = {
    "flux_dev_1024": (16, 8, 0.3611, 0.1159, 1.0, 512, 4096, 768, True, 3.0),
    "sd35m_1024": (16, 8, 1.5305, 0.0609, 4.5, 333, 4096, 2048, False, 3.0),
    "lumina2_1024": (16, 8, 0.3611, 0.1159, 4.0, 256, 2304, None, False, 6.0),
    "hunyuanimage21_2048": (64, 32, 0.75289, None, 3.5, 256, 3584, None, True, 5.0),
}
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.", "layers.", "noise_refiner.",
                  "context_refiner.")


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
    if model == "lumina2_1024":
        from diffusers import Lumina2Transformer2DModel
        return Lumina2Transformer2DModel(  # Alpha-VLLM/Lumina-Image-2.0
            sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=26,
            num_refiner_layers=2, num_attention_heads=24, num_kv_heads=8, multiple_of=256,
            norm_eps=1e-5, axes_dim_rope=(32, 32, 32), axes_lens=(300, 512, 512), cap_feat_dim=2304)
    if model == "hunyuanimage21_2048":
        from diffusers import HunyuanImageTransformer2DModel
        return HunyuanImageTransformer2DModel(  # hunyuanvideo-community/HunyuanImage-2.1-Diffusers
            in_channels=64, out_channels=64, num_attention_heads=28, attention_head_dim=128,
            num_layers=20, num_single_layers=40, num_refiner_layers=2, patch_size=(1, 1),
            text_embed_dim=3584, text_embed_2_dim=1472, rope_axes_dim=(64, 64))
    raise ValueError(model)


def hunyuan_image_vae_decoder():
    """HunyuanImage 2.1's 64-channel 32x VAE (``AutoencoderKLHunyuanImage``) without its encoder."""
    from diffusers import AutoencoderKLHunyuanImage
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=64,
                                    block_out_channels=(128, 256, 512, 512, 1024, 1024),
                                    layers_per_block=2, spatial_compression_ratio=32,
                                    sample_size=512, scaling_factor=0.75289)
    del vae.encoder
    return vae


def attention_targets(transformer) -> list:
    """The ``attention`` target set in diffusers names (see the module docstring)."""
    ends = (".to_q", ".to_k", ".to_v", ".to_out.0", ".add_q_proj", ".add_k_proj", ".add_v_proj",
            ".to_add_out")
    names = [n for n, _ in transformer.named_modules() if n.endswith(ends)
             and (".attn." in n or ".attn2." in n) and n.startswith(BLOCK_PREFIXES)]
    names += [n for n, _ in transformer.named_modules()
              if n.startswith("single_transformer_blocks.") and n.endswith((".proj_mlp", ".proj_out"))]
    return names


def store_fp8(transformer) -> None:
    """Every Linear weight in the blocks (Wan's ``blocks.``) kept in float8 e4m3, cast to bf16 on
    use (ComfyUI's fp8)."""
    import torch
    from torch.nn.utils import parametrize

    class CastOnUse(torch.nn.Module):
        def forward(self, w):
            return w.to(torch.bfloat16)
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and ("transformer_blocks." in name
                                                     or name.startswith("blocks.")):
            module.weight = torch.nn.Parameter(module.weight.detach().to(torch.float8_e4m3fn),
                                               requires_grad=False)
            parametrize.register_parametrization(module, "weight", CastOnUse(), unsafe=True)


def block_units(transformer) -> list:
    units = []
    for name in ("context_refiner", "noise_refiner", "layers", "transformer_blocks", "blocks",
                 "single_transformer_blocks"):  # blocks: Wan
        units += list(getattr(transformer, name, []) or [])
    return units


def wan_attention_targets(transformer) -> list:
    """Wan's ``attention`` set in diffusers names: self- (attn1) and cross-attention (attn2)
    q, k, v, out."""
    return [n for n, _ in transformer.named_modules() if n.startswith("blocks.")
            and n.endswith((".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out.0",
                            ".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0"))]


def import_comfyui():
    """ComfyUI's ``comfy`` importable, on the CPU: ``COMFYUI_PATH``, the ComfyUI this pack is
    installed in, or ``.cache/ComfyUI``, cloned there as ``make demo`` does when absent
    (``tools/comfyui_bootstrap.py``: ``COMFYUI_GIT_URL`` / ``COMFYUI_REF``); a clear error when it
    cannot be had."""
    import sys
    from tools.comfyui_bootstrap import BootstrapError, ensure_comfyui
    try:
        path = ensure_comfyui(log=lambda line: print(line, file=sys.stderr))
    except BootstrapError as e:
        raise SystemExit(f"the Wan rows build ComfyUI's own Wan VAE, and ComfyUI could not be had: "
                         f"{e} (or set COMFYUI_PATH to a ComfyUI 0.3.64+ checkout)") from e
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args
    args.cpu = True  # comfy.model_management probes CUDA at import otherwise; nothing runs on it
    import comfy.latent_formats  # noqa: F401
    import comfy.ldm.wan.vae  # noqa: F401
    import comfy.ldm.wan.vae2_2  # noqa: F401
    return sys.modules["comfy"]


def comfyui_wan_vae(comfy, wan22: bool):
    """ComfyUI's own Wan VAE as ``comfy.sd.VAE`` builds it from a Wan 2.2 / 2.1 VAE file
    (``comfy.ldm.wan.vae2_2.WanVAE``: 160 wide encoder, 256 wide decoder, 48 channels; or
    ``comfy.ldm.wan.vae.WanVAE``: 96 wide, 16 channels), in bf16 as ``vae_dtype`` picks on a bf16
    GPU (built so: the default dtype is bf16 here; ``.to`` cannot swap fake parameters), without
    its encoder (not used by the update; as the other rows' decoders)."""
    import torch
    config = dict(dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0)
    if wan22:
        vae = comfy.ldm.wan.vae2_2.WanVAE(dim=160, z_dim=48, **config)
    else:
        vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, **config)
    vae.encoder, vae.conv1 = torch.nn.Module(), torch.nn.Module()  # (clear_cache counts their convs)
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
    return vae


def measure_wan(model: str, method: str, batch: int, steps: int, mode: str = "lean") -> dict:
    """Peak bytes of one Wan 2.1 / 2.2 video update (see the module docstring; modes as measure_dit)."""
    import torch
    from torch import nn
    from diffusers import WanTransformer3DModel
    from training import wrap_module
    from training.memory_trace import fake_mode
    from training.step_checkpoint import branches_apart

    torch.set_default_dtype(torch.bfloat16)
    height, width, frames, decoded = WAN_VIDEO[model]
    config, wan22_vae_used, fp8, shift = WAN_SPECS[model]  # shift: ComfyUI's WAN21_T2V / WAN22_T2V
    down, channels = (16, 48) if wan22_vae_used else (8, 16)
    latent_t, h, w = (frames - 1) // 4 + 1, height // down, width // down
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    sigmas = (shift * t / (1 + (shift - 1) * t)).float()

    def renoise(s, n, x0):
        s = s.reshape(-1, 1, 1, 1, 1).to(n)
        return s * n + (1 - s) * x0
    sampler = update_sampler(method, sigmas, renoise=renoise)
    comfy = import_comfyui()
    glue = pack_module("nodes.comfy_glue")  # the trainer node's decoder units and video decode
    latent_format = (comfy.latent_formats.Wan22 if wan22_vae_used else comfy.latent_formats.Wan21)()
    started = time.perf_counter()
    with fake_mode():
        transformer = WanTransformer3DModel(**config)
        autoencoder = comfyui_wan_vae(comfy, wan22_vae_used)
        reward = build_aesthetic_reward()
        for m in (transformer, autoencoder, reward):
            m.eval().requires_grad_(False)
        if fp8:
            store_fp8(transformer)
        lora = wrap_module(transformer, wan_attention_targets(transformer), rank=8, alpha=8.0, seed=0)
        lora_params = list(lora.parameters())
        tokens, cfg = 512, 5.0
        context, uncond = torch.randn(4, tokens, 4096), torch.randn(1, tokens, 4096)

        class Denoiser(nn.Module):
            """Flow model: x0 = x - sigma * v; CFG with both branches in one batch, or, where the
            trainer checkpoints the step whole over its blocks (``apart``), each branch a
            recomputed step of its own under gradient, as the trainer node's
            ``comfy_glue.branches_apart_cfg``."""
            apart = False

            def forward(self, x, sigma, index):
                s = sigma.to(x.dtype)
                b = x.shape[0]
                if self.apart and torch.is_grad_enabled():
                    v_u, v_c = branches_apart([
                        lambda x_in, c=c: transformer(x_in, s * 1000, c, return_dict=False)[0]
                        for c in (uncond.expand(b, -1, -1), context[index])], x, lora_params)
                else:
                    v_u, v_c = transformer(torch.cat([x, x]), torch.cat([s, s]) * 1000,
                                           torch.cat([uncond.expand(b, -1, -1), context[index]]),
                                           return_dict=False)[0].chunk(2)
                v = v_u + cfg * (v_c - v_u)
                return x - s.reshape(-1, 1, 1, 1, 1) * v.to(x.dtype)

        # the trainer node's video decode (comfy_glue.make_decoder): the first `decoded` latent
        # frames, ComfyUI's latent format out, the VAE's dtype, first_stage_model.decode, frames
        # -> (B*F, 3, H, W); the VAE and model as comfy.sd.VAE / BaseModel give them
        vae = SimpleNamespace(first_stage_model=autoencoder, device=torch.device("cpu"),
                              vae_dtype=torch.bfloat16,
                              process_output=lambda image: torch.clamp((image + 1.0) / 2.0, 0.0, 1.0))
        decode = glue.make_decoder(vae, SimpleNamespace(process_latent_out=latent_format.process_out),
                                   latent_frames=decoded)
        denoiser = Denoiser()
        trainer = update_trainer(sampler, denoiser, autoencoder, 1.0, None, reward, lora,
                                 (channels, latent_t, h, w), batch, mode, block_units(transformer),
                                 decode=decode, video=True,
                                 decoder_units=glue.decoder_checkpoint_units(autoencoder))
        denoiser.apart = trainer.whole_step_over_blocks
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
    channels, down, scale, shift_z, cfg, tokens, text_width, pooled_dim, fp8, shift = SPECS[model]
    kind = {"flux_dev_1024": "flux", "sd35m_1024": "sd3", "lumina2_1024": "lumina",
            "hunyuanimage21_2048": "hunyuan"}[model]
    # the model's shift on a linear schedule (FLUX's resolution-dependent shift gives a schedule
    # of the same length; only the length matters for memory)
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    sigmas = (shift * t / (1 + (shift - 1) * t)).float()
    sampler = update_sampler(method, sigmas,
                             renoise=lambda s, n, x0: s.reshape(-1, 1, 1, 1).to(n) * n
                             + (1 - s.reshape(-1, 1, 1, 1).to(n)) * x0)
    started = time.perf_counter()
    with fake_mode():
        latent = resolution // down
        transformer = build_transformer(model)
        vae = hunyuan_image_vae_decoder() if kind == "hunyuan" else vae_decoder(16)
        reward = build_aesthetic_reward()
        for m in (transformer, vae, reward):
            m.eval().requires_grad_(False)
        if fp8:
            store_fp8(transformer)
        lora = wrap_module(transformer, attention_targets(transformer), rank=8, alpha=8.0, seed=0)
        context = torch.randn(4, tokens, text_width)
        uncond = torch.randn(1, tokens, text_width)
        pooled = torch.randn(4, pooled_dim or 1)
        uncond_pooled = torch.randn(1, pooled_dim or 1)
        h = latent // 2
        rows = torch.arange(h, dtype=torch.float32)
        img_ids = torch.stack([torch.zeros(h, h), rows[:, None].expand(h, h),
                               rows[None, :].expand(h, h)], -1).reshape(-1, 3).float()
        txt_ids = torch.zeros(tokens, 3, dtype=torch.float32)

        def velocity(x, s, ctx, pool):
            b, c = x.shape[:2]
            if kind == "sd3":
                return transformer(x, encoder_hidden_states=ctx, pooled_projections=pool,
                                   timestep=s * 1000, return_dict=False)[0]
            if kind == "lumina":  # Lumina's time runs from 0 (noise) to 1; it predicts -v
                mask = torch.ones(b, tokens, dtype=torch.bool)
                return -transformer(x, 1 - s, ctx, mask, return_dict=False)[0]
            if kind == "hunyuan":
                mask = torch.ones(b, tokens, dtype=torch.bool)
                return transformer(x, s * 1000, ctx, mask, return_dict=False)[0]
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

        trainer = update_trainer(sampler, Denoiser(), vae, scale, shift_z, reward, lora,
                                 (channels, latent, latent), batch, mode, block_units(transformer))
    row = dict(model=model, method=method, batch=batch, mode=mode, lowvram=False, steps=steps,
               resolution=resolution)
    return trace_update(trainer, row, transformer, vae, reward, lora, started)
