"""Tiny DiT / flow models of every family DRaFT supports, built with ComfyUI's own classes.

* Diffusion models: ComfyUI's config classes (``comfy.supported_models.SD3/Flux/FluxSchnell/
  Chroma/QwenImage/WAN21_T2V/Lumina2/HunyuanImage21(unet_config).get_model({})``, which pick
  ``comfy.model_base``'s class, latent format and ``model_sampling``) at reduced width and depth; ComfyUI's state-dict detection of
  Flux / Qwen-Image assumes full width, so the config is given directly. Weights are seeded and
  explicit (ComfyUI's ops leave them empty).
* VAEs: ComfyUI's ``comfy.sd.VAE`` built from a state dict: a 16-channel TAESD (taesd3 / taef1
  layout, with the family's scale/shift) for SD3 / FLUX / Chroma; the real Wan 2.1 VAE (fixed
  full width in ComfyUI, about 127 M parameters) for Qwen-Image, which decodes its 5-D latents;
  the same class at width 16 for Wan 2.1 (its video: 4k + 1 frames from k + 1 latent frames);
  the Wan 2.2 VAE (``comfy/ldm/wan/vae2_2.py``: 48 channels, 16x, encoder width 160 and decoder
  width 256 in ComfyUI) at width 16 for Wan 2.2 TI2V-5B, built the same way.
  HunyuanImage 2.1's 64-channel 32x VAE: ComfyUI fixes its width too (``comfy/sd.py``: block
  widths 128 ... 1024, picked when ``decoder.conv_in.weight`` has 64 input channels), so it is
  built at full width (about 406 M parameters, 1.6 GB in float32) from a state dict of the same
  ComfyUI classes with seeded weights; at 64 px its latent is 2 x 2, which keeps decoding cheap.
  Lumina 2 (FLUX's latent format) takes the taef1-layout TAESD.
* Text conditioning is FAKE: a fixed pseudo-random function of the prompt, in the shapes each
  family's text encoders give (ComfyUI cannot build a small T5-XXL / CLIP-G / Qwen2.5-VL).

Nothing here is imported by the project.
"""
from __future__ import annotations


import torch

from lora_fixtures import fill_ as lora_fill_, import_comfy, tiny_patcher

_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=32,
             context_in_dim=32, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2,
             depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True)
_CHROMA = {k: v for k, v in _FLUX.items() if k != "vec_in_dim"}
_CHROMA.update(image_model="chroma", in_channels=64, out_channels=64, in_dim=64, out_dim=64,
               hidden_dim=32, n_layers=1)
_QWEN = dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=2,
             attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
             axes_dims_rope=(8, 12, 12))
_WAN21 = dict(image_model="wan2.1", model_type="t2v", dim=64, ffn_dim=128, freq_dim=32, text_dim=32,
              num_heads=2, num_layers=2, in_dim=16, out_dim=16, eps=1e-6)
_LUMINA = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=2,
               n_refiner_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16, qk_norm=True,
               cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[300, 512, 512])
# HunyuanImage 2.1's unet_config as ComfyUI's detection gives it (patch 1x1, no vector / guidance /
# byT5 / meanflow input), at reduced width and depth
_HUNYUAN_IMAGE = dict(image_model="hunyuan_video", in_channels=64, out_channels=64, patch_size=[1, 1],
                      vec_in_dim=None, axes_dim=[16, 16], meanflow=False, context_in_dim=32,
                      hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                      theta=256, qkv_bias=True, byt5=False, guidance_embed=False)
_SD3 = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None,
            adm_in_channels=32, num_patches=256, pos_embed_max_size=16,
            context_embedder_config={"target": "torch.nn.Linear",
                                     "params": {"in_features": 32, "out_features": 128}},
            pos_embed_scaling_factor=None, x_block_self_attn_layers=[])

# kind -> (comfy.supported_models class, unet_config, conditioning kind)
FAMILIES = {
    "sd3_medium": ("SD3", _SD3, "pooled"),
    "sd3_5_medium": ("SD3", dict(_SD3, qk_norm="rms", x_block_self_attn_layers=[0]), "pooled"),
    "sd3_5_large": ("SD3", dict(_SD3, qk_norm="rms"), "pooled"),
    "flux_dev": ("Flux", dict(_FLUX, guidance_embed=True), "pooled"),
    "flux_schnell": ("FluxSchnell", dict(_FLUX, guidance_embed=False), "pooled"),
    "chroma": ("Chroma", _CHROMA, "no pooled"),  # T5 only: pooled_output is None
    "qwen_image": ("QwenImage", _QWEN, "context"),
    "wan21_t2v": ("WAN21_T2V", _WAN21, "context"),  # video: latents (B, 16, T, h, w)
    # Wan 2.2 TI2V-5B: ComfyUI's WAN22_T2V (model_base.WAN22), latents (B, 48, T, h, w)
    "wan22_ti2v_5b": ("WAN22_T2V", dict(_WAN21, in_dim=48, out_dim=48), "context"),
    "lumina2": ("Lumina2", _LUMINA, "masked"),  # Gemma 2 tokens + attention mask
    "hunyuan_image_2_1": ("HunyuanImage21", _HUNYUAN_IMAGE, "context"),
}
VIDEO = {"wan21_t2v", "wan22_ti2v_5b"}
TEXT_WIDTH, TEXT_TOKENS = 32, 6


def fill_(module: torch.nn.Module, seed: int) -> None:
    """lora_fixtures.fill_'s seeded init, plus MMDiT's position-embedding buffer (registered empty:
    a checkpoint fills it)."""
    g = lora_fill_(module, seed)
    with torch.no_grad():
        for name, b in module.named_buffers():
            if name.endswith("pos_embed"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def tiny_model(kind: str, seed: int = 0):
    """A ``ModelPatcher`` around a tiny ComfyUI model of ``kind`` (a key of :data:`FAMILIES`)."""
    class_name, unet_config, _ = FAMILIES[kind]
    return tiny_patcher(class_name, unet_config, seed, fill=fill_)


def conditioning(kind: str):
    """``prompt -> CONDITIONING`` of one entry, FAKE (see the module docstring)."""
    pooled = FAMILIES[kind][2] == "pooled"

    def encode(text: str):
        g = torch.Generator().manual_seed(sum(map(ord, text)) * 31 + len(text))
        extra = {"pooled_output": torch.randn(1, TEXT_WIDTH, generator=g)} if pooled else {}
        if FAMILIES[kind][2] == "no pooled":
            extra = {"pooled_output": None}
        if FAMILIES[kind][2] == "masked":  # Lumina2.extra_conds reads num_tokens off the mask
            extra = {"attention_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.long)}
        return [[torch.randn(1, TEXT_TOKENS, TEXT_WIDTH, generator=g), extra]]
    return encode


# Wan's VAE at width 16 instead of 96 (its own class, every layer; ComfyUI's VAE(sd=...) fixes the
# width, so it is built at this width while the VAE is made): a video decode with gradient at full
# width takes minutes on 2 CPU cores.
WAN_VAE_DIM = 16
_TAESD = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}


def tiny_vae(kind: str, seed: int = 0):
    """ComfyUI's ``VAE`` for ``kind``: 16-channel TAESD, Wan 2.1's for Qwen-Image and Wan, HunyuanImage
    2.1's own 32x VAE (see above)."""
    comfy = import_comfy()
    import comfy.sd
    if kind == "hunyuan_image_2_1":
        return _hunyuan_image_vae(comfy, seed)
    if kind == "wan22_ti2v_5b":
        import comfy.ldm.wan.vae2_2
        real = comfy.ldm.wan.vae2_2.WanVAE
        narrow = dict(dim=WAN_VAE_DIM, dec_dim=WAN_VAE_DIM)
        module = real(**narrow, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
        fill_(module, seed)
        # ComfyUI builds the Wan 2.2 VAE at widths 160 / 256 whatever the state dict says
        comfy.ldm.wan.vae2_2.WanVAE = lambda **config: real(**{**config, **narrow})
        try:
            return comfy.sd.VAE(sd=module.state_dict())
        finally:
            comfy.ldm.wan.vae2_2.WanVAE = real
    if kind in ("qwen_image", "wan21_t2v"):
        import comfy.ldm.wan.vae
        dim = 96 if kind == "qwen_image" else WAN_VAE_DIM
        real = comfy.ldm.wan.vae.WanVAE
        module = real(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
        fill_(module, seed)
        if dim != 96:  # ComfyUI builds the Wan VAE at width 96 whatever the state dict says
            comfy.ldm.wan.vae.WanVAE = lambda **config: real(**{**config, "dim": dim})
            try:
                return comfy.sd.VAE(sd=module.state_dict())
            finally:
                comfy.ldm.wan.vae.WanVAE = real
        sd = module.state_dict()
    else:
        import comfy.taesd.taesd
        module = comfy.taesd.taesd.TAESD(latent_channels=16)
        fill_(module, seed)
        sd = {k: v for k, v in module.state_dict().items() if not k.startswith("vae_")}
        scale, shift = _TAESD["sd3" if kind.startswith("sd3") else "flux"]  # Lumina 2: FLUX's
        sd["vae_scale"], sd["vae_shift"] = torch.tensor(scale), torch.tensor(shift)
    return comfy.sd.VAE(sd=sd)


_HUNYUAN_VAE_CACHE: dict = {}


def _hunyuan_image_vae(comfy, seed):
    """ComfyUI's HunyuanImage 2.1 VAE (full width, see the module docstring), seeded weights; the
    state dict is built once per seed (building and filling 406 M parameters takes seconds)."""
    if seed not in _HUNYUAN_VAE_CACHE:
        import comfy.ldm.hunyuan_video.vae as hv
        config = {"block_out_channels": [128, 256, 512, 512, 1024, 1024], "in_channels": 3,
                  "out_channels": 3, "num_res_blocks": 2, "ffactor_spatial": 32,
                  "downsample_match_channel": True, "upsample_match_channel": True, "z_channels": 64}
        sd = {}
        for part, cls in (("encoder", hv.Encoder), ("decoder", hv.Decoder)):
            module = cls(**config)
            g = lora_fill_(module, seed)
            with torch.no_grad():  # keep the residual stream tame at random init
                for name, p in module.named_parameters():
                    if name.endswith("conv2.weight"):
                        p.mul_(0.1)
            del g
            sd.update({f"{part}.{k}": v for k, v in module.state_dict().items()})
        _HUNYUAN_VAE_CACHE[seed] = sd
    import comfy.sd
    return comfy.sd.VAE(sd=dict(_HUNYUAN_VAE_CACHE[seed]))


def decode_value_and_grad(decode, latent, weights) -> tuple:
    """``(decode(latent), gradient of (decode(latent) * weights).sum() with respect to latent)``."""
    x = latent.clone().requires_grad_(True)
    out = decode(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad


def decode_frame_by_frame(decode, units, latent, weights, monkeypatch) -> tuple:
    """A Wan 2.1 decode (``decode(latent) -> frames``) and its gradient
    (:func:`decode_value_and_grad`), plain and with ``units`` checkpointed (the lean way):
    ``(plain, checkpointed, frame counts)``, the counts those of the blocks recomputed one frame at
    a time (``training.checkpointing._FrameByFrame``)."""
    import training.checkpointing as ckpt

    def value_and_grad():
        return decode_value_and_grad(decode, latent, weights)
    plain = value_and_grad()
    frames, original = [], ckpt._FrameByFrame.forward

    def counted(ctx, run, layout, x, *old):
        frames.append(x.shape[2])
        return original(ctx, run, layout, x, *old)
    monkeypatch.setattr(ckpt._FrameByFrame, "forward", staticmethod(counted))
    with ckpt.checkpoint_blocks(units):
        checkpointed = value_and_grad()
    return plain, checkpointed, frames
