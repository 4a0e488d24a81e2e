"""Side-by-side with the peers, for ``make bench``: our update against Hugging Face TRL's AlignProp
update, and our no-grad sampling against ComfyUI's own KSampler.

* **TRL** (``trl==0.23.1``, ``trl.models.modeling_sd_base.pipeline_step_with_grad`` plus its
  backward, gradient clipping and AdamW, as TRL's AlignProp trainer runs it): the same diffusers UNet
  (bench's reduced-width SD block structure), the SD VAE decoder architecture, the same rank-8 LoRA
  on every attention projection (``training.lora.wrap_module``, so the LoRA code is identical), 50
  DDIM steps, CFG 7.5, batch 1, a colour reward; DRaFT-1 (TRL: ``truncated_backprop_timestep=49``)
  and full backpropagation (TRL: ``truncated_backprop=False``), each with TRL's per-step gradient
  checkpointing. Ours runs ``DraftTrainer.step()`` in the way the trainer's ``auto`` takes on a
  device with room (``auto_*``: every row at once, no block checkpointing, per-step checkpointing
  whose forward builds no graph, the decoder not checkpointed), decoding in the trainer's layout
  for the CPU (channels-last) and in TRL's NCHW (``*_nchw``: the layout on a GPU); also in the
  middle way (``time_vs_trl_*``, ``mem_vs_trl_*``: rows one at a time, the decoder's blocks
  checkpointed selectively, what ``auto`` takes first when the fast way does not fit) and the
  memory of the leanest (``mem_vs_trl_*_leanest``: every block recomputed); the decoder's forward
  plus backward alone in both layouts (``decode_channels_last_vs_nchw``). The ways are built from
  ``training.memory_plan``'s plans as the trainer node builds them. Memory: peak live tensor bytes
  one update adds (``training.memory_trace.LiveBytes``), each update in a fresh process; time:
  ``--reps`` interleaved rounds in one process, median of the per-round ratios (every round in the
  JSON).
* **KSampler**: through ComfyUI in-process on the tiny generated SD1.5 checkpoint, the trainer's
  no-grad sampling (``DifferentiableSampler.sample`` driven by ComfyUI's CFGGuider, as the trainer's
  previews and rollouts are) against ``comfy.sample.sample`` with sampler ``ddim``, scheduler
  ``ddim_uniform``, the same steps, cfg and latent; needs ``COMFYUI_PATH``.

    .venv/bin/python -m tools.measure.speed.peers    # prints a JSON object as its last line

(from the repository root; ``make bench`` runs it at the end, :mod:`.bench`). The models are
:class:`tools.measure.setup.Setup`'s, as bench's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

from tools.measure.setup import REPO, Setup, last_json_line, way_kwargs, worker_command

# The way auto takes on a roomy device against TRL (time in both layouts), and the middle way.
TRL_TARGETS = {"auto_time_vs_trl_k1": 0.95, "auto_time_vs_trl_full": 0.95,
               "auto_time_vs_trl_k1_nchw": 0.95, "auto_time_vs_trl_full_nchw": 0.95,
               "auto_mem_vs_trl_k1": 1.0, "auto_mem_vs_trl_full": 1.0,
               "mem_vs_trl_k1": 0.6, "mem_vs_trl_full": 0.6, "time_vs_trl_k1": 1.0,
               "time_vs_trl_full": 1.0}
KSAMPLER_TARGET = 1.05


# ---------------------------------------------------------------------------------------------
# TRL AlignProp vs ours
# ---------------------------------------------------------------------------------------------
def _setup(args):
    import torch
    torch.set_num_threads(args.threads)
    bench_args = SimpleNamespace(model="small", decoder="vae", resolution=args.resolution,
                                 rank=8, steps=args.steps, cfg=7.5)
    return Setup(bench_args, torch.device("cpu"))


def _trl_update(setup, k1: bool, args):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from trl.models.modeling_sd_base import pipeline_step_with_grad
    from training.toy_models import colour_reward

    vae = setup.decoder.vae
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=setup.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    params = setup.lora.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=4e-4, betas=(0.9, 0.999), weight_decay=0.1)
    g = torch.Generator().manual_seed(1234)
    latents = torch.randn((1,) + setup.latent_shape, generator=g)
    ctx, uncond = setup.context[:1], setup.uncond

    def step():
        out = pipeline_step_with_grad(
            pipe, prompt_embeds=ctx, negative_prompt_embeds=uncond, num_inference_steps=args.steps,
            guidance_scale=7.5, truncated_backprop=k1, truncated_backprop_rand=False,
            truncated_backprop_timestep=args.steps - 1, gradient_checkpoint=True, eta=0.0,
            latents=latents.clone(), output_type="pt")
        loss = -colour_reward(out.images).float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _our_trainer(setup, k1: bool, way: str = "decoder", nchw: bool = False):
    """Our trainer in ``way`` (``auto`` on a roomy device, or a key of
    :data:`tools.measure.setup.WAYS`: ``decoder`` is the middle way, ``all`` the leanest), built
    from the plan as the trainer node builds it (:func:`tools.measure.setup.way_kwargs`). The
    decode in the trainer's layout for the device (channels-last on the CPU), or with ``nchw`` in
    TRL's (NCHW, the layout on a GPU)."""
    from training.checkpointing import diffusers_decoder_units, diffusers_unet_units
    from training.sampler import DifferentiableSampler, SamplerSettings
    from training.toy_models import colour_reward
    from training.trainer import DraftTrainer, TrainSettings
    settings = SamplerSettings(method="draft_k" if k1 else "draft", k=1)
    sampler = DifferentiableSampler(setup.denoise, setup.sigmas, settings)
    memory = way_kwargs(way, diffusers_unet_units(setup.unet),
                        diffusers_decoder_units(setup.decoder.vae.decoder))
    return DraftTrainer(sampler, setup.decoder, colour_reward, setup.prompts, setup.lora,
                        setup.latent_shape, TrainSettings(batch_size=1),
                        channels_last_decode=False if nchw else None, **memory)


def _our_update(setup, k1: bool, args, way: str = "decoder", nchw: bool = False):
    """One update of :func:`_our_trainer`'s trainer."""
    trainer = _our_trainer(setup, k1, way, nchw)

    def step():
        report = trainer.step()
        if report.skipped:
            raise RuntimeError(report.skip_reason)
    return step


def _updates(setup, args, memory: bool = False) -> dict:
    """The updates timed side by side: TRL's, ours in ``auto``'s way on a roomy device (in the
    CPU's channels-last and in NCHW, the layout on a GPU) and in the middle way; with ``memory``
    also the leanest, whose memory alone is reported."""
    updates = {}
    for which, k1 in (("k1", True), ("full", False)):
        updates[f"trl_{which}"] = _trl_update(setup, k1, args)
        updates[f"auto_{which}"] = _our_update(setup, k1, args, way="auto")
        updates[f"auto_nchw_{which}"] = _our_update(setup, k1, args, way="auto", nchw=True)
        updates[f"ours_{which}"] = _our_update(setup, k1, args)
        if memory:
            updates[f"ours_lean_{which}"] = _our_update(setup, k1, args, way="all")
    return updates


def trl_memory_worker(args, name: str) -> dict:
    from training.memory_trace import LiveBytes
    setup = _setup(args)
    step = _updates(setup, args, memory=True)[name]
    step()  # the first update allocates AdamW's state
    counter = LiveBytes()
    with counter:
        step()
    return {"peak_bytes": counter.peak}


def trl_time_worker(args) -> dict:
    setup = _setup(args)
    steps = _updates(setup, args)
    for fn in steps.values():
        fn()
    times = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {"times_s": times}


def layout_time_worker(args) -> dict:
    """The SD VAE decoder's forward plus backward (into the latent, weights frozen) with NCHW and
    with channels-last latents, rounds interleaved (the order alternating): what the trainer's
    CPU layout alone is worth (``DraftTrainer.decode_images`` of our trainer, with and without
    TRL's NCHW decode)."""
    import torch
    setup = _setup(args)
    for p in setup.decoder.parameters():
        p.requires_grad_(False)
    trainers = {name: _our_trainer(setup, True, "auto", nchw=name == "nchw")
                for name in ("nchw", "channels_last")}
    z = torch.randn((1,) + setup.latent_shape, generator=torch.Generator().manual_seed(3))

    def run(name: str):
        x = z.clone().requires_grad_(True)
        trainers[name].decode_images(x).mean().backward()

    run("nchw"), run("channels_last")
    times = {"nchw": [], "channels_last": []}
    for r in range(args.reps * 2):
        for name in (("nchw", "channels_last") if r % 2 == 0 else ("channels_last", "nchw")):
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
    return {"times_s": times}


# ---------------------------------------------------------------------------------------------
# ComfyUI KSampler vs our no-grad sampling
# ---------------------------------------------------------------------------------------------
def ksampler_worker(args) -> dict:
    import torch
    comfy_path = os.environ.get("COMFYUI_PATH")
    sys.path.insert(0, comfy_path)
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = True
    comfy_args.use_pytorch_cross_attention = True
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from comfy_server import tiny_checkpoint
    from training.sampler import DifferentiableSampler, SamplerSettings

    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            tiny_checkpoint(comfy_path), output_vae=True, output_clip=True)
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    side = args.ksampler_resolution // 8
    latent = torch.zeros(1, 4, side, side)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    steps, cfg = args.steps, 7.5

    def ksampler():
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, steps, cfg, "ddim", "ddim_uniform", pos, neg,
                                       latent, denoise=1.0, disable_pbar=True, seed=7)

    class OursSampler(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
                   denoise_mask=None, disable_pbar=False):
            ms = model_wrap.inner_model.model_sampling
            max_denoise = self.max_denoise(model_wrap, sigmas)
            sampler = DifferentiableSampler(
                lambda x, s, i: model_wrap(x, s, **extra_args), sigmas.float().cpu(),
                SamplerSettings(method="draft_k", k=1),
                renoise=lambda s, n, x0: ms.noise_scaling(s, n, x0),
                initial_latent_fn=lambda n: ms.noise_scaling(sigmas[0].to(n), n, torch.zeros_like(n),
                                                             max_denoise))
            return sampler.sample(noise, torch.zeros(noise.shape[0], dtype=torch.long))

    def ours():
        with torch.inference_mode():
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(pos, neg)
            guider.set_cfg(cfg)
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"),
                                                     "ddim_uniform", steps)
            return guider.sample(noise, latent, OursSampler(), sigmas, seed=7, disable_pbar=True)

    a, b = ksampler(), ours()
    max_diff = float((a - b).abs().max())
    times = {"ksampler": [], "ours": []}
    for _ in range(args.reps):
        for name, fn in (("ksampler", ksampler), ("ours", ours)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {"times_s": times, "max_abs_difference": max_diff}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _run(args, flag: str, payload: str = "") -> dict:
    cmd = worker_command(__spec__.name, flag, *([payload] if payload else []))
    cmd += ["--steps", str(args.steps), "--resolution", str(args.resolution), "--reps",
            str(args.ksampler_reps if flag == "--ksampler" else args.reps), "--threads",
            str(args.threads), "--ksampler-resolution", str(args.ksampler_resolution)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    line = last_json_line(proc.stdout)
    if proc.returncode != 0 or line is None:
        return {"error": (proc.stderr or proc.stdout).strip()[-600:]}
    return json.loads(line)


def _ratios(times: dict, a: str, b: str) -> list:
    """Each interleaved round's time of ``a`` over ``b``."""
    return [x / y for x, y in zip(times[a], times[b])]


def _median_ratio(times: dict, a: str, b: str) -> float:
    return round(statistics.median(_ratios(times, a, b)), 3)


def trl_figures(mem: dict, times: dict) -> dict:
    """The side-by-side figures from the memory workers' peaks (``mem[name]["peak_bytes"]``) and
    the interleaved rounds' seconds (``times[name]``), for DRaFT-1 (``k1``) and full
    backpropagation (``full``):

    * ``auto_time_vs_trl_*`` / ``auto_mem_vs_trl_*``: the way ``auto`` takes on a roomy device,
      decoding in the CPU's channels-last; ``auto_time_vs_trl_*_nchw``: the same in NCHW (the
      layout on a GPU); every round's ratio in ``*_rounds``;
    * ``time_vs_trl_*`` / ``mem_vs_trl_*``: the middle way (rows one at a time, the decoder's
      blocks checkpointed selectively); ``mem_vs_trl_*_leanest``: every block recomputed.
    """
    out = {}
    for which in ("k1", "full"):
        trl = f"trl_{which}"
        for name, key in ((f"auto_{which}", f"auto_time_vs_trl_{which}"),
                          (f"auto_nchw_{which}", f"auto_time_vs_trl_{which}_nchw"),
                          (f"ours_{which}", f"time_vs_trl_{which}")):
            out[key] = _median_ratio(times, name, trl)
            out[f"{key}_rounds"] = [round(r, 3) for r in _ratios(times, name, trl)]
            out[f"{name}_time_s"] = round(statistics.median(times[name]), 3)
        out[f"{trl}_time_s"] = round(statistics.median(times[trl]), 3)
        peak = {name: mem[name]["peak_bytes"] for name in
                (trl, f"auto_{which}", f"ours_{which}", f"ours_lean_{which}")}
        out[f"auto_mem_vs_trl_{which}"] = round(peak[f"auto_{which}"] / peak[trl], 3)
        out[f"mem_vs_trl_{which}"] = round(peak[f"ours_{which}"] / peak[trl], 3)
        out[f"mem_vs_trl_{which}_leanest"] = round(peak[f"ours_lean_{which}"] / peak[trl], 3)
        for name, value in peak.items():
            out[f"{name}_peak_mib"] = round(value / 2**20, 1)
    return out


def compare(args) -> dict:
    out: dict = {}
    try:
        import trl  # noqa: F401
        have_trl = True
    except ImportError:
        have_trl = False
        out["trl_error"] = "trl==0.23.1 is not installed (make bench installs it)"
    if have_trl:
        mem = {name: _run(args, "--trl-memory", name) for name in
               ("trl_k1", "auto_k1", "ours_k1", "ours_lean_k1",
                "trl_full", "auto_full", "ours_full", "ours_lean_full")}
        timing = _run(args, "--trl-time")
        layout = _run(args, "--layout-time")
        errors = {k: v["error"] for k, v in {**mem, "time": timing, "layout": layout}.items()
                  if "error" in v}
        if errors:
            out["trl_error"] = errors
        else:
            out.update(trl_figures(mem, timing["times_s"]))
            out["decode_channels_last_vs_nchw"] = _median_ratio(layout["times_s"], "channels_last", "nchw")
    if os.environ.get("COMFYUI_PATH"):
        ks = _run(args, "--ksampler")
        if "error" in ks:
            out["ksampler_error"] = ks["error"]
        else:
            out["no_grad_sampling_vs_ksampler"] = _median_ratio(ks["times_s"], "ours", "ksampler")
            out["ksampler_time_s"] = round(statistics.median(ks["times_s"]["ksampler"]), 3)
            out["ours_sampling_time_s"] = round(statistics.median(ks["times_s"]["ours"]), 3)
            out["ksampler_max_abs_difference"] = ks["max_abs_difference"]
    else:
        out["ksampler_error"] = "COMFYUI_PATH not set: ComfyUI's KSampler not timed"
    targets = dict(TRL_TARGETS, no_grad_sampling_vs_ksampler=KSAMPLER_TARGET)
    out["peer_targets_met"] = {k: out[k] <= v for k, v in targets.items() if k in out}
    return out


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--ksampler-resolution", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5,
                        help="interleaved rounds of the TRL comparison (the median is judged)")
    parser.add_argument("--ksampler-reps", type=int, default=3,
                        help="interleaved rounds of the KSampler comparison")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--trl-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trl-time", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout-time", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ksampler", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.trl_memory:
        print(json.dumps(trl_memory_worker(args, args.trl_memory)))
    elif args.trl_time:
        print(json.dumps(trl_time_worker(args)))
    elif args.layout_time:
        print(json.dumps(layout_time_worker(args)))
    elif args.ksampler:
        print(json.dumps(ksampler_worker(args)))
    else:
        print(json.dumps(compare(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
