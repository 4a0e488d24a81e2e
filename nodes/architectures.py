"""The model families DRaFT trains, in one table keyed by ComfyUI's model classes.

Every fact the pack needs about a family lives here and nowhere else: which layers get a LoRA
(per target set), how the LoRA file names them, the base-model metadata other tools read, the
latent layout, the default CFG, whether the model is guidance-distilled, and the names of its
top-level block lists (for block checkpointing). Other modules ask :func:`family_of` and read
the :class:`Family` fields; they never test model classes themselves.

A model's family is found from its ``model_config`` class (``comfy.supported_models``: ``SD15``,
``SD20``, ``SDXL``, ``SDXLRefiner``, ``SD3``, ``Flux``, ``FluxSchnell``, ``Chroma``,
``QwenImage``, ``Lumina2``, ``HunyuanImage21``, ...), walking the class's bases so that variants (``SSD1B`` is an ``SDXL``
subclass) train with their parent's layout; only an exact class match claims the parent's
base-model name in the file metadata (a variant's LoRA would not fit the parent in other tools).

Target patterns are regular expressions over module names under ``diffusion_model`` that start
at a top-level block list (``^input_blocks...``, ``^double_blocks...``): no top-level layer
(Qwen-Image's ``proj_out``, Flux's ``final_layer``) can be picked by accident.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

# -- target patterns ----------------------------------------------------------------------------
# UNets (SD1.x/SD2.x/SDXL): the SpatialTransformers inside the input/middle/output blocks.
_UNET_CONTAINER = r"^(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)\."
_UNET_ATTN = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
UNET_TARGETS = {
    "attention": rf"{_UNET_CONTAINER}{_UNET_ATTN}$",
    # kohya sd-scripts' default UNet targets: every Linear / 1x1 conv inside a SpatialTransformer.
    "kohya default": rf"{_UNET_CONTAINER}({_UNET_ATTN}|proj_in|proj_out|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))$",
}
# FLUX.1 / Chroma: double-stream img/txt attention, single-stream fused linear1 (qkv + MLP in)
# and linear2 (attention out + MLP out); the broader set adds the double blocks' MLPs. Modulation
# layers (FLUX's img_mod.lin, txt_mod.lin, modulation.lin) stay frozen in both sets; kohya's
# networks.lora_flux trains them too by default (every Linear in a Double/SingleStreamBlock; Chroma
# has none: its modulation comes from the distilled_guidance_layer). Checked against kohya's own
# create_network in tests/test_kohya_tools.py.
_FLUX_ATTN = r"^(double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.(linear1|linear2))$"
FLUX_TARGETS = {
    "attention": _FLUX_ATTN,
    "kohya default": r"^(double_blocks\.\d+\.((img|txt)_attn\.(qkv|proj)|(img|txt)_mlp\.(0|2))"
                     r"|single_blocks\.\d+\.(linear1|linear2))$",
}
# SD3 / SD3.5 (MMDiT): joint blocks' image (x_block) and text (context_block) attention, plus
# SD3.5 medium's second image self-attention attn2; the broader set adds the blocks' MLPs (kohya's
# networks.lora_sd3 also trains adaLN_modulation.1 by default; frozen here).
MMDIT_TARGETS = {
    "attention": r"^joint_blocks\.\d+\.(x_block|context_block)\.(attn|attn2)\.(qkv|proj)$",
    "kohya default": r"^joint_blocks\.\d+\.(x_block|context_block)\.((attn|attn2)\.(qkv|proj)|mlp\.(fc1|fc2))$",
}
# Qwen-Image: the joint attention's image (to_*) and text (add_*_proj, to_add_out) projections;
# the broader set adds the image and text MLPs (musubi-tuner's networks.lora_qwen_image also
# trains img_mod.1 / txt_mod.1 by default; frozen here).
_QWEN_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
QWEN_TARGETS = {
    "attention": rf"^transformer_blocks\.\d+\.{_QWEN_ATTN}$",
    "kohya default": rf"^transformer_blocks\.\d+\.({_QWEN_ATTN}|(img|txt)_mlp\.net\.(0\.proj|2))$",
}
# Wan 2.1 (WanModel): each WanAttentionBlock's self- and cross-attention q/k/v/o; the broader set
# adds the block's feed-forward (ffn.0, ffn.2). That is musubi-tuner's networks.lora_wan default
# exactly (every Linear in a WanAttentionBlock but norms): Wan's modulation is a bare parameter,
# not a layer, so there is nothing to leave out. Checked in tests/test_kohya_tools.py.
_WAN_ATTN = r"(self_attn|cross_attn)\.(q|k|v|o)"
WAN_TARGETS = {
    "attention": rf"^blocks\.\d+\.{_WAN_ATTN}$",
    "kohya default": rf"^blocks\.\d+\.({_WAN_ATTN}|ffn\.(0|2))$",
}
# Lumina 2 (NextDiT): every JointTransformerBlock's fused qkv and output projection, in the main
# ``layers`` and in the two refiner lists (``context_refiner``: text tokens only, ``noise_refiner``:
# image tokens only); the broader set adds the blocks' SwiGLU MLPs (w1, w2, w3). sd-scripts'
# networks.lora_lumina also trains adaLN_modulation.1 and the top-level final_layer (linear and
# its modulation) by default; frozen here.
LUMINA_TARGETS = {
    "attention": r"^(context_refiner|noise_refiner|layers)\.\d+\.attention\.(qkv|out)$",
    "kohya default": r"^(context_refiner|noise_refiner|layers)\.\d+\.(attention\.(qkv|out)"
                     r"|feed_forward\.(w1|w2|w3))$",
}
TARGET_SET_NAMES = ("attention", "kohya default")
TARGET_SETS = TARGET_SET_NAMES
TARGET_SET_HELP = ("attention: the attention projections inside the blocks; kohya default: "
                   "attention plus the blocks' MLPs (UNets: also proj_in/proj_out), what kohya "
                   "sd-scripts trains by default on UNets and Chroma (on FLUX, SD3, Qwen-Image, "
                   "Lumina 2 and HunyuanImage 2.1 kohya also trains the modulation layers, which "
                   "stay frozen here)")


@dataclass(frozen=True)
class Family:
    """What DRaFT needs to know about one model family (see the module docstring).

    Attributes:
        name: display name (``"FLUX.1 dev"``).
        config_classes: ``comfy.supported_models`` class names of the family.
        targets: ``{target set: regex over diffusion_model module names}``.
        naming: LoRA file module names: ``"diffusers"`` (kohya keys with diffusers UNet names,
            what A1111/Forge/kohya read for SD UNets) or ``"native"`` (``lora_unet_<ComfyUI/BFL/SAI
            module path, '.' -> '_'>``, what kohya sd-scripts writes for FLUX, Chroma and SD3 and
            musubi-tuner for Qwen-Image; tests/test_kohya_tools.py loads such files with their
            code).
        base_model: key of ``training.lora_metadata.BASE_MODELS`` (``ss_base_model_version``,
            ``modelspec.architecture``; ``ss_network_module`` from
            ``lora_metadata.NETWORK_MODULES``), or a function of the ``unet_config`` returning one.
        latent_dimensions: spatial(+time) dimensions of a latent: 2 ``(B,C,H,W)``; 3
            ``(B,C,T,H,W)`` with ``T = 1`` for an image (Qwen-Image).
        video_frames: a video family's usual training length in frames (the default of DRaFT
            Video Settings' ``length``); 0: an image family (one frame, ``T = 1``).
        time_compression: frames per latent frame of a video family's causal VAE: ``frames =
            1 + time_compression * (T - 1)`` (Wan 2.1: 4).
        default_cfg: classifier-free guidance scale used when the trainer's cfg is "auto".
        guidance_distilled: CFG is baked in (FLUX.1 dev/schnell): cfg 1 by default, no negative
            branch; a cfg above 1 only costs time and over-saturates.
        guidance: the embedded guidance value (FluxGuidance's) put on the conditioning when the
            model has a guidance input and the conditioning carries none; None: no such input.
        block_lists: names of the top-level ``nn.ModuleList`` attributes of ``diffusion_model``
            (or modules) holding the repeated blocks, in execution order.
        module_classes: class names of the family's ``diffusion_model`` module (ComfyUI's
            ``UNetModel``, ``OpenAISignatureMMDITWrapper``, ``Flux``, ...), for callers that hold
            only the diffusion model (the first family listed for a class wins; families sharing
            a class share its patterns).
        diffusers_layout: the ComfyUI map from diffusers names for the optional diffusers/PEFT
            folder: ``"unet"`` (``comfy.utils.unet_to_diffusers``), ``"flux"``
            (``flux_to_diffusers``), ``"mmdit"`` (``mmdit_to_diffusers``), or None (no folder).
        memory_factors: ``(fast, lean)``: the peak of one denoiser row under gradient (the whole
            step; blocks checkpointed) over ComfyUI's inference estimate of that row
            (``memory_required``), for ``training.memory_plan``'s estimate; traced by ``make vram``
            on the full-size architecture (tests/test_comfyui_memory_estimate.py checks them).
        decode_factors: ``(whole, selective, blocks)``: the peak of one decode under gradient over
            ComfyUI's decode estimate, per way of checkpointing the decoder, for a family whose
            VAE is not the SD/FLUX KL VAE (``training.memory_plan.KL_DECODE_FACTORS``, None);
            video: over ComfyUI's estimate of one latent frame times the decoded latent frames.
        variants: whether subclasses of ``config_classes`` train as this family. False for Wan
            2.1 T2V: ComfyUI's Wan variants (I2V, VACE, Camera, HuMo, S2V, Animate ...) subclass
            ``WAN21_T2V`` but need other inputs or another VAE, so they are refused until a row of
            their own exists (Wan 2.2 TI2V-5B's ``WAN22_T2V`` has one).
        expert_pairs: whether a model of this family can be one of two experts that share a
            schedule (DRaFT Wan 2.2 Experts): Wan 2.2 A14B's high- and low-noise experts, each
            loaded by ComfyUI as a Wan 2.1 T2V 14B.
    """

    name: str
    config_classes: tuple
    targets: dict
    naming: str
    base_model: object
    latent_dimensions: int = 2
    video_frames: int = 0
    time_compression: int = 1
    default_cfg: float = 7.5
    guidance_distilled: bool = False
    guidance: Optional[float] = None
    block_lists: tuple = ()
    diffusers_layout: Optional[str] = None
    module_classes: tuple = ()
    memory_factors: tuple = (11.5, 1.0)  # SD1.x / SD2.x, traced (see _SDXL_MEMORY below)
    variants: bool = True
    decode_factors: Optional[tuple] = None
    expert_pairs: bool = False
    patterns: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "patterns", {k: re.compile(v) for k, v in self.targets.items()})

    def base_model_for(self, unet_config: dict | None) -> Optional[str]:
        if callable(self.base_model):
            return self.base_model(dict(unet_config or {}))
        return self.base_model


def _sd3_base_model(unet_config: dict) -> str:
    """SD3 medium (no q/k norm), SD3.5 medium (x_block attn2 layers) or SD3.5 large."""
    if unet_config.get("x_block_self_attn_layers"):
        return "sd3_5_medium"
    if unet_config.get("qk_norm") is not None:
        return "sd3_5_large"
    return "sd3_medium"


_UNET_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
# Denoiser memory factors traced by make vram (see Family.memory_factors): under gradient, one row
# of SD1.5's / SD2.1's UNet step holds about 10 x ComfyUI's inference estimate, SDXL's 23 x,
# SD3.5-medium's 20 x and FLUX.1-dev's 43 x (43 GiB at 1024 px); blocks checkpointed, 6 x for the
# DiTs (the UNets' peak is then the decoder's). The SDXL refiner, Chroma (FLUX's blocks) and
# Qwen-Image (60 blocks of FLUX's width) are not traced: they take SDXL's and FLUX's factors.
_SDXL_MEMORY = (25.0, 1.0)
_MMDIT_MEMORY = (22.0, 6.9)
_FLUX_MEMORY = (47.0, 6.4)
_FLUX_BLOCKS = ("double_blocks", "single_blocks")
# Wan 2.1 (make vram, 1.3B at 480x832, 33 frames, lean; ComfyUI's estimates: 0.76 GiB for one
# denoiser row, 5.21 GiB for one latent frame's decode). In the lean way the decoder is checkpointed
# once per latent frame with its blocks nested, those given 4 frames recomputed one frame at a time,
# and the single differentiated step whole on top of its blocks, CFG's two branches recomputed one
# at a time inside it, so the decoder's backward and the step's come one after the other and the
# step's holds one branch's saved block inputs. Traced decoder alone with 1 / 2 / 3 decoded latent
# frames: 1.82 / 6.27 / 8.12 GiB, and the update 5.58 / 6.28 / 8.14 GiB (DRaFT-LV n = 2 at 3: 8.20),
# before the branches were apart, with diffusers' decoder (float32 norms and upsampling). Traced
# with ComfyUI's own Wan VAE (comfy.ldm.wan.vae, bf16, the node's units and decode) the update is
# 5.90 / 7.75 GiB at 2 / 3 frames (DRaFT-LV n = 2 at 3: 7.81); blocks: 0.57 x ComfyUI's per-frame
# decode estimate times the frames at 2, 0.50 at 3 (0.58, so that 2 frames are covered too: the
# estimate is 1.02 x the 2-frame trace, 1.17 / 1.16 x the 3-frame rows; it was 0.62 for diffusers'
# decoder); whole: the decoder alone, unchecked, 2.5 x (KL's 2.9
# kept); selective: not traced (KL's 1.7 kept). Lean denoiser: the 14B (one Wan 2.2 A14B expert,
# wan22_14b_480p, fp8, ComfyUI's estimate 2.53 GiB a row), whose step sets its peak: 10.49 GiB with
# the branches apart, 2.08 x the estimate for both branches, so 2.4 (1.16 x that row; it was 3.9
# from the 1.3B's step with one latent frame decoded, 3.7 x with both branches' inputs saved;
# re-traced with the branches apart: 2.85 GiB, 1.87 x, covered at 1.28 x; the 1.3B rows with 3
# frames re-traced unchanged, 8.14 / 8.20 GiB, the decoder's backward their peak). Fast: make vram traced the 14B (fast way) at 53 x ComfyUI's estimate of a row
# (FLUX's 47 fell short), so 56.
_WAN_MEMORY = (56.0, 2.4)
_WAN_DECODE = (2.9, 1.7, 0.58)
# Wan 2.2 TI2V-5B: the Wan 2.1 blocks (3072 wide) and its own 16x VAE (48 channels, decoder width
# 256, residual up blocks), traced by make vram at 704x1280 (wan22_5b_720p, 3 latent frames
# decoded) with ComfyUI's own Wan 2.2 VAE (comfy.ldm.wan.vae2_2, bf16, the node's units and
# decode): lean, 12.87 GiB, 0.32 x ComfyUI's decode estimate (8000 bytes per latent pixel x 256
# per frame: 40.3 GiB for 3 frames; 9.28 GiB with 2 frames decoded, 0.35 x), the decoder's
# backward dominating (its residual up blocks recomputed frame by frame after the first latent
# frame, as Wan 2.1's blocks, their residual blocks nested units; the last up block's residual
# blocks units alone); fast, 71.9 GiB (1.8 x). Blocks: 0.36 (1.13 x the lean row, 1.04 x the
# 2-frame trace; it was 0.39 for diffusers' decoder, 13.83 GiB); whole: 2.0; selective: not
# traced (between).
_WAN22_MEMORY = _WAN_MEMORY
_WAN22_DECODE = (2.0, 1.5, 0.36)
# Lumina 2 and HunyuanImage 2.1, traced by make vram (lumina2_1024_lv2, hunyuanimage21_2048_k1):
# one Lumina 2 row under gradient holds 51 x ComfyUI's estimate of its forward (39.4 GiB at
# 1024 px), 7 x with its blocks checkpointed; HunyuanImage 2.1's 78 x (48 GiB a row at 2048 px).
# HunyuanImage's 32x VAE decoder at 2048 px holds far more under gradient than ComfyUI's decode
# estimate says (700 bytes a pixel in bf16: 5.5 GiB): traced alone with the reward, 38.4 GiB not
# checkpointed (7.0 x), 13.5 GiB with
# its blocks checkpointed (2.5 x), 25.5 GiB selectively (4.7 x); in the lean way the
# differentiated step's saved block inputs (3.5 GiB at 2048 px, both CFG branches) sit beside the
# decoder's backward: 17.0 GiB in all (3.1 x).
_LUMINA_MEMORY = (55.0, 7.5)
_HUNYUAN_IMAGE_MEMORY = (82.0, 6.4)
_HUNYUAN_IMAGE_DECODE = (7.5, 5.0, 3.2)
FAMILIES = (
    Family("SD1.x", ("SD15", "SD15_instructpix2pix"), UNET_TARGETS, "diffusers", "sd_v1",
           block_lists=_UNET_BLOCKS, diffusers_layout="unet", module_classes=("UNetModel",)),
    Family("SD2.x", ("SD20", "SD21UnclipL", "SD21UnclipH"), UNET_TARGETS, "diffusers", "sd_v2",
           block_lists=_UNET_BLOCKS, diffusers_layout="unet", module_classes=("UNetModel",)),
    Family("SDXL", ("SDXL", "SDXL_instructpix2pix"), UNET_TARGETS, "diffusers", "sdxl_base_v1-0",
           block_lists=_UNET_BLOCKS, diffusers_layout="unet", module_classes=("UNetModel",),
           memory_factors=_SDXL_MEMORY),
    Family("SDXL refiner", ("SDXLRefiner",), UNET_TARGETS, "diffusers", "sdxl_refiner_v1-0",
           block_lists=_UNET_BLOCKS, diffusers_layout="unet", module_classes=("UNetModel",),
           memory_factors=_SDXL_MEMORY),
    Family("SD3 / SD3.5", ("SD3",), MMDIT_TARGETS, "native", _sd3_base_model, default_cfg=4.5,
           block_lists=("joint_blocks",), diffusers_layout="mmdit", memory_factors=_MMDIT_MEMORY,
           module_classes=("OpenAISignatureMMDITWrapper", "MMDiT")),
    Family("FLUX.1 dev", ("Flux",), FLUX_TARGETS, "native", "flux1_dev", default_cfg=1.0,
           guidance_distilled=True, guidance=3.5, block_lists=_FLUX_BLOCKS, diffusers_layout="flux",
           module_classes=("Flux",), memory_factors=_FLUX_MEMORY),
    Family("FLUX.1 schnell", ("FluxSchnell",), FLUX_TARGETS, "native", "flux1_schnell",
           default_cfg=1.0, guidance_distilled=True, block_lists=_FLUX_BLOCKS, diffusers_layout="flux",
           memory_factors=_FLUX_MEMORY),
    Family("Chroma", ("Chroma",), FLUX_TARGETS, "native", "chroma", default_cfg=4.0,
           block_lists=_FLUX_BLOCKS, module_classes=("Chroma",), memory_factors=_FLUX_MEMORY),
    Family("Qwen-Image", ("QwenImage",), QWEN_TARGETS, "native", "qwen_image",
           latent_dimensions=3, default_cfg=2.5, block_lists=("transformer_blocks",),
           module_classes=("QwenImageTransformer2DModel",), memory_factors=_FLUX_MEMORY),
    # Wan 2.1 T2V (1.3B, 14B): cfg 5, Wan's own sample_guide_scale for both sizes (its configs
    # wan_t2v_1_3B.py / wan_t2v_14B.py; ComfyUI's example workflow uses 6); 33 frames = 9 latent
    # frames, the length make vram measures for 1.3B at 480p (Wan generates 81 by default)
    Family("Wan 2.1 T2V", ("WAN21_T2V",), WAN_TARGETS, "native", "wan21_t2v", latent_dimensions=3,
           video_frames=33, time_compression=4, default_cfg=5.0, block_lists=("blocks",),
           module_classes=("WanModel",), memory_factors=_WAN_MEMORY, variants=False,
           decode_factors=_WAN_DECODE, expert_pairs=True),
    # Wan 2.2 TI2V-5B (WAN22_T2V: 48-channel latents of the Wan 2.2 VAE, 16x spatial, 4x time):
    # cfg 5 (Wan 2.2's ti2v_5B sample_guide_scale); 33 frames = 9 latent frames, the length make
    # vram measures at 704x1280 (the 5B generates 121 at 24 fps). Wan 2.2 A14B's experts load as
    # WAN21_T2V (14B) and train as Wan 2.1 T2V; the other expert is wired in with DRaFT Wan 2.2
    # Experts (nodes/experts_node.py).
    Family("Wan 2.2 TI2V-5B", ("WAN22_T2V",), WAN_TARGETS, "native", "wan22_ti2v_5b",
           latent_dimensions=3, video_frames=33, time_compression=4, default_cfg=5.0,
           block_lists=("blocks",), module_classes=("WanModel",), memory_factors=_WAN22_MEMORY,
           variants=False, decode_factors=_WAN22_DECODE),
    # Lumina 2: 16-channel FLUX latents (8x VAE), CFG 4.0 (ComfyUI's Lumina 2 example workflow);
    # blocks in execution order: the text refiner, the image refiner, the main layers.
    Family("Lumina 2", ("Lumina2",), LUMINA_TARGETS, "native", "lumina2", default_cfg=4.0,
           block_lists=("context_refiner", "noise_refiner", "layers"), module_classes=("NextDiT",),
           memory_factors=_LUMINA_MEMORY),
    # HunyuanImage 2.1 (not its refiner, a separate class): ComfyUI builds it from FLUX's double /
    # single stream blocks (same module names), 64-channel latents of a 32x VAE, patch size 1, CFG
    # 3.5 (the base model's default guidance scale; the distilled checkpoint, same class, is meant
    # for cfg 1). LoRA keys: ComfyUI's names, which sd-scripts' networks.lora_hunyuan_image shares
    # for attention and linear1/linear2; its own files name the double blocks' MLPs img_mlp_fc1 /
    # _fc2 (Tencent's names), which ComfyUI 0.3.64 does not read and sd-scripts'
    # networks/convert_hunyuan_image_lora_to_comfy.py renames to these.
    Family("HunyuanImage 2.1", ("HunyuanImage21",), FLUX_TARGETS, "native", "hunyuan_image_2_1",
           default_cfg=3.5, block_lists=_FLUX_BLOCKS, module_classes=("HunyuanVideo",),
           memory_factors=_HUNYUAN_IMAGE_MEMORY, decode_factors=_HUNYUAN_IMAGE_DECODE),
)
_BY_CLASS = {c: f for f in FAMILIES for c in f.config_classes}
_BY_MODULE: dict = {}
for _family in FAMILIES:
    for _name in _family.module_classes:
        _BY_MODULE.setdefault(_name, _family)


class UnsupportedModelError(ValueError):
    """The model's family is not in :data:`FAMILIES`."""


def supported_families() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.config_classes)})" for f in FAMILIES)


def _model_config(model):
    """The ``model_config`` of a ModelPatcher, a BaseModel, or itself."""
    inner = getattr(model, "model", model)
    return getattr(inner, "model_config", None) or getattr(model, "model_config", None) or model


def family_of(model) -> Family:
    """The :class:`Family` of a ComfyUI MODEL (ModelPatcher), BaseModel or model_config (or of a
    bare ``diffusion_model`` module, by its class: patterns and block lists only; metadata and
    defaults of families sharing a module class, FLUX dev/schnell, need the model).

    Raises UnsupportedModelError naming the model's class and the supported families."""
    config = _model_config(model)
    for cls in type(config).__mro__:
        if cls.__name__ in _BY_CLASS:
            if cls is not type(config) and not _BY_CLASS[cls.__name__].variants:
                break  # a variant of a family that does not take its variants (Wan)
            return _BY_CLASS[cls.__name__]
    if config is model and type(model).__name__ in _BY_MODULE:  # a bare diffusion_model
        return _BY_MODULE[type(model).__name__]
    raise UnsupportedModelError(
        f"DRaFT does not support this model family yet ({type(config).__name__}); supported: "
        f"{supported_families()}")


def is_exact_family_class(model) -> bool:
    """Whether the model's config class is itself in the table (not a subclass variant)."""
    return type(_model_config(model)).__name__ in _BY_CLASS


def base_model(model) -> Optional[str]:
    """The ``training.lora_metadata.BASE_MODELS`` key of the model, or None for a variant of a
    family (SSD-1B, KOALA: SDXL subclasses whose LoRAs do not fit SDXL tools) or an unknown class."""
    config = _model_config(model)
    if not is_exact_family_class(config):
        return None
    return family_of(config).base_model_for(getattr(config, "unet_config", None))


def target_pattern(model, target_set: str) -> re.Pattern:
    """The compiled pattern of ``target_set`` for the model's family (ValueError if unknown)."""
    family = family_of(model)
    if target_set not in family.patterns:
        raise ValueError(f"unknown target modules {target_set!r}; choose one of {list(family.patterns)}")
    return family.patterns[target_set]


def select_targets(model, diffusion_model, target_set: str,
                   qualifies: Callable[[object], bool] = lambda m: True) -> list:
    """Names (relative to ``diffusion_model``) of the modules matching ``target_set`` for the
    model's family that ``qualifies`` accepts, in module order."""
    pattern = target_pattern(model, target_set)
    return [n for n, m in diffusion_model.named_modules() if pattern.search(n) and qualifies(m)]


def block_lists(model) -> tuple:
    """``((name, nn.ModuleList or module), ...)`` of the model's top-level blocks in execution
    order, for block-level checkpointing (UNet ``input_blocks``/``middle_block``/``output_blocks``,
    FLUX ``double_blocks``/``single_blocks``, MMDiT ``joint_blocks``, Qwen ``transformer_blocks``, Lumina ``context_refiner``/
    ``noise_refiner``/``layers``)."""
    inner = getattr(model, "model", model)
    diffusion_model = getattr(inner, "diffusion_model", inner)
    return tuple((name, getattr(diffusion_model, name)) for name in family_of(model).block_lists
                 if getattr(diffusion_model, name, None) is not None)


def memory_factors(model) -> tuple:
    """The family's ``(fast, lean)`` denoiser memory factors (:attr:`Family.memory_factors`)."""
    return family_of(model).memory_factors


def decode_factors(model) -> Optional[tuple]:
    """The family's decoder memory factors (:attr:`Family.decode_factors`); None: the KL VAEs'
    (``training.memory_plan.KL_DECODE_FACTORS``). This module imports nothing of the pack."""
    return family_of(model).decode_factors


def default_cfg(model) -> float:
    return family_of(model).default_cfg


def guidance_value(model) -> Optional[float]:
    """The default embedded guidance for models with a guidance input (FLUX.1 dev: 3.5)."""
    family = family_of(model)
    if family.guidance is None:
        return None
    unet_config = getattr(_model_config(model), "unet_config", {}) or {}
    return family.guidance if unet_config.get("guidance_embed", True) else None
