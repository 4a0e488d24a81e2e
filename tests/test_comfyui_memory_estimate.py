"""DRaFT Trainer's memory estimate against what ``make vram`` measured (marker ``comfyui``).

The trainer chooses the fast or the lean way, or refuses, from ComfyUI's own per-model figures
(``nodes.comfy_glue.update_memory_inputs``: ``memory_required`` of one denoiser row and
``memory_used_decode`` of one latent) scaled by ``training.memory_plan``'s factors. Here those
ComfyUI figures come from ComfyUI's own model and VAE classes of each family (the figures depend on
the family's class, the latent shape and the dtype, not on the width, so tiny models give the
full-size figures), as ComfyUI reports them on a CUDA device with PyTorch attention, in the dtypes
ComfyUI loads there. The estimate must cover the peak ``make vram`` traced on the full-size
architectures (``docs/vram_figures.json``) and not exceed it by more than 40 %: an estimate below
the truth runs out of memory mid-update; one far above it picks the slow lean way, or refuses, on
a card where the fast way fits.
"""
import json
import logging
import os

import pytest
import torch

import dit_fixtures
import lora_fixtures as F

pytestmark = pytest.mark.comfyui

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = os.path.join(REPO, "docs", "vram_figures.json")
HEADROOM = 1.4

SD21_TINY_LDM = dict(F.SD15_TINY_LDM, use_linear_in_transformer=True, context_dim=1024,
                     num_head_channels=64)
# make vram row -> (ComfyUI config class, unet_config, weight dtype, compute dtype, latent shape,
# VAE latent channels, CFG branches under gradient)
ROWS = {
    "sd15_512": ("SD15", F.SD15_TINY_LDM, torch.float16, None, (4, 64, 64), 4, 2),
    "sd21v_768": ("SD20", SD21_TINY_LDM, torch.float16, None, (4, 96, 96), 4, 2),
    "sdxl_1024": ("SDXL", F.SDXL_TINY_LDM, torch.float16, None, (4, 128, 128), 4, 2),
    # FLUX.1-dev with fp8 e4m3 weights (ComfyUI computes in bf16); guidance-distilled: one branch
    "flux_dev_1024": ("Flux", dit_fixtures.FAMILIES["flux_dev"][1], torch.float8_e4m3fn,
                      torch.bfloat16, (16, 128, 128), 16, 1),
    "sd35m_1024": ("SD3", dit_fixtures.FAMILIES["sd3_5_medium"][1], torch.bfloat16, None,
                   (16, 128, 128), 16, 2),
    # Wan 2.1 T2V 1.3B (ComfyUI's memory figure reads the width: dim 1536) at 480x832, 33 frames
    "wan21_1_3b_480p": ("WAN21_T2V", dict(dit_fixtures.FAMILIES["wan21_t2v"][1], dim=1536),
                        torch.bfloat16, None, (16, 9, 60, 104), 16, 2),
    # Wan 2.2 TI2V-5B (dim 3072) at 704x1280, 33 frames: 48-channel latents of its 16x VAE
    "wan22_5b_720p": ("WAN22_T2V", dict(dit_fixtures.FAMILIES["wan22_ti2v_5b"][1], dim=3072),
                      torch.bfloat16, None, (48, 9, 44, 80), 48, 2),
    # Wan 2.2 A14B's low-noise expert (a Wan 2.1 14B to ComfyUI: dim 5120), fp8 weights, 480x832
    "wan22_14b_480p": ("WAN21_T2V", dict(dit_fixtures.FAMILIES["wan21_t2v"][1], dim=5120),
                       torch.float8_e4m3fn, torch.bfloat16, (16, 9, 60, 104), 16, 2),
    "lumina2_1024": ("Lumina2", dit_fixtures.FAMILIES["lumina2"][1], torch.bfloat16, None,
                     (16, 128, 128), 16, 2),
    # HunyuanImage 2.1 at 2048 px: 64-channel latents of its 32x VAE, fp8 weights, cfg 3.5
    "hunyuanimage21_2048": ("HunyuanImage21", dit_fixtures.FAMILIES["hunyuan_image_2_1"][1],
                            torch.float8_e4m3fn, torch.bfloat16, (64, 64, 64), 64, 2),
}
# video rows: latent frames the reward sees, and the fixture whose VAE class decodes them
DECODED_LATENT_FRAMES = {"wan21_1_3b_480p": 3, "wan22_5b_720p": 3, "wan22_14b_480p": 3}
VIDEO_VAE = {"wan21_1_3b_480p": "wan21_t2v", "wan22_5b_720p": "wan22_ti2v_5b",
             "wan22_14b_480p": "wan21_t2v"}
METHOD_ROWS = {"k1": 1, "lv2": 2, "full": 1}  # differentiated rows per batch row
# make vram's modes that are ways of the trainer -> (blocks, rows one at a time); ``before`` (the
# fast way with the whole decode checkpointed, as it was) is not one any more
WAY_OF_MODE = {"fast": ("off", False), "lean_decoder": ("decoder and reward", True),
               "lean": ("on", True)}


def _measured():
    if not os.path.exists(FIGURES):
        pytest.fail(f"{FIGURES} is missing: run `make vram` (python -m tools.measure.memory.vram --json-out {FIGURES})")
    with open(FIGURES) as f:
        return json.load(f)["rows"]


@pytest.fixture(scope="module")
def comfy_figures():
    """ComfyUI's inference figures per make-vram model, as a CUDA device reports them."""
    comfy = F.import_comfy()
    import comfy.model_management as mm
    glue = F.import_pack_module("nodes.comfy_glue")
    architectures = F.import_pack_module("nodes.architectures")
    out = {}
    flash = mm.pytorch_attention_flash_attention
    mm.pytorch_attention_flash_attention = lambda: True  # the CUDA branch of memory_required
    try:
        for name, (cls, unet_config, dtype, manual_cast, latent, vae_channels, _) in ROWS.items():
            config = getattr(comfy.supported_models, cls)(dict(unet_config))
            config.set_inference_dtype(dtype, manual_cast)
            video = name in DECODED_LATENT_FRAMES
            model = config.get_model({}, device="meta" if video else None)
            patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                       offload_device=torch.device("cpu"))
            # ComfyUI's own detection builds the family's KL VAE (ch 128) from its decoder's
            # input conv; the missing weights only leave it uninitialised (ComfyUI's warning that
            # lists every one of them is muted).
            logging.disable(logging.WARNING)
            try:
                width = 1024 if vae_channels == 64 else 512  # HunyuanImage 2.1's 32x decoder: 1024
                vae = (dit_fixtures.tiny_vae(VIDEO_VAE[name]) if video else  # Wan 2.1 / 2.2 VAE
                       comfy.sd.VAE(sd={"decoder.conv_in.weight": torch.zeros(width, vae_channels, 3, 3)}))
            finally:
                logging.disable(logging.NOTSET)
            vae.vae_dtype = torch.bfloat16  # what ComfyUI picks for the VAE on a bf16 GPU
            out[name] = glue.update_memory_inputs(
                patcher, vae, latent, DECODED_LATENT_FRAMES.get(name)) + (
                architectures.memory_factors(patcher), architectures.decode_factors(patcher))
    finally:
        mm.pytorch_attention_flash_attention = flash
    return out


def _cases():
    """Every traced row of a family above (lowvram rows aside: the trainer streams weights only in
    the leanest way, whose peak they equal)."""
    if not os.path.exists(FIGURES):
        return [("missing", "k1", 1, "lean")]
    with open(FIGURES) as f:
        rows = json.load(f)["rows"]
    return [(r["model"], r["method"], r["batch"], r["mode"]) for r in rows
            if r["model"] in ROWS and r["method"] in METHOD_ROWS and not r["lowvram"]
            and r["mode"] in WAY_OF_MODE]


@pytest.mark.parametrize("name,method,batch,mode", _cases())
def test_trainer_estimate_covers_the_traced_peak_without_overstating_it(comfy_figures, name, method,
                                                                         batch, mode):
    from training.memory_plan import estimate_update_bytes
    rows = [r for r in _measured() if r["model"] == name and r["method"] == method
            and r["batch"] == batch and r["mode"] == mode and not r["lowvram"]]
    measured = rows[0]["peak_update_gib"] * 1024 ** 3
    decode, denoiser_row, factors, decode_factors = comfy_figures[name]
    estimate = estimate_update_bytes(
        rows=batch * METHOD_ROWS[method], cfg_branches=ROWS[name][6], decode_bytes=decode,
        denoiser_row_bytes=denoiser_row, denoiser_factors=factors, decode_factors=decode_factors,
        blocks=WAY_OF_MODE[mode][0], one_row=WAY_OF_MODE[mode][1])
    assert measured <= estimate <= HEADROOM * measured, (
        f"{name} {method} b{batch} {mode}: estimate {estimate / 2**30:.2f} GiB, traced "
        f"{measured / 2**30:.2f} GiB (decode {decode / 2**30:.2f}, denoiser row "
        f"{denoiser_row / 2**30:.3f} GiB)")
