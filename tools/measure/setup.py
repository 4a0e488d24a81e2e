"""What the measuring tools share: they import this module and nothing of one another.

* the repository on ``sys.path`` (``REPO``: ``training``, ``reward_models`` import as top-level
  packages) and a tool's workers in fresh processes (:func:`worker_command`, :func:`last_json_line`);
* Stable Diffusion 1.x's noise schedule (:func:`sd_alphas_cumprod`, :func:`sd_schedule`);
* models: :func:`attention_projections` (the LoRA targets of a diffusers UNet), :func:`vae_decoder`
  (the SD / SDXL or FLUX / SD3 VAE, decoder side); bench's reduced-width SD UNet and small decoder
  (:func:`bench_unet`, :func:`bench_decoder`) and :class:`Setup`, the model, LoRA, decoder, schedule
  and prompts of one worker of ``speed/bench``, ``speed/peers`` and ``speed/cfg_gradient_study``;
* the trainer's memory ways (:data:`WAYS`, :func:`way_plan`, :func:`way_kwargs`), as the bench,
  the peers, ``make vram`` and the GPU check build them;
* one update traced on fake tensors, for ``memory/vram`` (UNets) and ``memory/vram_dit`` (DiTs):
  :data:`METHODS`, :func:`build_aesthetic_reward`, :func:`memory_mode`, :func:`update_sampler`,
  :func:`update_trainer` and :func:`trace_update`;
* :func:`pack_module`: a module of the pack's ``nodes/`` imported without ``nodes/__init__.py``
  (the GPU check's in-process path, ``make vram``'s Wan decoder units and decode).

Nothing here imports torch, diffusers or the project's packages until a function needs them, so a
tool's ``--help`` stays instant.
"""
from __future__ import annotations

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

GIB = 1024 ** 3
PACK = "draft_measure_pack"


def pack_module(relative: str):
    """``nodes/...`` or ``training/...`` of this repository imported as a package submodule, so
    the nodes' relative imports work without ``nodes/__init__.py`` (which needs a running
    ComfyUI's ``comfy_api``); as tests/lora_fixtures.py ``import_pack_module`` does. ComfyUI's
    ``comfy`` must be importable for the modules that import it."""
    import importlib
    import types
    if PACK not in sys.modules:
        pack = types.ModuleType(PACK)
        pack.__path__ = [REPO]
        sys.modules[PACK] = pack
        for sub in ("nodes", "training"):
            module = types.ModuleType(f"{PACK}.{sub}")
            module.__path__ = [os.path.join(REPO, sub)]
            sys.modules[f"{PACK}.{sub}"] = module
    return importlib.import_module(f"{PACK}.{relative}")

# The trainer's memory ways, as DRaFT Memory Options forces them: name -> (block_checkpointing,
# rows, make vram's mode that traces it, or None). ``auto`` on a device with room takes ``fast``.
WAYS = {"fast": ("off", "all at once", "fast"), "rows": ("off", "one at a time", None),
        "decoder": ("decoder and reward", "one at a time", "lean_decoder"),
        "all": ("on", "one at a time", "lean")}


# ---------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------
def worker_command(module: str, *args: str) -> list:
    """The command that runs the tool ``module`` (e.g. ``tools.measure.speed.bench``) in a fresh
    Python process; run it with ``cwd=REPO``."""
    return [sys.executable, "-m", module, *args]


def last_json_line(stdout: str):
    """The last line of a worker's ``stdout`` that starts with ``{`` (its result), or None."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return lines[-1] if lines else None


# ---------------------------------------------------------------------------------------------
# Stable Diffusion 1.x's schedule
# ---------------------------------------------------------------------------------------------
def sd_alphas_cumprod():
    """Stable Diffusion 1.x's ``scaled_linear`` schedule (beta 0.00085 -> 0.012, 1000 steps)."""
    import torch
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sd_schedule(steps: int) -> tuple:
    """(log sigmas of the 1000 training timesteps (float32), the sampler's sigmas of ``steps``
    ``ddim_uniform``-like steps, then 0)."""
    from training.sampler import vp_sigmas_from_alphas_cumprod
    alphas_cumprod = sd_alphas_cumprod()
    log_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().log().float()
    stride = max(1, 1000 // steps)
    timesteps = list(range(1, 1000, stride))[:steps][::-1]
    return log_sigmas, vp_sigmas_from_alphas_cumprod(alphas_cumprod, timesteps)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def attention_projections(unet) -> list:
    """Names of every attention projection of a diffusers UNet (the LoRA targets)."""
    suffixes = (".to_q", ".to_k", ".to_v", ".to_out.0")
    return [name for name, _ in unet.named_modules()
            if (".attn1" in name or ".attn2" in name) and name.endswith(suffixes)]


def vae_decoder(latent_channels: int = 4):
    """The SD / SDXL VAE (``latent_channels`` 4) or the FLUX / SD3 VAE (16, no quant convs) as an
    ``AutoencoderKL`` without its encoder (random weights)."""
    from diffusers import AutoencoderKL
    sd = latent_channels == 4
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        **({} if sd else dict(use_quant_conv=False, use_post_quant_conv=False)))
    del vae.encoder
    if sd:
        del vae.quant_conv
    return vae


def bench_unet(model: str, latent: int):
    from diffusers import UNet2DConditionModel
    if model == "small":
        # The real block structure (cross-attention down/up blocks, mid block with attention,
        # resnets, time embedding), reduced width. Two heads per block give head dims of 32 and 64,
        # in the range of SD's (SD1.x 40-160, SD2/SDXL 64): with tiny heads (e.g. 8 heads of 4
        # channels) CPU attention and its backward dominate everything and the time ratios say
        # more about that kernel than about DRaFT.
        return UNet2DConditionModel(
            sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
            attention_head_dim=2, norm_num_groups=32)
    if model == "sd15":
        # diffusers' defaults are SD1.x's UNet except the text width (CLIP ViT-L/14: 768).
        return UNet2DConditionModel(sample_size=latent, cross_attention_dim=768)
    raise ValueError(model)


def bench_decoder(kind: str, model: str):
    """Latent (B, 4, h, w) -> image (B, 3, 8h, 8w) in [0, 1]."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    if kind == "vae":
        vae = vae_decoder()  # the SD1.x VAE's architecture, random weights; only the decoder runs

        class VaeDecoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.vae = vae

            def forward(self, z):
                img = self.vae.decode(z / 0.18215, return_dict=False)[0]
                return (img * 0.5 + 0.5).clamp(0, 1)

        return VaeDecoder()

    widths = (32, 16, 16, 16) if model == "small" else (64, 32, 16, 16)

    class SmallDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = nn.Conv2d(4, widths[0], 3, padding=1)
            self.ups = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, padding=1)
                                     for i in range(3))
            self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

        def forward(self, z):
            h = F.silu(self.conv_in(z))
            for conv in self.ups:
                h = F.silu(conv(F.interpolate(h, scale_factor=2, mode="nearest")))
            return torch.sigmoid(self.conv_out(h))

    return SmallDecoder()


class Setup:
    """Model, LoRA, decoder, sampler schedule and prompts for one worker. ``args``: ``model``
    (``small`` / ``sd15``), ``decoder`` (``small`` / ``vae``), ``resolution``, ``rank``, ``steps``,
    ``cfg`` and optionally ``cond_only`` (CFG's unconditional branch without gradient)."""

    def __init__(self, args, device):
        import torch
        from torch import nn
        from training.lora import wrap_module

        self.device = device
        latent = args.resolution // 8
        self.latent_shape = (4, latent, latent)
        torch.manual_seed(0)
        unet = bench_unet(args.model, latent)
        decoder = bench_decoder(args.decoder, args.model)
        for module in (unet, decoder):
            module.eval().requires_grad_(False)
        self.lora = wrap_module(unet, attention_projections(unet), rank=args.rank,
                                alpha=float(args.rank), seed=0)
        # A random LoRA "up" (instead of PEFT's zero init) so its gradient path is non-trivial.
        with torch.no_grad():
            for p in self.lora.trainable_parameters():
                p.normal_(0.0, 1e-3)
        self.unet = unet.to(device)
        self.lora.to(device)
        self.decoder = decoder.to(device)

        log_sigmas, self.sigmas = sd_schedule(args.steps)
        self.log_sigmas = log_sigmas.to(device)
        dim = unet.config.cross_attention_dim
        g = torch.Generator().manual_seed(1)
        self.prompts = [f"prompt {i}" for i in range(4)]
        self.context = torch.randn(len(self.prompts), 77, dim, generator=g).to(device)
        self.uncond = torch.randn(1, 77, dim, generator=g).to(device)
        self.cfg = float(args.cfg)
        self.cond_only = bool(getattr(args, "cond_only", False))
        setup = self

        class Denoiser(nn.Module):
            """``x0 = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma), context)`` (EPS, VP)."""

            def forward(self, x, sigma, prompt_index):
                s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
                x_in = x / torch.sqrt(1.0 + s ** 2)
                # ComfyUI's ModelSamplingDiscrete.timestep: nearest log-sigma of the 1000.
                t = (sigma.float().log()[None, :] - setup.log_sigmas[:, None]).abs().argmin(dim=0)
                ctx = setup.context[prompt_index]
                if setup.cfg > 0 and setup.cond_only and torch.is_grad_enabled():
                    # the unconditional branch without gradient (batched as usual under no_grad)
                    eps_c = setup.unet(x_in, t, encoder_hidden_states=ctx, return_dict=False)[0]
                    with torch.no_grad():
                        eps_u = setup.unet(x_in, t, encoder_hidden_states=setup.uncond.expand(
                            x.shape[0], -1, -1), return_dict=False)[0]
                    eps = eps_u + setup.cfg * (eps_c - eps_u)
                    return x - s * eps.to(x.dtype)
                if setup.cfg > 0:
                    x_in, t = torch.cat([x_in, x_in]), torch.cat([t, t])
                    ctx = torch.cat([setup.uncond.expand(x.shape[0], -1, -1), ctx])
                eps = setup.unet(x_in, t, encoder_hidden_states=ctx, return_dict=False)[0]
                if setup.cfg > 0:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + setup.cfg * (eps_c - eps_u)
                return x - s * eps.to(x.dtype)

        self.denoise = Denoiser()

    def weight_storages(self) -> set:
        """Storage addresses of everything that exists before an iteration (weights, context)."""
        ptrs = set()
        tensors = [*self.unet.parameters(), *self.unet.buffers(), *self.decoder.parameters(),
                   *self.decoder.buffers(), *self.lora.parameters(), self.context, self.uncond,
                   self.log_sigmas]
        for t in tensors:
            ptrs.add(t.untyped_storage().data_ptr())
        return ptrs


# ---------------------------------------------------------------------------------------------
# one update traced on fake tensors (memory/vram, memory/vram_dit)
# ---------------------------------------------------------------------------------------------
METHODS = {"lv2": ("draft_lv", 1), "k1": ("draft_k", 1), "full": ("draft", None)}


def build_aesthetic_reward():
    """The project's LAION aesthetic reward on open_clip's CLIP ViT-L/14 (random weights)."""
    from reward_models.aesthetic import AestheticHead, AestheticReward
    from reward_models.open_clip_backbone import build_open_clip
    from reward_models.preprocess import ImageTransform
    clip = build_open_clip("ViT-L-14-quickgelu")
    return AestheticReward(AestheticHead(), clip.visual, ImageTransform("crop", 224))


def way_plan(way: str):
    """``training.memory_plan.choose_plan``'s plan for ``way`` (a key of :data:`WAYS`, or ``auto``:
    DRaFT Memory Options left at its defaults) on a device with room for anything."""
    from training.memory_plan import MemoryOptions, choose_plan
    options = MemoryOptions() if way == "auto" else MemoryOptions(
        block_checkpointing=WAYS[way][0], rows=WAYS[way][1])
    return choose_plan(options, rows=1, cfg_branches=2, decode_bytes=GIB, denoiser_row_bytes=GIB,
                       available_bytes=2 ** 50)


def way_kwargs(way: str, denoiser_units=(), decoder_units=(), video: bool = False) -> dict:
    """``DraftTrainer``'s memory arguments for ``way`` (:func:`way_plan`), built as the trainer
    node builds them (``training.memory_plan.trainer_memory_kwargs``; ``video``: a video
    decoder's)."""
    from training.memory_plan import trainer_memory_kwargs
    return trainer_memory_kwargs(way_plan(way), denoiser_units, decoder_units, video=video)


# make vram's modes -> the way each traces (``before`` differs from ``fast`` only in the decode,
# which :func:`update_trainer` checkpoints as a whole; ``lean_cond`` is ``lean`` with CFG's
# unconditional branch without gradient, set on the denoiser)
MODE_WAY = {**{mode: way for way, (_, _, mode) in WAYS.items() if mode},
            "before": "fast", "lean_cond": "all"}


def memory_mode(mode: str, denoiser_units: list, decoder, video: bool = False,
                decoder_units=None) -> dict:
    """DraftTrainer's memory settings for a row's ``mode`` (:data:`MODE_WAY`; see memory/vram.py),
    given the denoiser's checkpoint units and the diffusers VAE ``decoder`` (its units:
    ``training.checkpointing.diffusers_decoder_units``), or ``decoder_units`` given (a ComfyUI
    decoder's, ``comfy_glue.decoder_checkpoint_units``); ``video``: a video decoder's, as the
    trainer node tells them apart; the decode as on a CUDA device (NCHW), not the CPU's layout."""
    if decoder_units is None:
        from training.checkpointing import diffusers_decoder_units
        decoder_units = diffusers_decoder_units(decoder)
    return dict(way_kwargs(MODE_WAY[mode], denoiser_units, decoder_units, video=video),
                channels_last_decode=False)


def allocate_adam_state_only(trainer) -> None:
    """Replace the trainer's AdamW step by the allocation of its state: AdamW reads its step
    counter as a Python number, which fake tensors do not have; its memory is two float32 moments
    per LoRA factor, allocated here as AdamW's first step would."""
    import torch
    moments = {}

    def adam_state_only(*a, **kw):
        for p in trainer.params:
            if id(p) not in moments:
                moments[id(p)] = (torch.zeros_like(p), torch.zeros_like(p))
    trainer.optimizer.step = adam_state_only


def update_sampler(method: str, sigmas, **kwargs):
    """The sampler of a row's ``method`` (a key of :data:`METHODS`, DRaFT-LV with 2 samples,
    checkpointed) on real ``sigmas``; its denoiser is set by :func:`update_trainer`."""
    from training import DifferentiableSampler, SamplerSettings
    name, k = METHODS[method]
    settings = SamplerSettings(method=name, k=k or 1, lv_samples=2, checkpointing=True)
    return DifferentiableSampler(None, sigmas, settings, **kwargs)


def update_trainer(sampler, denoiser, vae, latent_scale: float, latent_shift, reward, lora,
                   latent_shape: tuple, batch: int, mode: str, denoiser_units: list,
                   decode=None, video: bool = False, decoder_units=None):
    """The ``DraftTrainer`` of one traced update: ``denoiser`` in ``sampler``, the decode through
    ``vae`` (latent / ``latent_scale`` + ``latent_shift`` unless None, to [0, 1]; or ``decode``,
    a video decoder returning each sample's frames, ``video`` then True), ``reward`` on 4
    prompts, the memory settings of ``mode`` (``decoder_units``: see :func:`memory_mode`) and
    AdamW's state allocated without its step."""
    from training import DraftTrainer, TrainSettings

    if decode is None:
        def decode(z):
            z = z / latent_scale if latent_shift is None else z / latent_scale + latent_shift
            img = vae.decode(z, return_dict=False)[0]
            return (img.float() * 0.5 + 0.5).clamp(0, 1)

    if mode == "before":  # the fast way as it was: the whole decode checkpointed
        from torch.utils.checkpoint import checkpoint
        plain_decode = decode

        def decode(z):
            return checkpoint(plain_decode, z, use_reentrant=False)

    sampler.denoise = denoiser
    trainer = DraftTrainer(sampler, decode, lambda im, p: reward(im, p), ["p0", "p1", "p2", "p3"],
                           lora, latent_shape, TrainSettings(batch_size=batch, seed=0),
                           **memory_mode(mode, denoiser_units, vae.decoder, video=video,
                                             decoder_units=decoder_units))
    allocate_adam_state_only(trainer)
    return trainer


def trace_update(trainer, row: dict, denoiser, vae, reward, lora, started: float,
                 streamed: set = frozenset()) -> dict:
    """Run one update of ``trainer`` under :class:`training.memory_trace.LiveBytes` and return
    ``row`` (model, method, batch, mode, lowvram, steps, resolution) with the GiB of the resident
    weights (the denoiser's without its LoRA factors and the ``streamed`` weights, by id; the VAE's,
    the reward model's; the LoRA factors with their gradients and AdamW's two moments) and of the
    update's peak (``peak_update_gib``), their sum (``total_gib``), what the update left
    allocated, its K and the seconds since ``started``."""
    from training.memory_trace import LiveBytes, module_bytes, tensor_bytes
    lora_ids = {id(p) for p in lora.parameters()}
    denoiser_bytes = tensor_bytes([p for p in list(denoiser.parameters()) + list(denoiser.buffers())
                                   if id(p) not in lora_ids and id(p) not in streamed])
    lora_bytes = tensor_bytes(lora.parameters())
    # The update runs outside the fake mode: the models' tensors are fake (every op on them is
    # faked by their own mode), while the engine's small host-side draws (prompt indices, noises,
    # the schedule) stay real, as on a GPU run.
    counter = LiveBytes()
    with counter:
        report = trainer.step()
    activations, left_after_update = counter.peak, counter.live
    # LoRA factors + AdamW's two moments are resident between updates; the counter's peak holds the
    # gradients (and, in a first update, the moments' creation after the activations are gone).
    lora_resident = 3 * lora_bytes
    weights = denoiser_bytes + module_bytes(vae) + module_bytes(reward) + lora_resident
    total = weights + activations
    return dict(row, **{
        "unet_weights_gib": denoiser_bytes / GIB, "vae_weights_gib": module_bytes(vae) / GIB,
        "reward_weights_gib": module_bytes(reward) / GIB, "lora_and_adam_gib": lora_resident / GIB,
        "peak_update_gib": activations / GIB, "total_gib": total / GIB,
        "left_after_update_gib": left_after_update / GIB, "k": report.k,
        "seconds": time.perf_counter() - started})
