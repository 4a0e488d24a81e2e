"""``make gpu-check``: one prepared script for a lent GPU (at most 8 minutes on one H100/H200).

What it measures, with ComfyUI in-process and FULL-SIZE random-weight models built on the GPU
(ComfyUI's own classes ``comfy.supported_models.SD15/SDXL(unet_config)`` with the published UNet
configs, bf16 weights filled with seeded small normals on the device; the full KL VAE that
``comfy.sd.VAE`` builds from its decoder's input conv; fake conditioning of the text encoders'
shapes; nothing downloaded), every update through the pack's real ``nodes.training_run.TrainingRun``:

* **rows**: SD1.5 at 512 px and SDXL at 1024 px (FLUX.1-dev at 1024 px, fp8 weights: ``--flux``),
  one DRaFT-1 and one DRaFT-LV (n = 2) update in each of the trainer's memory ways, forced through
  ``training.memory_plan.MemoryOptions`` as the DRaFT Memory Options node would:
  ``fast`` (blocks off, rows all at once), ``rows`` (blocks off, rows one at a time), ``decoder``
  (decoder-and-reward blocks, rows one at a time), ``all`` (blocks on, rows one at a time). Per row:
  ``torch.cuda.max_memory_allocated`` added by the update (peak statistics reset just before
  ``DraftTrainer.step``, after the weights are loaded and one warm-up update: ``added =
  max_allocated - allocated_before``; it includes the LoRA's AdamW state created in that step, a few
  MiB), beside ``make vram``'s fake-tensor figure for the same row (``docs/vram_figures.json``;
  ``-`` where it has none) and beside the trainer's own estimate for that way
  (``estimate_update_bytes`` fed by ``nodes.comfy_glue.update_memory_inputs`` and
  ``nodes.architectures.memory_factors``, as ``TrainingRun._memory_plan`` does). Verdicts:
  estimate >= measured, estimate <= 1.4 x measured.
* **cards**: consumer cards emulated at 8, 12, 16 and 24 GiB, and per model a probe card too small
  even with the UNet streamed (weights - UNet + half the leanest estimate), which must be refused:
  ``torch.cuda.set_per_process_memory_fraction(card / total)`` AND ComfyUI's
  ``comfy.model_management.get_total_memory`` / ``get_free_memory`` patched for the duration to
  report that card (``torch.cuda.mem_get_info``, which ComfyUI reads, ignores the fraction), every
  model unloaded first so ComfyUI loads the weights as on that card. The trainer runs with block
  checkpointing ``auto`` and rows ``auto``: which way ``auto`` picked (the ``DRaFT memory:`` log
  line), that the update ran without OOM, or that the run was refused before the first iteration
  with ``DoesNotFit``'s message. ComfyUI's module-level ``total_vram`` (read once at import, for
  its vram state) still says the full GPU.
* **speed**: seconds per DRaFT-1 update (the way ``auto`` picks on the full GPU) against ComfyUI's
  KSampler (``comfy.sample.sample``, ``ddim`` / ``ddim_uniform``, same model, steps, cfg and latent
  size), ``torch.cuda.synchronize`` around each timing, the median of ``--reps``.

**The reward differs from make vram's.** The rows of ``make vram`` use the LAION aesthetic reward
on CLIP ViT-L/14 (open_clip). Here the reward is ``reward_models.ImageStatReward("brightness")``
(weight-free, differentiable, no open_clip): the measured peak lacks the ViT-L/14 activations of
the reward's forward and backward at 224 px (with the reward's blocks checkpointed, a few hundred
MiB at most; without, about 1 GiB per row in bf16), so where the decoder or the denoiser sets the
peak the figures compare directly, and a measured figure a little below make vram's is expected.
The trainer's estimate has no reward term either (it is the larger of decoder and denoiser).

``--dry-run``: the same phases on the CPU at tiny size (the test suite's tiny SD1.5 / SDXL UNets, a
4-channel TAESD, 3 steps, a 64 px image), memory counted by ``training.memory_trace.LiveBytes``
instead of the CUDA counters, cards scaled to the tiny model (one per way the estimate ranks, and
one below the leanest); it writes the same JSON and table (tests/test_gpu_check.py runs it).

Output (``--out DIR``, default ``gpu_check_out/``): ``gpu_check.json`` ({"device", "torch",
"comfyui", "rows", "cards", "speed", "verdicts", "seconds"}) and ``gpu_check.txt`` (the tables).

Packages: ``--check-packages`` (also run first by every check) lists the modules of the in-process
path that do not import and the pip names to carry; it exits 1 when any is missing. On the lent
GPU machine (Python 3.12, torch 2.11+cu130, transformers, safetensors, einops, scipy, tqdm, psutil,
pyyaml, pillow, aiohttp, yarl, sentencepiece, tokenizers, numpy, ...) only ``torchsde`` (ComfyUI's
k-diffusion samplers import it) and its dependency ``trampoline`` should be missing; ``torchvision``
is needed too (``comfy.ldm.cosmos`` imports it) and comes with the machine's timm, but only a build
matching its torch will do, so it is checked, never carried. Prepare here:

    pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl torchsde trampoline
    rm -rf .cache/comfyui_copy && mkdir -p .cache/comfyui_copy && \
      (cd "$COMFYUI_PATH" && tar --exclude=.git -cf - .) | tar -xf - -C .cache/comfyui_copy

and on the device (``run`` with carry ``[".whl", ".cache/comfyui_copy"]``; ComfyUI without its .git
is about 16 MiB, the two wheels 66 KiB; a timeout_s of 540 leaves the 8 minutes):

    python3 -m pip install -q --no-deps --target /tmp/gpu_check_site .whl/*.whl && \
      PYTHONPATH=/tmp/gpu_check_site make gpu-check PY=python3 \
        ARGS="--comfyui .cache/comfyui_copy --out $OUT"

(or ``python3 -m tools.measure.gpu_check --comfyui .cache/comfyui_copy --out $OUT``; first
``python3 -m tools.measure.gpu_check --check-packages``). Each phase's results are written when it
ends, so a run cut off still leaves the finished phases. The dry run here:
``make gpu-check ARGS=--dry-run`` (about 35 s on one CPU thread).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
import types

from tools.measure.setup import GIB, REPO, WAYS, pack_module

HEADROOM = 1.4
FIGURES = os.path.join(REPO, "docs", "vram_figures.json")
# module -> pip name: the third-party modules the in-process path imports (ComfyUI's comfy.sd /
# comfy.samplers / comfy.model_management / comfy.sample, the pack's nodes.training_run, the
# reward), found by blocking each one in turn on the dry run; transformers' own dependencies
# (tokenizers, huggingface_hub, regex, ...) come with it. Not needed: av, aiohttp, yarl, open_clip,
# diffusers, spandrel, kornia, comfy_api (nodes/__init__.py and reward_types are not imported).
NEEDED = {"torch": "torch", "torchvision": "torchvision (the build matching torch)",
          "numpy": "numpy", "PIL": "pillow", "safetensors": "safetensors", "einops": "einops",
          "psutil": "psutil", "yaml": "pyyaml", "tqdm": "tqdm", "transformers": "transformers",
          "torchsde": "torchsde", "trampoline": "trampoline"}
METHODS = {"k1": ("draft_k", 1), "lv2": ("draft_lv", 2)}  # name -> (sampler method, rows per sample)
CARDS_GIB = (8, 12, 16, 24)

# -- models ---------------------------------------------------------------------------------------
_LDM = dict(use_checkpoint=False, in_channels=4, out_channels=4, use_spatial_transformer=True,
            legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
SD15_FULL = dict(_LDM, image_size=32, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
                 num_heads=8, adm_in_channels=None)
SDXL_FULL = dict(_LDM, image_size=32, model_channels=320, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048,
                 num_head_channels=64, num_classes="sequential", adm_in_channels=2816)
FLUX_DEV_FULL = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2,
                     vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                     num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                     theta=10000, qkv_bias=True, guidance_embed=True)
# the test suite's tiny layouts (tests/lora_fixtures.py SD15_TINY_LDM; SDXL_TINY_LDM with SDXL's
# text widths, as tests/test_comfyui_inprocess.py TINY_SDXL_UNET)
SD15_TINY = dict(_LDM, image_size=8, model_channels=32, num_res_blocks=[2, 2], channel_mult=[1, 2],
                 transformer_depth=[1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 0, 0, 0],
                 transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=64,
                 adm_in_channels=None)
SDXL_TINY = dict(_LDM, image_size=8, model_channels=32, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 1, 1, 2, 2],
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=2,
                 use_linear_in_transformer=True, context_dim=2048, num_classes="sequential",
                 adm_in_channels=2816)  # SDXL's context and adm widths (ComfyUI's encode_adm)
# name -> (ComfyUI config class, unet_config, weight dtype name, compute dtype name or None,
#          image px, text (tokens, width), pooled width or None, VAE latent channels, cfg)
FULL = {"sd15_512": ("SD15", SD15_FULL, "bfloat16", None, 512, (77, 768), None, 4, 7.0),
        "sdxl_1024": ("SDXL", SDXL_FULL, "bfloat16", None, 1024, (77, 2048), 1280, 4, 7.0)}
FLUX = {"flux_dev_1024": ("Flux", FLUX_DEV_FULL, "float8_e4m3fn", "bfloat16", 1024, (256, 4096),
                          768, 16, 1.0)}
TINY = {"sd15_tiny": ("SD15", SD15_TINY, "float32", None, 64, (6, 64), None, 4, 7.0),
        "sdxl_tiny": ("SDXL", SDXL_TINY, "float32", None, 64, (6, 2048), 1280, 4, 7.0)}


def check_packages() -> list:
    """``(module, pip name)`` of each module of :data:`NEEDED` that cannot be imported here."""
    return [(m, p) for m, p in NEEDED.items() if importlib.util.find_spec(m) is None]


def import_comfy(path: str, cpu: bool):
    """Put the ComfyUI checkout at ``path`` on ``sys.path`` and import what the check uses."""
    if not os.path.isfile(os.path.join(path, "comfy", "sd.py")):
        raise SystemExit(f"no ComfyUI checkout at {path} (--comfyui PATH or COMFYUI_PATH)")
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args
    if cpu:
        args.cpu = True
    for name in ("comfy.model_management", "comfy.model_patcher", "comfy.sd", "comfy.samplers",
                 "comfy.sample", "comfy.supported_models", "comfy.taesd.taesd"):
        importlib.import_module(name)
    return sys.modules["comfy"]


def fill_(module, seed: int) -> None:
    """Seeded explicit weights on the module's own device (ComfyUI's ops leave them empty, and
    NaNs make every update skip): fan-in-scaled normals for matrices, 1 + noise for norm scales,
    small biases; float8 weights filled through bf16."""
    import torch
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            if p.ndim == 0:  # a scalar (TAESD's vae_scale / vae_shift) keeps its value
                continue
            g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
            noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32
                                if p.device.type == "cpu" else torch.bfloat16)
            if name.endswith("bias"):
                value = 0.02 * noise
            elif p.ndim == 1:
                value = 1.0 + 0.05 * noise
            else:
                value = noise / max(1, p[0].numel()) ** 0.5
            p.copy_(value.to(p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("pos_embed"):
                b.copy_(0.1 * torch.randn(b.shape, device=b.device).to(b.dtype))


def build_model(comfy, spec: tuple, device, seed: int = 0):
    """A ``ModelPatcher`` around ComfyUI's model class for ``spec`` (a :data:`FULL` value), built
    directly on ``device`` in the spec's dtype and filled there."""
    import torch
    import comfy.model_management as mm
    cls, unet_config, dtype, compute, *_ = spec
    config = getattr(comfy.supported_models, cls)(dict(unet_config))
    config.set_inference_dtype(getattr(torch, dtype), compute and getattr(torch, compute))
    model = config.get_model({}, device=device)
    fill_(model.diffusion_model, seed)
    model.diffusion_model.eval()
    offload = torch.device("cpu") if device.type == "cpu" else mm.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=offload)


def build_vae(comfy, latent_channels: int, tiny: bool, seed: int = 1):
    """ComfyUI's ``VAE``: the full KL VAE (ch 128) it detects from a decoder input conv, filled;
    or, ``tiny``, a TAESD of ``latent_channels``."""
    import torch
    import comfy.sd
    logging.disable(logging.WARNING)  # ComfyUI lists every weight missing from the state dict
    try:
        if tiny:
            module = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
            fill_(module, seed)
            vae = comfy.sd.VAE(sd=module.state_dict())
        else:
            vae = comfy.sd.VAE(sd={"decoder.conv_in.weight": torch.zeros(512, latent_channels, 3, 3)})
    finally:
        logging.disable(logging.NOTSET)
    fill_(vae.first_stage_model, seed)
    return vae


def encoder(spec: tuple):
    """``prompt -> CONDITIONING`` of one entry, FAKE: seeded normals in the text encoders' shapes
    (``(1, tokens, width)``, pooled ``(1, width)``), as tests/dit_fixtures.py ``conditioning``."""
    import torch
    (tokens, width), pooled = spec[5], spec[6]

    def encode(text: str):
        g = torch.Generator().manual_seed(sum(map(ord, text)) * 31 + len(text))
        extra = {"pooled_output": torch.randn(1, pooled, generator=g)} if pooled else {}
        return [[torch.randn(1, tokens, width, generator=g), extra]]
    return encode


# -- measuring --------------------------------------------------------------------------------------
class StepMeter:
    """Wraps ``DraftTrainer.step`` while active: seconds (synchronised) and bytes added by each
    update (CUDA: ``max_memory_allocated - memory_allocated`` before, the peak reset just before;
    CPU: ``LiveBytes`` peak of the storages the step creates)."""

    def __init__(self, trainer_cls, device):
        self.cls, self.device, self.steps = trainer_cls, device, []

    @contextlib.contextmanager
    def active(self):
        import torch
        original, meter = self.cls.step, self

        def step(trainer):
            cuda = meter.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                report = original(trainer)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                added = torch.cuda.max_memory_allocated() - before
            else:
                from training.memory_trace import LiveBytes
                t0 = time.perf_counter()
                with LiveBytes("cpu") as live:
                    report = original(trainer)
                seconds, added = time.perf_counter() - t0, live.peak
            meter.steps.append({"seconds": seconds, "bytes": int(added),
                                "skipped": bool(report.skipped)})
            return report

        self.cls.step = step
        try:
            yield self
        finally:
            self.cls.step = original


class PlanLog(logging.Handler):
    """Collects the trainer's ``DRaFT memory: ...`` lines (the plan's ``describe()``)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("DRaFT memory: "):
            self.lines.append(message[len("DRaFT memory: "):])


def run_config(pack, method: str, memory, steps: int, px: int, cfg: float, iterations: int = 1):
    """The trainer node's settings for one run (no saves, no previews)."""
    SamplerSettings, TrainSettings = pack["sampler"].SamplerSettings, pack["trainer"].TrainSettings
    sampler_method, n = METHODS[method]
    mp = pack["memory_plan"]
    return pack["training_run"].RunConfig(
        prompts=["a photo of a cat"], negative_prompt="",
        sampler=SamplerSettings(sampler_method, k=1, lv_samples=n), steps=steps,
        scheduler="ddim_uniform", cfg=cfg, width=px, height=px,
        train=TrainSettings(iterations=iterations, learning_rate=1e-4, seed=0),
        rank=8, alpha=8.0, target_set="attention", mixed_precision="auto", save_every=0,
        preview_every=0, lora_name="draft/gpu_check", memory=mp.MemoryOptions(*memory))


def one_run(ctx, name: str, method: str, memory: tuple, iterations: int = 1) -> dict:
    """One ``TrainingRun``; returns its steps (seconds, bytes), plan line and outcome."""
    import torch
    pack, (patcher, vae, encode, spec) = ctx["pack"], ctx["models"][name]
    meter = StepMeter(pack["trainer"].DraftTrainer, ctx["device"])
    plans = PlanLog()
    log = logging.getLogger("ComfyUI-DRaFT")
    log.addHandler(plans)
    log.setLevel(logging.INFO)
    out = {"outcome": "ran", "message": ""}
    config = run_config(pack, method, memory, ctx["steps"], ctx["px"](spec), spec[8], iterations)
    try:
        with meter.active():
            pack["training_run"].TrainingRun(patcher, vae, encode, ctx["reward"], config).run()
    except pack["memory_plan"].DoesNotFit as e:
        out.update(outcome="refused", message=str(e))
    except torch.cuda.OutOfMemoryError as e:
        out.update(outcome="oom", message=str(e).splitlines()[0])
    finally:
        log.removeHandler(plans)
    out.update(steps=meter.steps, plan=plans.lines[-1] if plans.lines else "")
    if out["outcome"] == "ran" and (len(meter.steps) != iterations
                                    or any(s["skipped"] for s in meter.steps)):
        out.update(outcome="skipped" if meter.steps else "no update")
    return out


def estimates(ctx, name: str, method: str) -> dict:
    """The trainer's estimate (bytes) per way, as ``TrainingRun._memory_plan`` computes it."""
    pack, (patcher, vae, _, spec) = ctx["pack"], ctx["models"][name]
    px = ctx["px"](spec)
    down = vae.spacial_compression_encode()
    latent = (spec[7], px // down, px // down)
    decode, row = pack["comfy_glue"].update_memory_inputs(patcher, vae, latent)
    kw = dict(rows=METHODS[method][1], cfg_branches=1 if spec[8] == 1.0 else 2, decode_bytes=decode,
              denoiser_row_bytes=row, denoiser_factors=pack["architectures"].memory_factors(patcher),
              decode_factors=pack["architectures"].decode_factors(patcher))
    mp = pack["memory_plan"]
    return {way: mp.estimate_update_bytes(blocks=b, one_row=r == "one at a time", **kw)
            for way, (b, r, _) in WAYS.items()}


def vram_figure(figures: list, name: str, method: str, mode) -> float | None:
    """make vram's ``peak_update_gib`` for (model, method, batch 1, mode, not lowvram), or None."""
    for r in figures:
        if (r.get("model"), r.get("method"), r.get("batch"), r.get("mode"), r.get("lowvram")) == \
                (name, method, 1, mode, False):
            return r.get("peak_update_gib")
    return None


def plan_estimate_gib(plan_line: str) -> float | None:
    """The ``estimated X GiB`` of a plan's ``describe()``, or None."""
    import re
    m = re.search(r"estimated ([0-9.]+) GiB", plan_line)
    return float(m.group(1)) if m else None


def _expected_plan(way: str) -> str:
    blocks, rows, _ = WAYS[way]
    return f"block checkpointing {blocks}, rows {rows}"


def measure_rows(ctx) -> list:
    """Every model x method x way: measured, make vram's and estimated GiB, and the verdicts."""
    figures = []
    if os.path.exists(FIGURES):
        with open(FIGURES) as f:
            figures = json.load(f).get("rows", [])
    rows = []
    for name in ctx["models"]:
        one_run(ctx, name, "k1", ("off", "all at once"))  # warm-up: weights loaded, kernels chosen
        for method in METHODS:
            est = estimates(ctx, name, method)
            for way, (blocks, row_choice, mode) in WAYS.items():
                r = one_run(ctx, name, method, (blocks, row_choice))
                measured = r["steps"][0]["bytes"] if r["steps"] else None
                e = est[way]
                rows.append({
                    "model": name, "method": method, "way": way, "vram_mode": mode,
                    "outcome": r["outcome"], "message": r["message"], "plan": r["plan"],
                    "plan_as_forced": r["plan"].startswith(_expected_plan(way)),
                    "measured_gib": measured / GIB if measured is not None else None,
                    "vram_gib": vram_figure(figures, name, method, mode) if mode else None,
                    "estimate_gib": e / GIB, "plan_estimate_gib": plan_estimate_gib(r["plan"]),
                    "seconds": r["steps"][0]["seconds"] if r["steps"] else None,
                    "estimate_covers": measured is not None and e >= measured,
                    "estimate_within_headroom": measured is not None and e <= HEADROOM * measured})
    return rows


@contextlib.contextmanager
def emulated_card(mm, device, card_bytes: int):
    """ComfyUI sees a card of ``card_bytes``: every model unloaded, CUDA's allocator capped with
    ``set_per_process_memory_fraction`` and ``get_total_memory`` / ``get_free_memory`` patched
    (``mem_get_info`` ignores the fraction). On the CPU (dry run) only the patch: free = card -
    what ComfyUI has loaded."""
    import torch
    mm.unload_all_models()
    mm.soft_empty_cache()
    cuda = device.type == "cuda"
    total_real = mm.get_total_memory(device)
    saved = mm.get_total_memory, mm.get_free_memory

    def used():
        if cuda:
            return torch.cuda.memory_allocated(device)
        return sum(m.model.loaded_size() for m in mm.current_loaded_models if m.model is not None)

    def get_total_memory(dev=None, torch_total_too=False):
        return (card_bytes, card_bytes) if torch_total_too else card_bytes

    def get_free_memory(dev=None, torch_free_too=False):
        free = max(0, card_bytes - used())
        torch_free = (torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) if cuda else 0
        return (free, torch_free) if torch_free_too else free

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, card_bytes / total_real), device)
    mm.get_total_memory, mm.get_free_memory = get_total_memory, get_free_memory
    try:
        yield
    finally:
        mm.get_total_memory, mm.get_free_memory = saved
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        mm.unload_all_models()
        mm.soft_empty_cache()


def _weights_bytes(ctx, name: str) -> int:
    patcher, vae = ctx["models"][name][:2]
    return int(patcher.model_size() + vae.patcher.model_size())


def tiny_cards(ctx, name: str) -> list:
    """Dry-run cards (bytes): the weights plus each distinct DRaFT-1 estimate of a way (2 % over),
    and one below the leanest, so ``auto`` must pick each way it can tell apart and refuse last."""
    w, est = _weights_bytes(ctx, name), estimates(ctx, name, "k1")
    ordered = sorted(set(est.values()), reverse=True)
    return [int(w + 1.02 * e) for e in ordered] + [int(w + 0.5 * ordered[-1])]


def probe_card(ctx, name: str) -> int:
    """A GPU card (bytes) the run must be refused on: free memory beside the weights plus the
    streamable UNet is half the leanest DRaFT-1 estimate."""
    patcher = ctx["models"][name][0]
    lean = min(estimates(ctx, name, "k1").values())
    return int(_weights_bytes(ctx, name) - patcher.model_size() + 0.5 * lean)


def plan_way(plan_line: str) -> str:
    """``"<blocks> / <rows>"`` of a plan's ``describe()`` ("" when there is none)."""
    if not plan_line.startswith("block checkpointing "):
        return ""
    head = plan_line[len("block checkpointing "):].split(", CFG gradient")[0]
    blocks, rows = head.split(", rows ")
    return f"{blocks} / {rows}"


def expected_way(ctx, name: str, available: int) -> str:
    """What ``choose_plan`` picks for DRaFT-1 with everything ``auto`` when ``available`` bytes are
    free beside the weights (the UNet streamable on a GPU), or ``refused``."""
    pack, (patcher, vae, _, spec) = ctx["pack"], ctx["models"][name]
    mp, px = pack["memory_plan"], ctx["px"](spec)
    down = vae.spacial_compression_encode()
    decode, row = pack["comfy_glue"].update_memory_inputs(patcher, vae, (spec[7], px // down, px // down))
    try:
        plan = mp.choose_plan(
            mp.MemoryOptions(), rows=1, cfg_branches=1 if spec[8] == 1.0 else 2, decode_bytes=decode,
            denoiser_row_bytes=row, available_bytes=int(available),
            streamable_bytes=0 if ctx["dry_run"] else int(patcher.model_size()),
            denoiser_factors=pack["architectures"].memory_factors(patcher),
            decode_factors=pack["architectures"].decode_factors(patcher))
    except mp.DoesNotFit:
        return "refused"
    return plan_way(plan.describe())


def measure_cards(ctx) -> list:
    """DRaFT-1 with everything ``auto`` on each emulated card of each model."""
    import comfy.model_management as mm
    out = []
    for name in ctx["models"]:
        cards = tiny_cards(ctx, name) if ctx["dry_run"] else (
            [int(c * GIB) for c in ctx["cards"]] + [probe_card(ctx, name)])
        weights = _weights_bytes(ctx, name)
        for card in cards:
            with emulated_card(mm, ctx["device"], card):
                r = one_run(ctx, name, "k1", ("auto", "auto"))
            out.append({"model": name, "method": "k1", "card_gib": card / GIB,
                        "weights_gib": weights / GIB, "plan": r["plan"],
                        "picked": plan_way(r["plan"]) if r["outcome"] != "refused" else "refused",
                        "expected": expected_way(ctx, name, card - weights),
                        "outcome": r["outcome"], "message": r["message"],
                        "measured_gib": r["steps"][0]["bytes"] / GIB if r["steps"] else None})
    return out


def measure_speed(ctx) -> dict:
    """Median seconds of a DRaFT-1 update (``auto``) and of ComfyUI's KSampler, per model."""
    import torch
    import comfy.sample
    out = {}
    for name, (patcher, vae, encode, spec) in ctx["models"].items():
        r = one_run(ctx, name, "k1", ("auto", "auto"), iterations=ctx["reps"] + 1)
        px, down = ctx["px"](spec), vae.spacial_compression_encode()
        shape = (1, spec[7], px // down, px // down)
        sampler_times = []
        for rep in range(ctx["reps"] + 1):
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(rep))
            if ctx["device"].type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                comfy.sample.sample(patcher, noise, ctx["steps"], spec[8], "ddim", "ddim_uniform",
                                    encode("a photo of a cat"), encode(""), torch.zeros(shape),
                                    seed=rep, disable_pbar=True)
            if ctx["device"].type == "cuda":
                torch.cuda.synchronize()
            sampler_times.append(time.perf_counter() - t0)
        draft = [s["seconds"] for s in r["steps"][1:]]  # the first (warm-up) left out
        out[name] = {"plan": r["plan"], "outcome": r["outcome"], "steps": ctx["steps"],
                     "draft1_seconds": statistics.median(draft) if draft else None,
                     "ksampler_seconds": statistics.median(sampler_times[1:]),
                     "draft1_all": draft, "ksampler_all": sampler_times[1:]}
        if out[name]["draft1_seconds"]:
            out[name]["ratio"] = out[name]["draft1_seconds"] / out[name]["ksampler_seconds"]
    return out


def verdicts(rows: list, cards: list, speed: dict, dry_run: bool) -> dict:
    """The pass/fail figures. ``estimate_*``: over every row that ran (meaningful at full size
    only: tiny models' activations are not what ComfyUI's per-family formulas describe)."""
    ran = [r for r in rows if r["outcome"] == "ran"]
    fitted = [c for c in cards if c["expected"] != "refused"]
    refused = [c for c in cards if c["expected"] == "refused"]
    return {
        "all_updates_ran": len(ran) == len(rows) > 0,
        "ways_as_forced": all(r["plan_as_forced"] for r in rows) and bool(rows),
        "estimate_is_the_trainers": bool(rows) and all(
            r["plan_estimate_gib"] is not None and abs(r["plan_estimate_gib"] - r["estimate_gib"]) < 0.006
            for r in rows),
        "estimate_covers_measured": bool(ran) and all(r["estimate_covers"] for r in ran),
        "estimate_within_headroom": bool(ran) and all(r["estimate_within_headroom"] for r in ran),
        "estimate_verdicts_meaningful": not dry_run,
        "cards_no_oom": bool(cards) and not any(c["outcome"] == "oom" for c in cards),
        "cards_fitting_ran": bool(fitted) and all(c["outcome"] == "ran" for c in fitted),
        "auto_picked_as_estimated": bool(fitted) and all(c["picked"] == c["expected"] for c in fitted),
        "small_card_refused_before_first_update": bool(refused) and all(
            c["outcome"] == "refused" and "DRaFT update needs about" in c["message"]
            and c["measured_gib"] is None for c in refused),
        "speed_measured": bool(speed) and all(s.get("draft1_seconds") for s in speed.values()),
    }


def _fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def table(report: dict) -> str:
    """The text tables of ``report`` (GiB; seconds)."""
    lines = [f"{report['device']} | torch {report['torch']} | ComfyUI {report['comfyui']}", "",
             f"{'model':<14}{'method':<7}{'way':<9}{'measured':>9}{'make vram':>10}{'estimate':>9}"
             f"{'est>=meas':>10}{'est<=1.4x':>10}{'s':>7}  outcome"]
    for r in report["rows"]:
        lines.append(f"{r['model']:<14}{r['method']:<7}{r['way']:<9}{_fmt(r['measured_gib']):>9}"
                     f"{_fmt(r['vram_gib']):>10}{_fmt(r['estimate_gib']):>9}"
                     f"{str(r['estimate_covers']):>10}{str(r['estimate_within_headroom']):>10}"
                     f"{_fmt(r['seconds']):>7}  {r['outcome']}")
    lines += ["", f"{'model':<14}{'card GiB':>9}  {'auto picked':<26}{'expected':<26}{'measured':>9}  outcome"]
    for c in report["cards"]:
        lines.append(f"{c['model']:<14}{c['card_gib']:>9.2f}  {c['picked']:<26}{c['expected']:<26}"
                     f"{_fmt(c['measured_gib']):>9}  {c['outcome']} {c['message'][:90]}")
    lines += ["", f"{'model':<14}{'steps':>6}{'DRaFT-1 s':>11}{'KSampler s':>12}{'ratio':>7}"]
    for name, s in report["speed"].items():
        lines.append(f"{name:<14}{s['steps']:>6}{_fmt(s['draft1_seconds'], 3):>11}"
                     f"{_fmt(s['ksampler_seconds'], 3):>12}{_fmt(s.get('ratio')):>7}")
    lines += ["", *(f"{k}: {v}" for k, v in report["verdicts"].items()),
              f"seconds: {report['seconds']:.1f}"]
    return "\n".join(lines) + "\n"


def setup(args) -> dict:
    """ComfyUI and the pack imported, the models built, the shared context of the phases."""
    import torch
    dry = args.dry_run
    comfy = import_comfy(args.comfyui, cpu=dry)
    import comfy.model_management as mm
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --dry-run for the CPU rehearsal")
    device = torch.device("cpu") if dry else mm.get_torch_device()
    if dry:  # one thread: on a shared CPU, OpenMP threads waiting on a descheduled peer take 10x
        torch.set_num_threads(1)
    pack = {name: pack_module(path) for name, path in (
        ("training_run", "nodes.training_run"), ("comfy_glue", "nodes.comfy_glue"),
        ("architectures", "nodes.architectures"), ("memory_plan", "training.memory_plan"),
        ("trainer", "training.trainer"), ("sampler", "training.sampler"))}
    from reward_models.image_stats import ImageStatReward
    reward = types.SimpleNamespace(model=ImageStatReward("brightness").to(device), patchers=[],
                                   label="brightness", device=None)
    specs = dict(TINY if dry else FULL)
    if args.flux and not dry:
        specs.update(FLUX)
    models = {}
    for i, (name, spec) in enumerate(specs.items()):
        patcher = build_model(comfy, spec, device, seed=i)
        models[name] = (patcher, build_vae(comfy, spec[7], tiny=dry, seed=i + 10), encoder(spec), spec)
    return dict(pack=pack, models=models, device=device, reward=reward, dry_run=dry,
                steps=args.steps or (3 if dry else 20), reps=args.reps or (2 if dry else 3),
                cards=args.cards, px=lambda spec: spec[4], comfyui=comfy)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--dry-run", action="store_true", help="the CPU rehearsal at tiny size")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH")
                   or os.path.join(REPO, ".cache", "ComfyUI"))
    p.add_argument("--flux", action="store_true", help="also FLUX.1-dev 1024 px, fp8 weights")
    p.add_argument("--check-packages", action="store_true", help="only list missing modules")
    p.add_argument("--steps", type=int, default=0, help="sampling steps (0: 20; dry run 3)")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions (0: 3; dry run 2)")
    p.add_argument("--cards", default=",".join(map(str, CARDS_GIB)),
                   type=lambda s: [float(c) for c in s.split(",")], help="emulated cards, GiB")
    args = p.parse_args(argv)
    missing = check_packages()
    if missing or args.check_packages:
        print("missing: " + (", ".join(f"{m} (pip: {w})" for m, w in missing) if missing else "none"))
        if missing:
            print("carry them as wheels (see this module's docstring): pip download --no-deps "
                  "--python-version 3.12 --only-binary=:all: -d .whl "
                  + " ".join(w.split(" ")[0] for _, w in missing))
        return 1 if missing else 0
    started = time.perf_counter()
    import torch
    ctx = setup(args)
    sys.path.insert(0, args.comfyui)
    try:
        from comfyui_version import __version__ as comfyui_version
    except ImportError:
        comfyui_version = "unknown"
    device = ctx["device"]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "comfyui": comfyui_version, "rows": [], "cards": [],
              "speed": {}, "verdicts": {}, "seconds": 0.0}
    # each phase's results written as soon as it ends: a run cut off by the device's time limit
    # still leaves the finished phases (and their verdicts) in DIR
    for key, phase in (("rows", measure_rows), ("cards", measure_cards), ("speed", measure_speed)):
        report[key] = phase(ctx)
        report["verdicts"] = verdicts(report["rows"], report["cards"], report["speed"], ctx["dry_run"])
        report["seconds"] = time.perf_counter() - started
        text = write_report(report, args.out)
    print(text)
    return 0


def write_report(report: dict, out: str) -> str:
    """``gpu_check.json`` and ``gpu_check.txt`` into ``out``; returns the text."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = table(report)
    with open(os.path.join(out, "gpu_check.txt"), "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
