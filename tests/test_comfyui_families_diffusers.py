"""The optional diffusers/PEFT folder for FLUX.1 and SD3/SD3.5 (marker ``comfyui``).

A diffusers ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` at reduced width is loaded
(strictly) with the tiny ComfyUI model's weights through ComfyUI's own ``flux_to_diffusers`` /
``mmdit_to_diffusers`` maps, so both give the same base output. The LoRA folder, whose fused
``qkv`` / ``linear1`` LoRAs are split at those maps' row offsets, loads through diffusers'
``load_lora_adapter`` with every key used, and the twin's output equals ComfyUI's model with the
LoRA merged into its fused weights.
"""
import copy

import pytest
import torch

import dit_fixtures as D
import lora_fixtures as F

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def comfy():
    return F.import_comfy()


@pytest.fixture(scope="module")
def pack(comfy):
    return {name: F.import_pack_module(f"nodes.{name}") for name in ("comfy_glue", "lora_keys")}


def _twin_state_dict(comfy, key_map, ldm_sd, wanted):
    """diffusers tensors from the ComfyUI model's, through ComfyUI's key map."""
    out = {}
    for key in wanted:
        target = key_map[key]
        if isinstance(target, str):
            out[key] = ldm_sd[target]
        elif target[1] is None:  # a transform (adaLN scale/shift swap)
            out[key] = target[2](ldm_sd[target[0]])
        else:
            dim, offset, size = target[1]
            out[key] = ldm_sd[target[0]].narrow(dim, offset, size)
    return out


def _flux(comfy):
    from diffusers import FluxTransformer2DModel
    patcher = D.tiny_model("flux_dev")
    cfg = patcher.model.model_config.unet_config
    twin = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=cfg["depth"],
                                  num_single_layers=cfg["depth_single_blocks"], attention_head_dim=32,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    key_map = comfy.utils.flux_to_diffusers(cfg, output_prefix="")
    return patcher, twin, key_map


def _sd3(comfy, kind):
    from diffusers import SD3Transformer2DModel
    patcher = D.tiny_model(kind)
    cfg = patcher.model.model_config.unet_config
    twin = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=cfg["depth"],
                                 attention_head_dim=64, num_attention_heads=cfg["depth"],
                                 joint_attention_dim=32, caption_projection_dim=64 * cfg["depth"],
                                 pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16,
                                 dual_attention_layers=tuple(cfg.get("x_block_self_attn_layers", [])),
                                 qk_norm="rms_norm" if cfg.get("qk_norm") else None)
    key_map = comfy.utils.mmdit_to_diffusers(cfg, output_prefix="")
    return patcher, twin, key_map


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.9, 0.4]),
            torch.randn(2, 6, 32, generator=g), torch.randn(2, 32, generator=g))


def _comfy_forward(model, kind):
    x, t, ctx, pooled = _inputs()
    with torch.no_grad():
        if kind == "flux_dev":
            return model.diffusion_model(x, t, ctx, y=pooled, guidance=torch.tensor([3.5, 2.0])).float()
        return model.diffusion_model(x, t * 1000, context=ctx, y=pooled).float()


def _twin_forward(twin, kind):
    x, t, ctx, pooled = _inputs()
    with torch.no_grad():
        if kind != "flux_dev":
            return twin(x, encoder_hidden_states=ctx, pooled_projections=pooled,
                        timestep=t * 1000).sample.float()
        b, c, h, w = x.shape
        packed = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        out = twin(packed, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                   img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(ctx.shape[1], 3),
                   guidance=torch.tensor([3.5, 2.0])).sample
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w).float()


@pytest.mark.parametrize("kind", ["flux_dev", "sd3_medium", "sd3_5_medium", "sd3_5_large"])
def test_diffusers_folder_gives_the_same_output_in_a_diffusers_transformer(kind, comfy, pack, tmp_path):
    from safetensors.torch import load_file

    from training import lora_diffusers
    patcher, twin, key_map = _flux(comfy) if kind == "flux_dev" else _sd3(comfy, kind)
    ldm_sd = patcher.model.diffusion_model.state_dict()
    twin.load_state_dict(_twin_state_dict(comfy, key_map, ldm_sd, twin.state_dict()), strict=True)
    twin.eval()
    base = _comfy_forward(patcher.model, kind)
    assert F.rel_err(_twin_forward(twin, kind), base) < 1e-4  # the same base model

    names = pack["comfy_glue"].target_module_names(patcher, "kohya default")
    lora = F.random_lora(patcher.model.diffusion_model, names, rank=4, alpha=2.0, std=0.3)
    facts = pack["lora_keys"].diffusers_folder_facts(patcher)
    assert facts["prefix"] == "transformer" and set(names) <= set(facts["name_map"])
    fused = "single_blocks.0.linear1" if kind == "flux_dev" else "joint_blocks.0.x_block.attn.qkv"
    assert [p for p, _, _ in facts["name_map"][fused]][:3] == (
        ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
         "single_transformer_blocks.0.attn.to_v"] if kind == "flux_dev" else
        ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"])
    folder = lora_diffusers.save_diffusers_folder(str(tmp_path / "peft"), lora, facts["name_map"],
                                                  prefix="transformer")
    sd = load_file(f"{folder}/{lora_diffusers.DIFFUSERS_WEIGHT_NAME}")
    twin.load_lora_adapter(sd, prefix="transformer", adapter_name="draft")
    from peft.tuners.lora import LoraLayer
    wrapped = {n for n, m in twin.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {k[len("transformer."):-len(".lora_A.weight")] for k in sd if k.endswith("lora_A.weight")}

    merged = copy.deepcopy(patcher.model)
    modules = dict(merged.diffusion_model.named_modules())
    with torch.no_grad():
        for name, delta in lora.items():
            modules[name].weight.copy_(delta(modules[name].weight))
    expected = _comfy_forward(merged, kind)
    got = _twin_forward(twin, kind)
    assert F.rel_err(expected, base) > 1e-2  # the LoRA changes the output
    assert F.rel_err(got, expected) < 1e-4
