"""DRaFT on the DiT and flow families (SD3/SD3.5, FLUX.1 dev/schnell, Chroma, Qwen-Image, Lumina 2,
HunyuanImage 2.1) and the
architecture table, with tiny models built through ComfyUI's own classes (marker ``comfyui``).

* The table (``nodes/architectures.py``) selects, per family, exactly the listed layers (never a
  top-level layer), and refuses an unsupported family naming the supported ones.
* The engine's sampler on ComfyUI's flow ``model_sampling`` (shifted schedules) equals an Euler flow
  sampler written here from the definition ``x_t = (1 - t) x0 + t eps``, ``dx/dt = v``.
* Per family: DRaFT-LV training through ``TrainingRun`` raises a reward on held-out seeds (sampled
  with ComfyUI's stock KSampler); the LoRA saved through DRaFT Save LoRA's path loads in ComfyUI's
  stock LoraLoader / LoraLoaderModelOnly with every key applied and gives the same samples as the
  training-time LoRA; a resumed run continues the step count.

Text conditioning is fake (see tests/dit_fixtures.py): ComfyUI cannot build small T5-XXL / CLIP-G /
Qwen2.5-VL / Gemma 2 text encoders.
"""
import logging
import os

import pytest
import torch

import dit_fixtures as D
import lora_fixtures as F

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def comfy():
    return F.import_comfy()


@pytest.fixture(scope="module")
def pack(comfy):
    return {name: F.import_pack_module(f"nodes.{name}") for name in
            ("architectures", "comfy_glue", "lora_files", "lora_keys", "training_run", "reward_types")}


# -- the table ------------------------------------------------------------------------------------
def _b(i, *names):
    return [f"{i}.{n}" for n in names]


_FLUX_DOUBLE_ATTN = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj")
_FLUX_DOUBLE_MLP = ("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")
_FLUX_ATTN = sorted([f"double_blocks.{n}" for i in (0, 1) for n in _b(i, *_FLUX_DOUBLE_ATTN)]
                    + [f"single_blocks.{n}" for i in (0, 1) for n in _b(i, "linear1", "linear2")])
_FLUX_ALL = sorted(_FLUX_ATTN + [f"double_blocks.{n}" for i in (0, 1) for n in _b(i, *_FLUX_DOUBLE_MLP)])
# MMDiT: the last context block is "pre_only" (no attn.proj, no mlp).
_SD3_ATTN = sorted(["joint_blocks.0.context_block.attn.qkv", "joint_blocks.0.context_block.attn.proj",
                    "joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn.proj",
                    "joint_blocks.1.context_block.attn.qkv",
                    "joint_blocks.1.x_block.attn.qkv", "joint_blocks.1.x_block.attn.proj"])
_SD3_MLP = ["joint_blocks.0.context_block.mlp.fc1", "joint_blocks.0.context_block.mlp.fc2",
            "joint_blocks.0.x_block.mlp.fc1", "joint_blocks.0.x_block.mlp.fc2",
            "joint_blocks.1.x_block.mlp.fc1", "joint_blocks.1.x_block.mlp.fc2"]
_SD35M_ATTN2 = ["joint_blocks.0.x_block.attn2.qkv", "joint_blocks.0.x_block.attn2.proj"]
_QWEN_ATTN = sorted(f"transformer_blocks.{i}.attn.{n}" for i in (0, 1) for n in (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))
_QWEN_MLP = [f"transformer_blocks.{i}.{m}_mlp.net.{n}" for i in (0, 1) for m in ("img", "txt")
             for n in ("0.proj", "2")]
_WAN_ATTN = sorted(f"blocks.{i}.{a}.{n}" for i in (0, 1) for a in ("self_attn", "cross_attn")
                   for n in ("q", "k", "v", "o"))
_WAN_FFN = [f"blocks.{i}.ffn.{n}" for i in (0, 1) for n in (0, 2)]
_LUMINA_BLOCKS = ("context_refiner.0", "noise_refiner.0", "layers.0", "layers.1")
_LUMINA_ATTN = sorted(f"{b}.attention.{n}" for b in _LUMINA_BLOCKS for n in ("qkv", "out"))
_LUMINA_MLP = [f"{b}.feed_forward.{n}" for b in _LUMINA_BLOCKS for n in ("w1", "w2", "w3")]
EXPECTED = {  # kind -> (attention, kohya default, family name, base model)
    "sd3_medium": (_SD3_ATTN, sorted(_SD3_ATTN + _SD3_MLP), "SD3 / SD3.5", "sd3_medium"),
    "sd3_5_medium": (sorted(_SD3_ATTN + _SD35M_ATTN2), sorted(_SD3_ATTN + _SD35M_ATTN2 + _SD3_MLP),
                     "SD3 / SD3.5", "sd3_5_medium"),
    "sd3_5_large": (_SD3_ATTN, sorted(_SD3_ATTN + _SD3_MLP), "SD3 / SD3.5", "sd3_5_large"),
    "flux_dev": (_FLUX_ATTN, _FLUX_ALL, "FLUX.1 dev", "flux1_dev"),
    "flux_schnell": (_FLUX_ATTN, _FLUX_ALL, "FLUX.1 schnell", "flux1_schnell"),
    "chroma": (_FLUX_ATTN, _FLUX_ALL, "Chroma", "chroma"),
    "qwen_image": (_QWEN_ATTN, sorted(_QWEN_ATTN + _QWEN_MLP), "Qwen-Image", "qwen_image"),
    "wan21_t2v": (_WAN_ATTN, sorted(_WAN_ATTN + _WAN_FFN), "Wan 2.1 T2V", "wan21_t2v"),
    "wan22_ti2v_5b": (_WAN_ATTN, sorted(_WAN_ATTN + _WAN_FFN), "Wan 2.2 TI2V-5B", "wan22_ti2v_5b"),
    "lumina2": (_LUMINA_ATTN, sorted(_LUMINA_ATTN + _LUMINA_MLP), "Lumina 2", "lumina2"),
    # HunyuanImage 2.1: ComfyUI builds it from FLUX's double / single stream blocks
    "hunyuan_image_2_1": (_FLUX_ATTN, _FLUX_ALL, "HunyuanImage 2.1", "hunyuan_image_2_1"),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_table_selects_the_listed_layers_of_each_dit_family(kind, pack):
    glue, arch = pack["comfy_glue"], pack["architectures"]
    patcher = D.tiny_model(kind)
    attention, broad, family, base = EXPECTED[kind]
    assert sorted(glue.target_module_names(patcher, "attention")) == attention
    assert sorted(glue.target_module_names(patcher, "kohya default")) == broad
    # the bare diffusion model (its class names the family's patterns) selects the same
    assert sorted(glue.target_module_names(patcher.model.diffusion_model, "kohya default")) == broad
    assert [n for n, _ in arch.block_lists(patcher.model.diffusion_model)] == \
        list(arch.family_of(patcher).block_lists)
    assert arch.family_of(patcher).name == family
    assert pack["lora_keys"].base_model_version(patcher) == base
    assert pack["lora_keys"].lora_file_facts(patcher)["name_map"] is None  # native kohya names
    top_level = {n for n, _ in patcher.model.diffusion_model.named_children()}
    assert not any(n.split(".")[0] not in arch.family_of(patcher).block_lists for n in broad)
    assert {"proj_out", "final_layer", "head"} & top_level  # present, and not selected
    latent = patcher.model.latent_format
    # HunyuanImage 2.1's 32x VAE, Wan 2.2's 16x VAE
    assert latent.latent_channels == {"hunyuan_image_2_1": 64, "wan22_ti2v_5b": 48}.get(kind, 16)
    assert arch.family_of(patcher).latent_dimensions == latent.latent_dimensions == (
        3 if kind in ("qwen_image", *D.VIDEO) else 2)


def test_table_unet_families_and_block_lists(comfy, pack):
    arch, glue = pack["architectures"], pack["comfy_glue"]
    sm = comfy.supported_models
    sd2 = dict(F.SD15_TINY_LDM, use_linear_in_transformer=True, model_channels=64)
    for cls, cfg, family in [(sm.SD15, F.SD15_TINY_LDM, "SD1.x"), (sm.SD20, sd2, "SD2.x"),
                             (sm.SDXL, F.SDXL_TINY_LDM, "SDXL"),
                             (sm.SDXLRefiner, F.SDXL_TINY_LDM, "SDXL refiner")]:
        model = cls(dict(cfg)).get_model({}, device="meta")
        attention = glue.target_module_names(model, "attention")
        kohya = glue.target_module_names(model, "kohya default")
        assert arch.family_of(model).name == family
        assert all(n.split(".")[0] in ("input_blocks", "middle_block", "output_blocks") for n in kohya)
        assert all(".attn1." in n or ".attn2." in n for n in attention)
        # kohya's rule, applied independently: every Linear / 1x1 conv inside a SpatialTransformer
        assert sorted(kohya) == sorted(F.ldm_kohya_targets(model.diffusion_model)), family
        assert attention == [n for n in kohya if ".attn1.to_" in n or ".attn2.to_" in n]
        assert [name for name, _ in arch.block_lists(model)] == ["input_blocks", "middle_block", "output_blocks"]
    flux = D.tiny_model("flux_dev")
    assert [name for name, _ in arch.block_lists(flux)] == ["double_blocks", "single_blocks"]
    assert [name for name, _ in arch.block_lists(D.tiny_model("qwen_image"))] == ["transformer_blocks"]
    assert [name for name, _ in arch.block_lists(D.tiny_model("sd3_medium"))] == ["joint_blocks"]
    assert arch.default_cfg(flux) == 1.0 and arch.guidance_value(flux) == 3.5
    assert arch.guidance_value(D.tiny_model("flux_schnell")) is None  # no guidance input
    assert arch.family_of(D.tiny_model("qwen_image")).latent_dimensions == 3


def test_unknown_family_is_refused_listing_the_supported_ones(comfy, pack):
    model = comfy.supported_models.AuraFlow({"cond_seq_dim": 2048})
    with pytest.raises(pack["architectures"].UnsupportedModelError) as e:
        pack["comfy_glue"].target_module_names(model, "attention")
    for name in ("AuraFlow", "SD1.x", "SDXL", "SD3", "FLUX.1 dev", "Chroma", "Qwen-Image", "Wan 2.1 T2V"):
        assert name in str(e.value)
    # ComfyUI's Wan variants subclass WAN21_T2V but need other inputs (I2V, VACE, S2V)
    for variant in ("WAN21_I2V", "WAN21_Vace", "WAN22_S2V"):
        config = getattr(comfy.supported_models, variant)({"image_model": "wan2.1"})
        with pytest.raises(pack["architectures"].UnsupportedModelError, match=variant):
            pack["architectures"].family_of(config)


@pytest.mark.parametrize("kind", sorted(D.VIDEO))
def test_wan_table_row(kind, comfy, pack):
    family = pack["architectures"].family_of(D.tiny_model(kind))
    assert (family.latent_dimensions, family.video_frames, family.time_compression) == (3, 33, 4)
    assert family.default_cfg == 5.0 and not family.guidance_distilled and family.guidance is None
    assert family.block_lists == ("blocks",)
    # Wan 2.2 TI2V-5B is ComfyUI's WAN22_T2V (a WAN21_T2V subclass): its own row, not a variant


# -- flow sampling --------------------------------------------------------------------------------
def _euler_flow_reference(velocity, noise, ts):
    """Euler on dx/dt = v(x, t) from t = 1 (pure noise) to t = 0, written from the definition."""
    x = noise.clone()
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * velocity(x, t)
    return x


def _shift_linear(shift, t):  # SD3 / ModelSamplingDiscreteFlow: t' = s t / (1 + (s - 1) t)
    return shift * t / (1 + (shift - 1) * t)


def _shift_exponential(mu, t):  # FLUX / ModelSamplingFlux: t' = e^mu / (e^mu + 1/t - 1)
    with torch.no_grad():
        return torch.where(t > 0, torch.exp(torch.tensor(mu, dtype=t.dtype)) / (
            torch.exp(torch.tensor(mu, dtype=t.dtype)) + 1 / t.clamp_min(1e-12) - 1), torch.zeros_like(t))


@pytest.mark.parametrize("kind,shift_fn,shift", [
    ("sd3_medium", _shift_linear, 3.0), ("flux_schnell", _shift_linear, 1.0),
    ("flux_dev", _shift_exponential, 1.15), ("qwen_image", _shift_exponential, 1.15)])
def test_sampler_on_comfy_flow_model_sampling_equals_independent_euler(kind, shift_fn, shift, comfy):
    import comfy.samplers
    from training.sampler import DifferentiableSampler, SamplerSettings
    ms = D.tiny_model(kind).get_model_object("model_sampling")
    steps = 6
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", steps).float()
    # the shifted schedule from its definition, on a uniform grid
    ts = shift_fn(shift, torch.linspace(1, 0, steps + 1, dtype=torch.float64))
    assert torch.allclose(sigmas.double(), ts, atol=2e-3)  # ComfyUI's table is 1000 discrete steps
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g) * 0.3

    def velocity(x, t):  # some smooth field, (B, C, H, W)
        return torch.einsum("oc,bchw->bohw", w, x) * (1 + float(t)) + 0.5 * torch.tanh(x) - float(t)

    def denoise(x, sigma, index):  # the velocity model through ComfyUI's own parametrisation
        return ms.calculate_denoised(sigma, velocity(x, sigma[0]), x)

    noise = torch.randn(2, 4, 6, 6, generator=g)
    sampler = DifferentiableSampler(denoise, sigmas, SamplerSettings("draft"),
                                    renoise=lambda s, n, x0: ms.noise_scaling(s, n, x0))
    x0 = sampler.sample(noise, torch.zeros(2, dtype=torch.long))
    ref = _euler_flow_reference(velocity, noise, sigmas.tolist())
    assert torch.allclose(x0, ref, atol=1e-5)
    # DRaFT-LV's re-noising is the flow interpolation
    s = torch.full((2,), 0.25)
    assert torch.allclose(ms.noise_scaling(s, noise, x0), 0.75 * x0 + 0.25 * noise, atol=1e-6)
    assert torch.allclose(sampler.initial_latent(noise), noise)


# -- training, saving, loading --------------------------------------------------------------------
# Wan: 9 frames (3 latent frames) of which the first 2 latent frames (5 frames) are decoded
VIDEO_FRAMES, DECODED_LATENT_FRAMES = 9, 2


def _run_config(rc, kind, iterations, **kw):
    from training import SamplerSettings, TrainSettings
    from training.run_options import VideoOptions
    steps = 4 if kind in ("flux_schnell", *D.VIDEO) else 6
    if kind in D.VIDEO:
        kw.setdefault("video", VideoOptions(VIDEO_FRAMES, DECODED_LATENT_FRAMES))
    base = dict(prompts=["a cat", "a dog"], negative_prompt="", sampler=SamplerSettings("draft_lv", lv_samples=2),
                steps=steps, scheduler="simple", cfg=0.0, width=64, height=64,
                train=TrainSettings(iterations=iterations, learning_rate=3e-2, seed=0, grad_clip=0.0),
                rank=4, alpha=4.0, target_set="attention", mixed_precision="no", save_every=0,
                preview_every=0, lora_name=f"draft/{kind}")
    base.update(kw)
    return rc.RunConfig(**base)


def _held_out_reward(comfy, model, vae, encode, reward, kind, seeds, guidance, cfg, steps):
    import comfy.sample
    import node_helpers
    side = 64 // vae.spacial_compression_encode()  # 64 px: 8 x 8 latents, 2 x 2 for HunyuanImage
    time = (3,) if kind in D.VIDEO else (1,) * (model.model.latent_format.latent_dimensions - 2)
    shape = (1, model.model.latent_format.latent_channels, *time, side, side)
    scores, images = [], []
    for seed in seeds:
        cond = encode("a cat")
        if guidance is not None:
            cond = node_helpers.conditioning_set_values(cond, {"guidance": guidance})
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            latent = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", cond, encode(""),
                                         torch.zeros(shape), seed=seed, disable_pbar=True)
            image = vae.decode(latent)  # (B, [T,] H, W, 3)
        image = image.reshape(-1, *image.shape[-3:]).movedim(-1, 1)  # a video: all its frames
        images.append(image)
        scores.append(float(reward(image, ["a cat"]).mean()))
    return sum(scores) / len(scores), torch.cat(images)


@pytest.mark.parametrize("kind", list(D.FAMILIES))
def test_family_trains_saves_and_loads_in_stock_loaders(kind, comfy, pack, loras_dir, caplog):
    import comfy.lora
    import comfy.sd
    import comfy.utils
    import folder_paths
    import nodes as comfy_nodes
    from reward_models import ImageStatReward
    from safetensors import safe_open

    rc, lf, glue = pack["training_run"], pack["lora_files"], pack["comfy_glue"]
    model, vae, encode = D.tiny_model(kind), D.tiny_vae(kind), D.conditioning(kind)
    reward = pack["reward_types"].RewardHandle(ImageStatReward("brightness"), [], "brightness")
    config = _run_config(rc, kind, iterations=6)
    with torch.inference_mode(False), torch.enable_grad():
        run = rc.TrainingRun(model, vae, encode, reward, config)
        result = run.run()
    family = pack["architectures"].family_of(model)
    assert run.cfg_scale == family.default_cfg
    assert (run.guidance == 3.5) == (kind == "flux_dev")
    assert len(result.history) == 6 and all(r == r for r in result.history)
    untrained = [n for n, d in result.lora.items() if float(d.up.detach().abs().max()) == 0]
    # Qwen-Image's last block's text queries and text output feed nothing: no gradient reaches them
    dead = ["transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.to_add_out"]
    assert untrained == (dead if kind == "qwen_image" else [])
    assert len(result.lora) == len(EXPECTED[kind][0])

    # held-out seeds through ComfyUI's stock KSampler: the LoRA raises the reward
    lora_model, comfy_sd = run.model_with_lora()
    seeds = [1001, 1002, 1003]
    args = (vae, encode, reward.model, kind, seeds, run.guidance, run.cfg_scale, config.steps)
    before, _ = _held_out_reward(comfy, model, *args)
    after, trained_images = _held_out_reward(comfy, lora_model, *args)
    assert after > before + 0.005, (before, after)

    # DRaFT Save LoRA's path, then ComfyUI's stock loaders
    lora_out = lf.DraftLoRA(comfy_sd, lora_set=result.lora, facts=pack["lora_keys"].lora_file_facts(model),
                            metadata=result.metadata)
    name = lf.save_final(lora_out, f"draft/{kind}", "fp32", False, model=model)
    path = folder_paths.get_full_path("loras", name)
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    first = result.lora.names()[0]
    assert f"lora_unet_{first.replace('.', '_')}.lora_down.weight" in keys  # native kohya names
    assert len(keys) == 3 * len(result.lora)
    from training import lora_metadata
    version, architecture, _ = lora_metadata.BASE_MODELS[EXPECTED[kind][3]]
    assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == architecture
    assert meta["ss_network_module"] == lora_metadata.NETWORK_MODULES[EXPECTED[kind][3]]
    assert float(meta["draft_cfg"]) == run.cfg_scale

    sd = comfy.utils.load_torch_file(path)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
        loaded, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)
        (only_model,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)
    assert "not loaded" not in caplog.text
    assert len(patches) == len(result.lora)
    _, from_file = _held_out_reward(comfy, loaded, *args)
    _, from_model_only = _held_out_reward(comfy, only_model, *args)
    # the training-time LoRA: weight wrappers on a clone, as the trainer applies it
    wrapped = model.clone()
    glue.attach_lora(wrapped, result.lora)
    try:
        _, from_training = _held_out_reward(comfy, wrapped, *args)
    finally:
        glue.detach_lora(model.model)
    for other in (from_file, from_model_only, trained_images):
        assert torch.allclose(other, from_training, atol=2e-4), float((other - from_training).abs().max())


@pytest.mark.parametrize("kind", sorted(D.VIDEO))
def test_wan_decoder_decodes_the_first_latent_frames_and_rewards_average_per_video(kind, comfy, pack):
    """The video decoder decodes only the first k latent frames (Wan's causal VAEs, 2.1 and 2.2:
    the same frames as a decode of all of them, 1 + 4 (k - 1) of them), returns them as
    consecutive images per video; the trainer scores every frame with its video's prompt and
    averages per video; previews show the middle frame."""
    from training.trainer import DraftTrainer
    glue = pack["comfy_glue"]
    model, vae = D.tiny_model(kind), D.tiny_vae(kind)
    channels, side = model.model.latent_format.latent_channels, 4 * vae.spacial_compression_encode()
    latent = torch.randn(2, channels, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        two = glue.make_decoder(vae, model.model, 2)(latent)
        full = glue.make_decoder(vae, model.model, 3)(latent)
        # ComfyUI's own decode of all three latent frames (VAE space, as KSampler returns them):
        # (B, F, H, W, 3)
        stock = vae.decode(model.model.process_latent_out(latent.clone())).movedim(-1, 2).flatten(0, 1)
    assert two.shape == (2 * 5, 3, side, side) and full.shape == (2 * 9, 3, side, side)
    assert torch.allclose(two.view(2, 5, 3, side, side), full.view(2, 9, 3, side, side)[:, :5], atol=1e-5)
    assert torch.allclose(full, stock.float(), atol=1e-4), float((full - stock).abs().max())
    seen = []

    def reward(images, prompts):
        seen.append(list(prompts))
        return images.mean(dim=(1, 2, 3))
    trainer = DraftTrainer.__new__(DraftTrainer)  # score() and middle_frames() use only the reward
    trainer.reward = reward
    scores = trainer.score(two, ["a", "b"])
    assert seen == [["a"] * 5 + ["b"] * 5]
    assert torch.allclose(scores, two.mean(dim=(1, 2, 3)).view(2, 5).mean(1))
    assert torch.equal(DraftTrainer.middle_frames(two, 2), two[[2, 7]])
    # ComfyUI's per-frame inference estimate of a Wan decode, times the decoded latent frames
    decode, _ = glue.update_memory_inputs(model, vae, (channels, 9, 60, 104), 3)
    assert decode == 3 * vae.memory_used_decode([1, channels, 1, 60, 104], vae.vae_dtype)


@pytest.mark.parametrize("kind,keep", [("wan21_t2v", None), ("wan21_t2v", "convolutions"),
                                       ("wan22_ti2v_5b", None), ("wan22_ti2v_5b", "convolutions")])
def test_wan_decoder_blocks_checkpointed_give_the_same_gradient(comfy, pack, kind, keep):
    """Wan's decoder blocks carry the previous latent frame's cache from call to call (Wan 2.2's
    up blocks also the first-chunk flag, and "Rep" markers in the cache): checkpointed (whole, or
    selectively as the middle memory way does) they give the decode's values and gradients
    unchanged, and the cache-carrying calls leave no wrapper behind."""
    from training.checkpointing import KEEP_CONVOLUTIONS, checkpoint_blocks, is_wrapped
    glue = pack["comfy_glue"]
    model, vae = D.tiny_model(kind), D.tiny_vae(kind)
    units = glue.decoder_checkpoint_units(vae.first_stage_model)
    if kind == "wan21_t2v":
        # the decoder (once per latent frame); middle; 3 residual blocks in each of 4 levels; 3 upsamplers
        assert len(units) == 1 + 3 + 4 * 3 + 3
    else:  # the decoder; middle (residual, attention, residual); 3 residual up blocks with a
        # shortcut, each with its 3 residual blocks and resampler nested; the last up block's 3
        # residual blocks (it is no unit: no shortcut)
        up = vae.first_stage_model.decoder.upsamples
        assert units[4:] == [m for u in up[:3] for m in [u, *u.upsamples]] + list(up[3].upsamples)
        assert len(units) == 1 + 3 + 3 * (1 + 3 + 1) + 3 and up[3].avg_shortcut is None
    assert units[0] is vae.first_stage_model.decoder
    decode = glue.make_decoder(vae, model.model, 2)
    channels, side = model.model.latent_format.latent_channels, 4 * vae.spacial_compression_encode()
    latent = torch.randn(1, channels, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    weights = torch.rand(5 * 3 * side * side, generator=torch.Generator().manual_seed(2)).view(5, 3, side, side)

    plain = D.decode_value_and_grad(decode, latent, weights)
    with checkpoint_blocks(units, keep=KEEP_CONVOLUTIONS if keep else None) as wrapped:
        assert wrapped == len(units)
        checkpointed = D.decode_value_and_grad(decode, latent, weights)
    assert not any(is_wrapped(u) for u in units)
    assert torch.allclose(plain[0], checkpointed[0], atol=1e-6)
    scale = float(plain[1].abs().max())
    assert scale > 0
    # whole: the blocks given 4 frames are recomputed one frame at a time, whose float32 sums
    # round otherwise (exact in float64: the next test)
    assert torch.allclose(plain[1], checkpointed[1], atol=1e-6 * (scale if keep is None else 1),
                          rtol=1e-5)


@pytest.mark.parametrize("kind", ["wan21_t2v", "wan22_ti2v_5b"])
def test_wan_decoder_recomputed_frame_by_frame_gives_the_plain_gradient(comfy, pack, monkeypatch,
                                                                        kind):
    """ComfyUI's Wan decoder with its blocks checkpointed whole (the lean way): the blocks that
    get several frames are recomputed one frame at a time, last first, in the backward pass
    (training.checkpointing._FrameByFrame; Wan 2.2: its residual up blocks, which take the
    first-chunk flag and put "Rep" markers in the cache, split only after the first chunk); in
    float64 the decode is the plain one to the bit and the gradient the plain one to rounding
    (3 latent frames: 1 + 4 + 4 frames)."""
    glue = pack["comfy_glue"]
    vae = D.tiny_vae(kind)
    decoder = vae.first_stage_model.double()
    units = glue.decoder_checkpoint_units(decoder)
    channels, side = (16, 4) if kind == "wan21_t2v" else (48, 2)  # (8x / 16x: 32 px either way)
    latent = torch.randn(1, channels, 3, side, side, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    weights = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64)

    plain, got, frames = D.decode_frame_by_frame(decoder.decode, units, latent, weights, monkeypatch)
    assert set(frames) == {2, 4}
    assert torch.equal(plain[0], got[0])
    assert float(plain[1].abs().max()) > 0
    assert torch.allclose(plain[1], got[1], rtol=1e-10, atol=1e-12)


def test_wan_lean_way_trains_the_lora_of_the_fast_way(comfy, pack, loras_dir):
    """Every block checkpointed (the Wan blocks and the Wan VAE decoder's), rows one at a time:
    the same update as the fast way."""
    from reward_models import ImageStatReward
    from training.memory_plan import MemoryOptions
    rc = pack["training_run"]
    model, vae, encode = D.tiny_model("wan21_t2v"), D.tiny_vae("wan21_t2v"), D.conditioning("wan21_t2v")
    reward = pack["reward_types"].RewardHandle(ImageStatReward("brightness"), [], "brightness")
    loras = []
    for memory in (MemoryOptions("off", "all at once"), MemoryOptions("on", "one at a time")):
        with torch.inference_mode(False), torch.enable_grad():
            run = rc.TrainingRun(model, vae, encode, reward,
                                 _run_config(rc, "wan21_t2v", 1, memory=memory))
            loras.append(run.run().lora)
    assert run._state["plan"].denoiser_blocks and run._state["plan"].row_by_row
    for name, d in loras[0].items():
        assert float(d.up.detach().abs().max()) > 0
        # batched vs one row at a time: float32 sums in another order, through one AdamW step
        assert torch.allclose(loras[1][name].up, d.up, atol=3e-5), name


def test_wan_lean_way_runs_cfg_branches_apart_and_trains_the_lora_of_the_fast_way(
        comfy, pack, loras_dir, monkeypatch):
    """With CFG (cfg 3) the lean way with a video decoder runs each branch as a recomputed step of
    its own in the differentiated step (``comfy_glue.branches_apart_cfg``): every model call under
    gradient gets one branch, where the fast way batches both; the update's gradient and the
    trained LoRA are the fast way's (float32 sums in another order)."""
    import comfy.samplers
    from reward_models import ImageStatReward
    from training.memory_plan import MemoryOptions
    rc, glue = pack["training_run"], pack["comfy_glue"]
    model, vae, encode = D.tiny_model("wan21_t2v"), D.tiny_vae("wan21_t2v"), D.conditioning("wan21_t2v")
    reward = pack["reward_types"].RewardHandle(ImageStatReward("brightness"), [], "brightness")
    calls, made = [], []
    batch = comfy.samplers.calc_cond_batch
    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", lambda model, conds, *a: (
        calls.append((len(conds), torch.is_grad_enabled())), batch(model, conds, *a))[1])
    apart = glue.branches_apart_cfg
    monkeypatch.setattr(glue, "branches_apart_cfg", lambda lora: (made.append(lora), apart(lora))[1])
    step, grads = torch.optim.AdamW.step, []  # the update's gradient, as AdamW gets it
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (grads.append(
        [p.grad.clone() for g in self.param_groups for p in g["params"]]), step(self, *a, **k))[1])
    loras, grad_calls = [], []
    for memory in (MemoryOptions("off", "all at once"), MemoryOptions("on", "one at a time")):
        calls.clear()
        with torch.inference_mode(False), torch.enable_grad():
            run = rc.TrainingRun(model, vae, encode, reward,
                                 _run_config(rc, "wan21_t2v", 1, memory=memory, cfg=3.0))
            loras.append(run.run().lora)
        grad_calls.append([n for n, grad in calls if grad])
    assert run._state["plan"].denoiser_blocks and len(made) == 1  # only the lean run
    assert grad_calls[0] and set(grad_calls[0]) == {2}  # fast: both branches in one call
    # lean: one branch a call, each recomputed alone (DRaFT-LV, 2 copies one at a time: 2 x 2)
    assert grad_calls[1] and set(grad_calls[1]) == {1}
    assert len(grad_calls[1]) == 2 * len(grad_calls[0]) * 2
    # the gradient AdamW gets: the fast way's to float32 rounding (sums in another order)
    assert len(grads) == 2 and max(float(g.abs().max()) for g in grads[0]) > 0
    for fast, lean in zip(*grads):
        assert float((lean - fast).abs().max()) <= 1e-5 * float(fast.abs().max())
    for name, d in loras[0].items():
        assert float(d.up.detach().abs().max()) > 0
        # AdamW's first step is about lr times the gradient's sign, so an element whose gradient
        # is near zero moves by a part of lr that rounding changes (here up to 5e-5 of 3e-2)
        assert torch.allclose(loras[1][name].up, d.up, atol=1e-4), name


def _trainer_problems(model, vae, **inputs) -> str:
    """The problems DRaFT Trainer's execute reports for these inputs (before loading anything)."""
    trainer_node = F.import_pack_module("nodes.trainer_node")
    sampler_node = F.import_pack_module("nodes.sampler_node")
    sampler = sampler_node.DraftSamplerNode.PREPARE_CLASS_CLONE({}).execute(
        **{i.id: i.default for i in sampler_node.DraftSamplerNode.define_schema().inputs}).args[0]
    values = dict(prompt_set="custom", prompts="a cat", negative_prompt="", steps=4,
                  scheduler="simple", cfg=0.0, width=64, height=64, iterations=1, batch_size=1,
                  learning_rate=1e-3, seed=0, lora_name="draft/wan", resume_lora="none",
                  clip=None, reward=None, sampler=sampler)
    node = trainer_node.DraftTrainerNode.PREPARE_CLASS_CLONE({})
    with pytest.raises(ValueError) as e:
        node.execute(model=model, vae=vae, **{**values, **inputs})
    return str(e.value)


def test_wan_video_settings_and_video_rewards_are_checked_before_a_run(comfy, pack):
    """A bad length, more reward frames than are decoded, the temporal reward with one frame per
    video or on an image model: each refused at the start of execute, naming the setting; the
    held-out check is accepted on videos."""
    from training.run_options import VideoOptions
    rn = F.import_pack_module("nodes.reward_nodes")
    temporal = rn.DraftTemporalConsistencyReward.PREPARE_CLASS_CLONE({}).execute(16).args[0]
    wan, wan_vae = D.tiny_model("wan21_t2v"), D.tiny_vae("wan21_t2v")
    text = _trainer_problems(wan, wan_vae, video=VideoOptions(length=10), evaluation=object())
    assert "- length of DRaFT Video Settings: length 10 is not 4k + 1 frames" in text, text
    assert "(Wan 2.1 T2V)" in text and "evaluation" not in text, text
    # width 60 (not a multiple of 8) always stops the run before anything loads
    text = _trainer_problems(wan, wan_vae, width=60, video=VideoOptions(9, 2, reward_frames=6))
    assert ("- reward_frames of DRaFT Video Settings: reward_frames 6 is more than the 5 frames "
            "decoded from 2 latent frame(s)") in text, text
    text = _trainer_problems(wan, wan_vae, width=60, reward=temporal,
                             video=VideoOptions(9, 2, reward_frames=1))
    assert ("- reward: temporal(pixels) compares consecutive frames, but reward_frames of DRaFT "
            "Video Settings scores 1 frame per video") in text, text
    text = _trainer_problems(D.tiny_model("flux_dev"), D.tiny_vae("flux_dev"), width=60, reward=temporal)
    assert "- reward: temporal(pixels) compares the frames of videos; FLUX.1 dev is an image model" in text, text


def test_wan_trains_with_the_temporal_penalty_combined_and_the_held_out_check(comfy, pack, loras_dir,
                                                                             tmp_path, monkeypatch):
    """Brightness plus 0.5 x temporal consistency (CLIP vision embeddings of ComfyUI's own class,
    made under inference mode as ComfyUI makes them) through the real nodes, on the first 3 frames
    of each video (2 of its 3 latent frames decoded, in training and in the held-out check), with a
    held-out check judging the videos: the LoRA trains, every evaluation has its figures, the
    similarity uses the temporal reward's CLIP, the combination scores per video."""
    from reward_fixtures import tiny_clip_vision
    from reward_models import ImageStatReward
    from training.heldout import HeldoutSettings
    from training.run_options import VideoOptions
    rn = F.import_pack_module("nodes.reward_nodes")
    hc = F.import_pack_module("nodes.heldout_check_node")
    rc = pack["training_run"]

    def out(node_cls, *args, **kw):
        return node_cls.PREPARE_CLASS_CLONE({}).execute(*args, **kw).args[0]
    with torch.inference_mode():
        cv = tiny_clip_vision(tmp_path)
        bright = out(rn.DraftImageStatReward, "brightness", "maximise", 0.5)
        temporal = out(rn.DraftTemporalConsistencyReward, 16, clip_vision=cv)
        reward = out(rn.DraftCombineRewards, bright, 1.0, weight_2=0.5, reward_2=temporal)
    assert reward.patchers == [cv.patcher] and reward.model.scores_videos
    judge = pack["reward_types"].RewardHandle(ImageStatReward("saturation"), [], "saturation")
    request = hc.HeldoutRequest(HeldoutSettings(every=1, seeds=2, prompts=("a red apple",)), (judge,))
    model, vae, encode = D.tiny_model("wan21_t2v"), D.tiny_vae("wan21_t2v"), D.conditioning("wan21_t2v")
    handed, decode = [], vae.first_stage_model.decode

    def recording(z, *args, **kw):
        handed.append(z.shape[2])
        return decode(z, *args, **kw)
    monkeypatch.setattr(vae.first_stage_model, "decode", recording)
    config = _run_config(rc, "wan21_t2v", 2, heldout=request, reward_label=reward.label,
                         video=VideoOptions(9, 3, reward_frames=3, frame_pick="first"))
    with torch.inference_mode(False), torch.enable_grad():
        run = rc.TrainingRun(model, vae, encode, reward, config)
        result = run.run()
    # the fast way: ComfyUI's CLIP layers (residuals added in place) differentiated all the same
    assert not run._state["plan"].block_checkpointing
    # 2 updates + 3 evaluations (2 videos each, 2 rows at a time): always 2 of the 3 latent frames
    assert handed == [2] * 5, handed
    assert len(result.history) == 2 and all(r == r for r in result.history)
    assert all(float(d.up.detach().abs().max()) > 0 for _, d in result.lora.items())
    h = result.heldout
    assert [e["iteration"] for e in h["evaluations"]] == [0, 1, 2]
    for e in h["evaluations"]:
        assert set(e["figures"]) == {"judge1", "reward", "similarity"}
        assert all(v == v for v in e["figures"].values())
        assert -1.0 <= e["figures"]["similarity"] <= 1.0
    labels = {s["key"]: s["label"] for s in h["series"]}
    assert labels["similarity"].endswith("'s image encoder)"), labels  # the temporal reward's CLIP
    temporal_scores = reward.model.last_scores["temporal"]  # the last evaluation's 2 videos
    assert temporal_scores.shape == (2,) and float(temporal_scores.abs().max()) <= 1.0


def test_wan_evaluate_scores_each_video_of_a_decoded_batch(comfy, pack):
    """DRaFT Evaluate on the frames VAE Decode gives for 2 Wan videos: with frames_per_video, each
    video's score is the mean of an image reward over its frames, or the temporal reward over the
    video (scored a whole video at a time), shown per video; refused when the batch is not whole
    videos, or a video reward is given images."""
    from reward_models import ImageStatReward, TemporalConsistencyReward
    ev = F.import_pack_module("nodes.evaluate_node").DraftEvaluate.PREPARE_CLASS_CLONE({})
    rn = F.import_pack_module("nodes.reward_nodes")
    vae = D.tiny_vae("wan21_t2v")
    latent = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        frames = vae.decode(latent)
        images = frames.reshape(-1, *frames.shape[-3:])  # what VAE Decode outputs: 18 frames
        bright = rn.DraftImageStatReward.PREPARE_CLASS_CLONE({}).execute("brightness", "maximise", 0.5).args[0]
        temporal = rn.DraftTemporalConsistencyReward.PREPARE_CLASS_CLONE({}).execute(16).args[0]
        by_image = ev.execute(images, bright, "", 8, 0)
        by_video = ev.execute(images, bright, "a cat", 4, 9)
        steadiness = ev.execute(images, temporal, "", 4, 9)
    x = images.movedim(-1, 1).float()
    assert images.shape == (18, 32, 32, 3)
    assert by_image.ui["draft_scores"] == pytest.approx(ImageStatReward("brightness")(x).tolist(), rel=1e-5)
    per_video = ImageStatReward("brightness")(x).view(2, 9).mean(1)
    assert by_video.ui["draft_scores"] == pytest.approx(per_video.tolist(), rel=1e-5)
    assert by_video.args[0] == pytest.approx(float(per_video.mean()), rel=1e-5)
    text = by_video.ui["text"][0]
    assert "over 2 videos of 9 frames" in text and "video 1:" in text and "image" not in text, text
    expected = TemporalConsistencyReward()(x, None, frames_per_video=9)
    assert steadiness.ui["draft_scores"] == pytest.approx(expected.tolist(), rel=1e-5)
    assert 0.0 < min(steadiness.ui["draft_scores"]) and max(steadiness.ui["draft_scores"]) < 1.0
    with torch.inference_mode():
        with pytest.raises(ValueError, match="18 images are not whole videos of frames_per_video = 4"):
            ev.execute(images, bright, "", 8, 4)
        with pytest.raises(ValueError, match="scores whole videos: set frames_per_video"):
            ev.execute(images, temporal, "", 8, 0)


@pytest.mark.parametrize("kind", ["flux_dev", "qwen_image", "wan21_t2v", "wan22_ti2v_5b", "lumina2",
                                  "hunyuan_image_2_1"])
def test_family_resumes_from_a_periodic_save(kind, comfy, pack, loras_dir):
    from reward_models import ImageStatReward
    rc = pack["training_run"]
    model, vae, encode = D.tiny_model(kind), D.tiny_vae(kind), D.conditioning(kind)
    reward = pack["reward_types"].RewardHandle(ImageStatReward("brightness"), [], "brightness")
    with torch.inference_mode(False), torch.enable_grad():
        first = rc.TrainingRun(model, vae, encode, reward, _run_config(rc, kind, 2, save_every=2)).run()
        saved = os.path.relpath(first.saved[-1], str(loras_dir))
        resumed = rc.TrainingRun(model, vae, encode, reward,
                                 _run_config(rc, kind, 4, resume_lora=saved)).run()
        straight = rc.TrainingRun(model, vae, encode, reward, _run_config(rc, kind, 4)).run()
    assert resumed.iteration == 4 and len(resumed.history) == 4
    assert resumed.history[:2] == first.history
    for name, d in straight.lora.items():
        assert torch.allclose(resumed.lora[name].up, d.up, atol=1e-5)


def test_flux_guidance_reaches_the_model_and_cfg_above_1_warns(comfy, pack, loras_dir, caplog):
    from reward_models import ImageStatReward
    rc = pack["training_run"]
    model = D.tiny_model("flux_dev").clone()
    seen = []

    def record(apply_model, args):  # ComfyUI's unet wrapper hook sees the model's conds
        seen.append((tuple(args["cond_or_uncond"]), sorted(set(args["c"]["guidance"].tolist()))))
        return apply_model(args["input"], args["timestep"], **args["c"])
    model.set_model_unet_function_wrapper(record)
    reward = pack["reward_types"].RewardHandle(ImageStatReward("brightness"), [], "brightness")
    with caplog.at_level(logging.WARNING), torch.inference_mode(False), torch.enable_grad():
        run = rc.TrainingRun(model, D.tiny_vae("flux_dev"), D.conditioning("flux_dev"), reward,
                             _run_config(rc, "flux_dev", 1, guidance=2.0))
        run.run()
    assert run.guidance == 2.0 and run.cfg_scale == 1.0
    assert seen and all(g == [2.0] for _, g in seen)
    assert "guidance-distilled" not in caplog.text
    assert all(branches == (0,) for branches, _ in seen)  # cfg 1: no negative (uncond) branch
    seen.clear()
    with caplog.at_level(logging.WARNING), torch.inference_mode(False), torch.enable_grad():
        run = rc.TrainingRun(model, D.tiny_vae("flux_dev"), D.conditioning("flux_dev"), reward,
                             _run_config(rc, "flux_dev", 1, cfg=3.0))
        run.run()
    assert run.guidance == 3.5 and run.cfg_scale == 3.0  # the table's default guidance
    assert "guidance-distilled" in caplog.text
    assert all(set(branches) == {0, 1} for branches, _ in seen)  # now cond and uncond


def test_aesthetic_reward_on_a_clip_vision_input_is_differentiable(comfy, pack, tmp_path, monkeypatch):
    """DRaFT Aesthetic Reward with ComfyUI's CLIP_VISION (its layers add residuals in place, which
    plain autograd refuses to differentiate) at the CLIP_VISION's own image size: backward runs and
    the gradient reaches the images; the scores are those of the encoder without gradient."""
    import folder_paths
    from reward_fixtures import tiny_clip_vision, write_aesthetic_head
    rm = F.import_pack_module("nodes.reward_model_nodes")
    folder = tmp_path / "reward_models"
    folder.mkdir()
    write_aesthetic_head(str(folder / "sac+logos+ava1-l14-linearMSE.pth"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "reward_models",
                        ([str(folder)], folder_paths.supported_pt_extensions | {".pth"}))
    with torch.inference_mode():
        cv = tiny_clip_vision(tmp_path, projection_dim=768)
        handle = rm.DraftAestheticReward.PREPARE_CLASS_CLONE({}).execute(
            "sac+logos+ava1-l14-linearMSE.pth", "(use clip_vision input)", "ViT-L-14-quickgelu",
            "fp32", 4, clip_vision=cv).args[0]
    pack["comfy_glue"].de_inference_(handle.model)  # as the trainer does with its reward
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(False), torch.enable_grad():
        x = images.clone().requires_grad_(True)
        scores = handle.model(x, ["a", "b"])
        scores.sum().backward()
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().max()) > 0
    with torch.no_grad():
        assert torch.allclose(handle.model(images, ["a", "b"]), scores.detach(), atol=1e-5)


def test_wan_video_template_runs_on_the_tiny_wan(comfy, pack, loras_dir, tmp_path, monkeypatch):
    """example_workflows/draft_wan_video.json, its DRaFT nodes run as the file sets them (DRaFT-K on
    HPSv2.1 plus the temporal penalty on HPSv2.1's own embeddings, Combine standardised, Video
    Settings' 3 decoded latent frames, the trainer's cfg, steps and scheduler) through the nodes'
    own execute, on the tiny Wan 2.1 and its VAE in place of the loaders' files, at a tiny size.
    The text encoder is the fixtures' fake conditioning: ComfyUI builds UMT5-XXL only at full size.
    HPSv2.1 is the tiny open_clip HPS file the reward tests install, read by the real node."""
    import json

    import folder_paths
    from reward_fixtures import install_reward_files
    from workflow_api import to_api
    widgets = install_reward_files(str(tmp_path / "models"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "reward_models",
                        ([str(tmp_path / "models" / "reward_models")],
                         folder_paths.supported_pt_extensions | {".pth", ".json"}))
    modules = [F.import_pack_module(f"nodes.{m}") for m in (
        "trainer_node", "sampler_node", "video_settings_node", "save_preview_node", "save_lora_node",
        "reward_nodes", "reward_model_nodes")]
    classes = {}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, type) and hasattr(value, "define_schema") and value.__module__ == module.__name__:
                try:
                    classes[value.define_schema().node_id] = value
                except (NotImplementedError, TypeError, AttributeError):
                    pass
    with open(os.path.join(os.path.dirname(D.__file__), "..", "example_workflows", "draft_wan_video.json")) as f:
        workflow = json.load(f)
    stand_ins = {"UNETLoader": D.tiny_model("wan21_t2v"), "ModelSamplingSD3": None,
                 "VAELoader": D.tiny_vae("wan21_t2v"), "CLIPLoader": None}
    stand_ins["ModelSamplingSD3"] = stand_ins["UNETLoader"]  # the tiny model's own shift
    kept = [n for n in workflow["nodes"] if n["type"] in classes]
    assert {n["type"] for n in workflow["nodes"]} - set(classes) - {"PreviewImage"} == set(stand_ins)
    info = {t: c.GET_NODE_INFO_V1() for t, c in classes.items()}
    api = to_api(dict(workflow, nodes=kept), info)
    by_id = {n["id"]: n["type"] for n in workflow["nodes"]}
    trainer_node = modules[0]
    monkeypatch.setattr(trainer_node, "clip_encoder", lambda clip: D.conditioning("wan21_t2v"))
    outputs = {}

    def value(v):
        if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
            src = v[0]
            return stand_ins[by_id[int(src)]] if int(src) not in {n["id"] for n in kept} else outputs[src][v[1]]
        return v
    pending = dict(api)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        while pending:
            for node_id, node in list(pending.items()):
                sources = [v[0] for v in node["inputs"].values() if isinstance(v, list) and len(v) == 2]
                if any(s in pending for s in sources):
                    continue
                inputs = {k: value(v) for k, v in node["inputs"].items()}
                inputs.update(widgets.get(node["class_type"], {}))
                if node["class_type"] == "DRaFTTrainer":
                    assert (inputs["cfg"], inputs["width"], inputs["height"]) == (5.0, 832, 480)
                    inputs.update(width=64, height=64, steps=4, iterations=2, lora_name="draft/wan_template")
                if node["class_type"] == "DRaFTVideoSettings":
                    assert (inputs["length"], inputs["decoded_latent_frames"]) == (33, 3)
                    inputs["length"] = 9  # 3 latent frames, all of them decoded
                outputs[node_id] = classes[node["class_type"]].PREPARE_CLASS_CLONE({}).execute(**inputs).args
                del pending[node_id]
    trainer_id = next(k for k, v in api.items() if v["class_type"] == "DRaFTTrainer")
    model_out, lora, history = outputs[trainer_id][:3]
    assert history["iterations"] == 2 and all(r == r for r in history["reward"])
    reward_id = api[trainer_id]["inputs"]["reward"][0]
    combined = outputs[reward_id][0]
    assert combined.model.scores_videos and "temporal" in combined.label, combined.label
    save_id = next(k for k, v in api.items() if v["class_type"] == "DRaFTSaveLoRA")
    assert save_id in outputs
    assert any(f.startswith("wan21_hps") for f in os.listdir(os.path.join(loras_dir, "draft"))), \
        os.listdir(os.path.join(loras_dir, "draft"))


def test_temporal_reward_refuses_embeddings_from_a_reward_without_an_image_encoder(comfy, pack):
    rn = F.import_pack_module("nodes.reward_nodes")
    with torch.inference_mode():
        bright = rn.DraftImageStatReward.PREPARE_CLASS_CLONE({}).execute("brightness", "maximise", 0.5).args[0]
        with pytest.raises(ValueError, match="has no image encoder"):
            rn.DraftTemporalConsistencyReward.PREPARE_CLASS_CLONE({}).execute(16, embeddings_from=bright)
