"""Portable LoRA files against the real loaders (marker ``comfyui``).

* An exported file loads in ComfyUI's LoraLoader path (``comfy.sd.load_lora_for_models``) with
  every key applied, and in diffusers (``lora_state_dict`` + ``load_lora_into_unet``; the PEFT folder
  through a pipeline's ``load_lora_weights``) on UNets holding the same base weights: the outputs
  agree with each other and with the LoRA as trained, and differ from the base output. Tiny UNets of
  the SD1.5 and the SDXL layout, built with ComfyUI's own classes.
* For the full SD1.5 and SDXL layouts (names only, meta device) the exported modules are exactly
  kohya's default targets derived from diffusers' own ``UNet2DConditionModel`` (192 for SD1.5),
  and A1111's parsing rule resolves every key to the compvis module it was trained on.
"""
import copy
import logging
import os
import types

import pytest
import torch
from safetensors import safe_open

import lora_fixtures as F
from training import lora_diffusers, lora_file, lora_metadata, lora_naming, lora_resume

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]

SD15_DIFFUSERS = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                      cross_attention_dim=768, attention_head_dim=8)  # runwayml/stable-diffusion-v1-5
SDXL_DIFFUSERS = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                      use_linear_projection=True, cross_attention_dim=2048,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816)  # stabilityai/sdxl-base-1.0


@pytest.fixture(scope="module")
def comfy():
    return F.import_comfy()


@pytest.fixture(scope="module")
def lora_keys(comfy):
    return F.import_pack_module("nodes.lora_keys")


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny(request, comfy, lora_keys):
    """A tiny ComfyUI model, its LoRA on kohya's targets, the name map and base outputs."""
    kind = request.param
    patcher = F.comfy_tiny_model(kind)
    twin = F.diffusers_twin(patcher, kind)
    dm = patcher.model.diffusion_model
    names = F.ldm_kohya_targets(dm)
    lora = F.random_lora(dm, names, rank=4, alpha=2.5)
    base = F.comfy_forward(patcher, kind, twin)
    assert F.rel_err(F.diffusers_forward(twin, kind), base) < 1e-5  # same base weights
    return dict(kind=kind, patcher=patcher, twin=twin, lora=lora, base=base,
                name_map=lora_keys.ldm_to_diffusers_module_names(patcher.model.model_config.unet_config))


def trained_forward(tiny) -> torch.Tensor:
    """The UNet output with the LoRA applied as the trainer applies it (w + delta)."""
    model = copy.deepcopy(tiny["patcher"].model)
    modules = dict(model.diffusion_model.named_modules())
    with torch.no_grad():
        for name, delta in tiny["lora"].items():
            modules[name].weight.copy_(delta(modules[name].weight))
    return F.comfy_forward(types.SimpleNamespace(model=model), tiny["kind"], tiny["twin"])


def comfy_lora_forward(comfy, tiny, path, caplog) -> torch.Tensor:
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(tiny["patcher"], None, sd, 1.0, 0.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert set(patched.patches) == {f"diffusion_model.{n}.weight" for n in tiny["lora"].names()}
    patched.patch_model()
    try:
        return F.comfy_forward(patched, tiny["kind"], tiny["twin"])
    finally:
        patched.unpatch_model()


def test_export_loads_identically_in_comfyui_and_diffusers(tiny, comfy, lora_keys, tmp_path, caplog):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    kind, patcher, lora = tiny["kind"], tiny["patcher"], tiny["lora"]
    path = lora_file.save_kohya(str(tmp_path / f"{kind}.safetensors"), lora, tiny["name_map"],
                                base_model=lora_keys.base_model_version(patcher),
                                v_prediction=lora_keys.is_v_prediction(patcher), dtype=torch.float32)
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert len(keys) == 3 * len(lora) and all(k.startswith("lora_unet_") for k in keys)
    assert not any("input_blocks" in k or "output_blocks" in k for k in keys)  # diffusers names
    expected_arch = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
    assert meta["modelspec.architecture"] == expected_arch[kind]

    out_comfy = comfy_lora_forward(comfy, tiny, path, caplog)

    unet = copy.deepcopy(tiny["twin"])
    mixin = StableDiffusionXLLoraLoaderMixin if kind == "sdxl" else StableDiffusionLoraLoaderMixin
    extra = {"unet_config": unet.config} if kind == "sdxl" else {}  # as the SDXL pipeline passes
    state_dict, alphas = mixin.lora_state_dict(path, **extra)
    mixin.load_lora_into_unet(state_dict, alphas, unet)
    out_diffusers = F.diffusers_forward(unet, kind)

    assert F.rel_err(out_comfy, out_diffusers) <= 1e-4
    assert F.rel_err(out_comfy, trained_forward(tiny)) <= 1e-5  # the file is the trained LoRA
    assert F.rel_err(out_comfy, tiny["base"]) > 1e-2  # and it changes the output


def tiny_pipeline(kind: str, unet):
    """A diffusers pipeline around ``unet`` with tiny random text encoders and VAE (the tokenizer
    files ship with ComfyUI)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from conftest import comfyui_path
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(comfyui_path(), "comfy", "sd1_tokenizer"))
    te_config = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=77, projection_dim=32)
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4)
    if kind == "sd15":
        return StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**te_config)), tokenizer=tokenizer,
            unet=unet, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**te_config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**te_config)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1))


def test_diffusers_folder_loads_with_pipeline_load_lora_weights(tiny, comfy, tmp_path, caplog):
    kind, lora = tiny["kind"], tiny["lora"]
    kohya = lora_file.save_kohya(str(tmp_path / "k.safetensors"), lora, tiny["name_map"], dtype=torch.float32)
    folder = lora_diffusers.save_diffusers_folder(str(tmp_path / "diffusers"), lora, tiny["name_map"],
                                                  metadata={"draft_method": "draft_k"})
    assert os.listdir(folder) == [lora_diffusers.DIFFUSERS_WEIGHT_NAME]
    pipe = tiny_pipeline(kind, copy.deepcopy(tiny["twin"]))
    pipe.load_lora_weights(folder)
    out_folder = F.diffusers_forward(pipe.unet, kind)
    out_comfy = comfy_lora_forward(comfy, tiny, kohya, caplog)
    assert F.rel_err(out_folder, out_comfy) <= 1e-4
    assert F.rel_err(out_folder, tiny["base"]) > 1e-2
    # Read back (alpha is folded into lora_B there): the same deltas, alpha = rank.
    shapes = {n: d.weight_shape for n, d in lora.items()}
    back = lora_file.load_kohya(os.path.join(folder, lora_diffusers.DIFFUSERS_WEIGHT_NAME),
                                tiny["name_map"], shapes)
    for name, d in lora.items():
        assert back[name].alpha == back[name].rank
        torch.testing.assert_close(back[name].delta(), d.delta(), rtol=1e-6, atol=1e-7)


def test_kohya_files_with_ldm_names_2d_conv_factors_and_no_alpha_load(tiny, comfy, tmp_path, caplog):
    """Another trainer's file: SGM/ldm names (kohya's SDXL style), conv factors flattened 2-D
    (ComfyUI's style), no alpha: it loads for resume, and ComfyUI applies it identically."""
    lora, name_map = tiny["lora"], tiny["name_map"]
    sd = {}
    for name, d in lora.items():
        key = lora_naming.kohya_name(name)  # lora_unet_input_blocks_...
        sd[f"{key}.lora_down.weight"] = d.down.detach() * (d.scale ** 0.5)
        sd[f"{key}.lora_up.weight"] = d.up.detach() * (d.scale ** 0.5)  # alpha = rank: scale 1
    from safetensors.torch import save_file
    path = str(tmp_path / "other.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    shapes = {n: d.weight_shape for n, d in lora.items()}
    back = lora_file.load_kohya(path, name_map, shapes)
    assert back.names() == lora.names()  # the model's order
    for name, d in lora.items():
        assert back[name].alpha == d.rank
        torch.testing.assert_close(back[name].delta(), d.delta(), rtol=1e-5, atol=1e-7)
    out = comfy_lora_forward(comfy, tiny, path, caplog)
    assert F.rel_err(out, trained_forward(tiny)) <= 1e-5


# -- names of the full layouts ----------------------------------------------------------------------
def full_layout(comfy, config: dict):
    """(diffusers UNet, ComfyUI UNetModel, unet_config) on the meta device: no weights."""
    from diffusers import UNet2DConditionModel
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet_config = comfy.model_detection.unet_config_from_diffusers_unet(unet.state_dict())
    ldm = UNetModel(**unet_config, device=torch.device("meta"), operations=comfy.ops.disable_weight_init)
    return unet, ldm, unet_config


def meta_lora(ldm, names) -> "LoRASet":
    from training.lora import LoRADelta, LoRASet
    modules = dict(ldm.named_modules())
    lora = LoRASet()
    for n in names:
        lora.add(n, LoRADelta(modules[n].weight.shape, rank=1, alpha=1.0))
    return lora


@pytest.mark.parametrize("layout,count", [("sd15", 192), ("sdxl", 722)])
def test_full_layout_export_is_exactly_kohyas_default_modules(comfy, lora_keys, layout, count, tmp_path):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    unet, ldm, unet_config = full_layout(comfy, SD15_DIFFUSERS if layout == "sd15" else SDXL_DIFFUSERS)
    # kohya's rule applied to diffusers' own module names (independent of our mapping) ...
    expected = {lora_naming.kohya_name(n) for n in F.kohya_targets(unet, Transformer2DModel)}
    # ... and to ComfyUI's ldm modules, exported through the mapping.
    lora = meta_lora(ldm, F.ldm_kohya_targets(ldm))
    path = lora_file.save_kohya(str(tmp_path / "full.safetensors"), lora,
                                lora_keys.ldm_to_diffusers_module_names(unet_config),
                                base_model=lora_metadata.base_model_version_from_config(unet_config))
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    stems = {k.partition(".")[0] for k in keys}
    assert len(expected) == count and stems == expected
    assert sorted({k.partition(".")[2] for k in keys}) == ["alpha", "lora_down.weight", "lora_up.weight"]
    assert meta["ss_base_model_version"] == ("sd_v1" if layout == "sd15" else "sdxl_base_v1-0")
    if layout == "sd15":  # SD1.5's proj_in/proj_out are 1x1 convs: stored 4-D
        with safe_open(path, "pt") as f:
            down = f.get_slice("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
            up = f.get_slice("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight")
            assert down.get_shape() == [1, 320, 1, 1] and up.get_shape() == [320, 1, 1, 1]


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_a1111_rule_resolves_every_key_to_the_trained_compvis_module(comfy, lora_keys, layout, tmp_path):
    _, ldm, unet_config = full_layout(comfy, SD15_DIFFUSERS if layout == "sd15" else SDXL_DIFFUSERS)
    names = F.ldm_kohya_targets(ldm)
    path = lora_file.save_kohya(str(tmp_path / "a1111.safetensors"), meta_lora(ldm, names),
                                lora_keys.ldm_to_diffusers_module_names(unet_config))
    # A1111 maps compvis module names (sd_model.model.named_modules(), '.' -> '_') to layers.
    compvis_modules = {"diffusion_model_" + n.replace(".", "_") for n, _ in ldm.named_modules() if n}
    resolved = {}
    with safe_open(path, "pt") as f:
        for key in f.keys():
            network = F.a1111_network_name(key)
            compvis = F.a1111_convert_diffusers_name_to_compvis(network, is_sd2=False)
            assert compvis in compvis_modules, f"A1111 cannot resolve {key!r} (-> {compvis!r})"
            resolved.setdefault(network, set()).add(compvis)
    assert all(len(v) == 1 for v in resolved.values())
    assert {v.pop() for v in resolved.values()} == {"diffusion_model_" + n.replace(".", "_") for n in names}


# -- lora_keys ----------------------------------------------------------------------------------------
def test_name_map_inverts_comfy_map(comfy, lora_keys):
    for kind in ("sd15", "sdxl"):
        config_class, ldm_config, diffusers_config = F.TINY[kind]
        model = getattr(comfy.supported_models, config_class)(dict(ldm_config)).get_model({}, device="meta")
        name_map = lora_keys.ldm_to_diffusers_module_names(model.model_config.unet_config)
        weighted = {n for n, m in model.diffusion_model.named_modules()
                    if getattr(m, "weight", None) is not None}
        assert weighted <= set(name_map)  # every layer with a weight has a diffusers name
        from diffusers import UNet2DConditionModel
        with torch.device("meta"):
            unet = UNet2DConditionModel(**diffusers_config)
        diffusers_modules = {n for n, _ in unet.named_modules()}
        assert {name_map[n] for n in weighted} <= diffusers_modules
        assert len(set(name_map.values())) == len(name_map)
        inverse = lora_keys.diffusers_to_ldm_module_names(model.model_config.unet_config)
        assert all(inverse[d] == n for n, d in name_map.items())
    sd15 = lora_keys.ldm_to_diffusers_module_names(F.SD15_TINY_LDM)
    assert sd15["input_blocks.1.1.transformer_blocks.0.attn1.to_q"] == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert sd15["middle_block.1.proj_in"] == "mid_block.attentions.0.proj_in"
    assert sd15["output_blocks.5.1.transformer_blocks.0.ff.net.2"] == \
        "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2"
    sdxl = lora_keys.ldm_to_diffusers_module_names(F.SDXL_TINY_LDM)
    assert sdxl["label_emb.0.0"] == "add_embedding.linear_1"  # not class_embedding


def test_base_model_version_and_v_prediction(comfy, lora_keys):
    sm = comfy.supported_models
    sd2 = dict(F.SD15_TINY_LDM, use_linear_in_transformer=True, model_channels=64)  # 64-ch heads
    cases = [(sm.SD15, F.SD15_TINY_LDM, "sd_v1"), (sm.SD20, sd2, "sd_v2"),
             (sm.SDXL, F.SDXL_TINY_LDM, "sdxl_base_v1-0"), (sm.SSD1B, F.SDXL_TINY_LDM, None)]
    for config_class, unet_config, expected in cases:
        model = config_class(dict(unet_config)).get_model({}, device="meta")
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                   offload_device=torch.device("cpu"))
        assert lora_keys.base_model_version(patcher) == expected, config_class.__name__
        assert lora_keys.base_model_version(model) == expected
        assert lora_keys.is_v_prediction(patcher) is False
    v_model = sm.SD20(dict(sd2)).get_model({}, device="meta")
    v_model.model_type = comfy.model_base.ModelType.V_PREDICTION
    facts = lora_keys.lora_file_facts(v_model)
    assert facts["base_model"] == "sd_v2" and facts["v_prediction"] is True
    assert lora_metadata.base_model_entry(facts["base_model"], facts["v_prediction"])[1] == \
        "stable-diffusion-v2-768-v/lora"
    with pytest.raises(TypeError):
        lora_keys.base_model_version(object())


def test_comfyui_lists_the_lora_but_not_the_side_file_or_temp_files(comfy):
    import folder_paths
    names = ["run.safetensors", lora_resume.state_path_for("run.safetensors"),
             ".run.safetensors.k2j4h5.tmp"]
    listed = folder_paths.filter_files_extensions(names, folder_paths.folder_names_and_paths["loras"][1])
    assert listed == ["run.safetensors"]
