"""``make vram``: peak memory of one DRaFT update on the full-size architectures, with no GPU.

Each configuration builds the full-size model in half precision under ``FakeTensorMode`` (nothing
is allocated or computed) and runs the project's own update -- ``DifferentiableSampler`` +
``DraftTrainer.step()``: 50 DDIM steps with CFG 7.5, decode, reward, backward into a rank-8 LoRA on
every attention projection, gradient clipping, AdamW -- while :class:`training.memory_trace.LiveBytes`
counts live tensor bytes. The models are diffusers' (``UNet2DConditionModel`` with the SD1.5,
SD2.1-768-v and SDXL configurations, the SD VAE decoder) and open_clip's CLIP ViT-L/14 under the
project's LAION aesthetic reward: ComfyUI is not needed (CI has none) and its attention selection
queries free memory, which fake tensors cannot answer. The checkpoint units are the same kind of
layer on both sides (each resnet, transformer and resampler inside the UNet's blocks; each resnet,
attention and upsampler of the VAE decoder).

What a user has on the GPU during an update, and what is counted:

* weights as ComfyUI loads them on a CUDA device: UNet in fp16/bf16 (2 bytes a parameter), VAE in
  bf16, the reward model (CLIP ViT-L/14 vision tower + head) in bf16; the text encoder is not
  counted (ComfyUI offloads it to make room once the prompts are encoded);
* LoRA factors (float32) with their gradients and AdamW's two moments;
* activations: the counter's peak during the update.
* ``lowvram``: ComfyUI's partial loading streams the UNet's Linear/Conv weights from system RAM,
  one layer at a time; here every such weight is copied on use (the copy is what the GPU holds),
  and the resident UNet weights are only the norms and biases.

Modes: ``fast`` is the way the trainer's ``auto`` takes when it fits (per-step checkpointing, every
row at once, the decoder not checkpointed); ``before`` is the fast way as it was until 2026-12-06,
with the whole decode checkpointed too (kept to show that this never lowered the peak: the
trainer no longer does it); ``lean`` adds block checkpointing and one row at a time;
``lean_decoder`` checkpoints only the decoder's blocks, selectively (their convolution outputs
kept; rows one at a time: the trainer's middle way); ``lean_cond`` also runs CFG's unconditional
branch without gradient.

    .venv/bin/python -m tools.measure.memory.vram            # every row (minutes on 2 cores)
    .venv/bin/python -m tools.measure.memory.vram --only sd15_512 --steps 4 --batches 1  # a smoke run
    .venv/bin/python -m tools.measure.memory.vram --validate # counter on real vs fake tensors (small)

(from the repository root). The DiT rows are in :mod:`.vram_dit`; what both share (the traced
update, the reward model, the memory modes) in :mod:`tools.measure.setup`.

Last line: one JSON object (``sd15_512_lv2_gib`` ... ``sdxl_1024_k1_lowvram_gib`` and every row).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tools.measure.memory.vram_dit import DIT_MODELS, measure_dit
from tools.measure.setup import (GIB, METHODS, REPO, attention_projections, build_aesthetic_reward,
                                 sd_schedule, trace_update, update_sampler, update_trainer,
                                 vae_decoder, worker_command)

MODELS = {  # name: resolution (px)
    "sd15_512": 512, "sd21v_768": 768, "sdxl_1024": 1024,
}
DIT_ROWS = [("flux_dev_1024", "k1"), ("sd35m_1024", "lv2"), ("wan21_1_3b_480p", "k1"),
            ("wan21_1_3b_480p", "lv2"), ("lumina2_1024", "lv2"), ("hunyuanimage21_2048", "k1"),
            ("wan22_5b_720p", "k1"), ("wan22_14b_480p", "k1")]
TARGETS = {  # key: (limit GiB or ratio, what)
    "flux_dev_1024_k1_gib": (22.0, "FLUX.1-dev 1024 px fp8 base weights DRaFT-1, batch 1"),
    "sd35m_1024_lv2_gib": (12.0, "SD3.5-medium 1024 px DRaFT-LV n=2, batch 1"),
    "wan21_1_3b_480p_k1_gib": (12.0, "Wan 2.1 T2V 1.3B 480x832 33 frames (3 latent frames decoded) DRaFT-1, batch 1"),
    "wan21_1_3b_480p_lv2_gib": (14.0, "Wan 2.1 T2V 1.3B 480x832 33 frames (3 latent frames decoded) DRaFT-LV n=2, batch 1"),
    "wan22_5b_720p_k1_gib": (24.0, "Wan 2.2 TI2V-5B 704x1280 33 frames (3 latent frames decoded) DRaFT-1, batch 1"),
    "wan22_14b_480p_k1_gib": (32.0, "Wan 2.2 A14B low-noise expert 480x832 33 frames (3 latent frames decoded) fp8 base weights DRaFT-1, batch 1"),
    "lumina2_1024_lv2_gib": (12.0, "Lumina 2 1024 px DRaFT-LV n=2, batch 1"),
    "hunyuanimage21_2048_k1_gib": (40.0, "HunyuanImage 2.1 2048 px fp8 base weights DRaFT-1, batch 1"),
    "sd15_512_lv2_gib": (4.0, "SD1.5 512 px DRaFT-LV n=2, batch 1"),
    "sdxl_1024_k1_gib": (12.0, "SDXL 1024 px DRaFT-1, batch 1"),
    "sdxl_1024_lv2_gib": (12.0, "SDXL 1024 px DRaFT-LV n=2, batch 1"),
    "sdxl_1024_k1_lowvram_gib": (8.0, "SDXL 1024 px DRaFT-1 with lowvram, batch 1"),
    "sd15_512_full_over_k1": (1.1, "SD1.5 512 px full DRaFT / DRaFT-1"),
}


# ---------------------------------------------------------------------------------------------
# the full-size models (diffusers / open_clip configurations)
# ---------------------------------------------------------------------------------------------
def build_unet(model: str, latent: int):
    from diffusers import UNet2DConditionModel
    if model == "sd15_512":
        return UNet2DConditionModel(sample_size=latent, cross_attention_dim=768)
    if model == "sd21v_768":
        return UNet2DConditionModel(sample_size=latent, cross_attention_dim=1024,
                                    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    if model == "sdxl_1024":
        return UNet2DConditionModel(
            sample_size=latent, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    raise ValueError(model)


def stream_weights(unet) -> None:
    """lowvram: every Linear/Conv weight of ``unet`` is copied on use (the GPU's transient copy)."""
    import torch
    from torch.nn.utils import parametrize

    class Copy(torch.nn.Module):
        def forward(self, w):
            return w.clone()
    for module in unet.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            if parametrize.is_parametrized(module, "weight"):
                continue  # a LoRA'd layer already builds a new weight per use
            parametrize.register_parametrization(module, "weight", Copy(), unsafe=True)


# ---------------------------------------------------------------------------------------------
# one configuration
# ---------------------------------------------------------------------------------------------
def measure(model: str, method: str, batch: int, mode: str, lowvram: bool, steps: int,
            resolution: int, fake: bool = True, tiny: bool = False, dtype=None) -> dict:
    """Peak bytes of one update; see the module docstring. ``tiny``: a small model (validation);
    ``dtype``: of the models (default bfloat16)."""
    import contextlib
    import torch
    from torch import nn
    from training import wrap_module
    from training.checkpointing import diffusers_unet_units
    from training.memory_trace import fake_mode

    torch.set_default_dtype(dtype or torch.bfloat16)
    ctx = fake_mode() if fake else contextlib.nullcontext()
    # The schedule is real data (the sampler reads its values); SD's scaled-linear betas, ddim_uniform.
    log_sigmas, sigmas = sd_schedule(steps)
    sampler = update_sampler(method, sigmas)  # built on real sigmas, outside ctx
    started = time.perf_counter()
    with ctx:
        latent = resolution // 8
        if tiny:
            from diffusers import UNet2DConditionModel
            unet = UNet2DConditionModel(
                sample_size=latent, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=2, norm_num_groups=16)
            from diffusers import AutoencoderKL
            vae = AutoencoderKL(latent_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
            del vae.encoder, vae.quant_conv
            from reward_models.image_stats import ImageStatReward
            reward = ImageStatReward("saturation")
        else:
            unet = build_unet(model, latent)
            vae = vae_decoder()
            reward = build_aesthetic_reward()
        for m in (unet, vae, reward):
            m.eval().requires_grad_(False)
        lora = wrap_module(unet, attention_projections(unet), rank=8, alpha=8.0, seed=0)
        if lowvram:
            stream_weights(unet)
        sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        ctx_dim = unet.config.cross_attention_dim
        cfg, cond_only = 7.5, mode == "lean_cond"
        context = torch.randn(4, 77, ctx_dim)
        uncond = torch.randn(1, 77, ctx_dim)
        pooled = torch.randn(4, 1280) if sdxl else None

        def eps(x_in, t, ctx_rows, pooled_rows):
            kw = {}
            if sdxl:
                kw["added_cond_kwargs"] = {"text_embeds": pooled_rows,
                                           "time_ids": torch.zeros(x_in.shape[0], 6)}
            return unet(x_in, t, encoder_hidden_states=ctx_rows, return_dict=False, **kw)[0]

        class Denoiser(nn.Module):
            """CFG on an EPS model in sigma space; both branches in one batch (as ComfyUI batches
            them when memory allows), or the unconditional one without gradient."""

            def forward(self, x, sigma, index):
                s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
                x_in = x / torch.sqrt(1.0 + s ** 2)
                t = (sigma.float().log()[None, :] - log_sigmas[:, None]).abs().argmin(dim=0)
                b = x.shape[0]
                c, u = context[index], uncond.expand(b, -1, -1)
                pc = pooled[index] if sdxl else None
                pu = torch.zeros_like(pc) if sdxl else None
                if cond_only and torch.is_grad_enabled():
                    e_c = eps(x_in, t, c, pc)
                    with torch.no_grad():
                        e_u = eps(x_in, t, u, pu)
                else:
                    e_u, e_c = eps(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([u, c]),
                                   torch.cat([pu, pc]) if sdxl else None).chunk(2)
                return x - s * (e_u + cfg * (e_c - e_u)).to(x.dtype)

        trainer = update_trainer(sampler, Denoiser(), vae, 0.18215, None, reward, lora,
                                 (4, latent, latent), batch, mode, diffusers_unet_units(unet))
        streamed = set()
        if lowvram:  # the base weights of parametrized layers stay in system RAM
            from torch.nn.utils import parametrize
            streamed = {id(m.parametrizations.weight.original) for m in unet.modules()
                        if parametrize.is_parametrized(m, "weight")}
    row = dict(model=model, method=method, batch=batch, mode=mode, lowvram=lowvram, steps=steps,
               resolution=resolution)
    return trace_update(trainer, row, unet, vae, reward, lora, started, streamed)


# ---------------------------------------------------------------------------------------------
# driver: every configuration in its own process (clean counters), two at a time
# ---------------------------------------------------------------------------------------------
def rows_to_run(args) -> list:
    """The configurations. DRaFT-1 and DRaFT-LV run a schedule of ``--steps`` (2): every step of
    the no-grad prefix has the same peak, so one of them and the differentiated step give the
    peak of the 50-step update (checked: ``--check-steps``). Full DRaFT runs all ``--full-steps``
    (50) differentiated, at batch 1 (its memory is flat in K; batch 4 is 4 x the time)."""
    rows = []
    models = args.only or list(MODELS) + list(DIT_MODELS)
    for model, method in DIT_ROWS:  # vram_dit.py: batch 1
        if model in models:
            for mode in [m for m in args.modes if m != "lean_cond"]:  # (cond-only: UNets only)
                rows.append(dict(model=model, method=method, batch=1, mode=mode, lowvram=False,
                                 steps=args.steps))
    models = [m for m in models if m in MODELS]
    for model in models:
        for method in args.methods:
            batches = [b for b in args.batches if method != "full" or b == 1 or args.full_batches]
            for batch in batches:
                for mode in args.modes:
                    steps = args.full_steps if method == "full" else args.steps
                    rows.append(dict(model=model, method=method, batch=batch, mode=mode,
                                     lowvram=False, steps=steps))
        if model == "sdxl_1024" and "k1" in args.methods:
            for mode in args.modes:  # ComfyUI's lowvram partial loading, in each mode
                rows.append(dict(model=model, method="k1", batch=1, mode=mode, lowvram=True,
                                 steps=args.steps))
    # The rows behind the targets first, the long full-DRaFT rows last (an interrupted run that
    # is resumed with --reuse has the figures that matter most).
    def priority(r):
        return (r["method"] == "full", r["batch"] != 1, r["mode"] != "lean",
                r["model"] == "sd21v_768")
    return sorted(rows, key=priority)


CACHE = os.path.join(REPO, ".cache", "vram")


def _cache_name(row: dict, resolution: int) -> str:
    return (f"{row['model']}_{row['method']}_b{row['batch']}_{row['mode']}_"
            f"{'lowvram' if row['lowvram'] else 'full'}_s{row.get('steps')}_{resolution}.json")


def resolution_of(model: str) -> int:
    return MODELS.get(model) or DIT_MODELS[model]


def run_row(row: dict, args) -> dict:
    """One configuration in a fresh process; reuses the result cached under .cache/vram when
    ``--reuse`` (rows take minutes each: an interrupted table resumes where it stopped)."""
    res = args.resolution or resolution_of(row["model"])
    cached = os.path.join(CACHE, _cache_name(row, res))
    if args.reuse and os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    cmd = worker_command(__spec__.name, "--one", json.dumps(row))
    if args.resolution:
        cmd += ["--resolution", str(args.resolution)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"row {row} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def key_of(r: dict) -> str:
    key = f"{r['model']}_{r['method']}"
    if r["batch"] != 1:
        key += f"_b{r['batch']}"
    if r["lowvram"]:
        key += "_lowvram"
    if r["mode"] != "lean":
        key += f"_{r['mode']}"
    return key + "_gib"


def summarise(results: list) -> dict:
    summary = {key_of(r): round(r["total_gib"], 3) for r in results}
    k1, full = summary.get("sd15_512_k1_gib"), summary.get("sd15_512_full_gib")
    if k1 and full:
        summary["sd15_512_full_over_k1"] = round(full / k1, 3)
    checks = {}
    for key, (limit, what) in TARGETS.items():
        if key in summary:
            checks[key] = {"value": summary[key], "limit": limit, "met": summary[key] <= limit,
                           "what": what}
    summary["targets"] = checks
    return summary


def print_table(results: list) -> None:
    head = (f"{'model':10} {'method':6} {'batch':>5} {'mode':10} {'lowvram':>7} {'weights':>8} "
            f"{'update':>8} {'total':>8} {'secs':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        weights = r["total_gib"] - r["peak_update_gib"]
        print(f"{r['model']:10} {r['method']:6} {r['batch']:>5} {r['mode']:10} {str(r['lowvram']):>7} "
              f"{weights:8.2f} {r['peak_update_gib']:8.2f} {r['total_gib']:8.2f} {r['seconds']:6.0f}")
    print("(GiB; weights = UNet + VAE + reward model + LoRA with AdamW state; update = peak of live "
          "tensors one update adds)")


def print_markdown(results: list) -> None:
    """The README's table: per configuration, the total before lean memory and with each lean way."""
    by = {}
    for r in results:
        by.setdefault((r["model"], r["method"], r["batch"], r["lowvram"]), {})[r["mode"]] = r
    names = {"lv2": "DRaFT-LV n=2", "k1": "DRaFT-1", "full": "full DRaFT (K=50)"}
    titles = {"fast": "fast (auto when it fits)", "before": "fast, whole decode checkpointed",
              "lean_decoder": "decoder blocks only", "lean": "lean",
              "lean_cond": "lean, CFG cond. only"}
    modes = [m for m in titles if any(m in v for v in by.values())]
    print()
    print("| model | update | batch | weights (GiB) | "
          + " | ".join(f"{titles[m]}: update / total (GiB)" for m in modes) + " |")
    print("|---|---|---|---|" + "---|" * len(modes))
    for (model, method, batch, lowvram), row_modes in sorted(by.items()):
        any_row = next(iter(row_modes.values()))
        weights = any_row["total_gib"] - any_row["peak_update_gib"]
        cells = []
        for mode in modes:
            r = row_modes.get(mode)
            cells.append("–" if r is None else f"{r['peak_update_gib']:.2f} / **{r['total_gib']:.2f}**")
        label = f"{model}{' lowvram' if lowvram else ''}"
        print(f"| {label} | {names[method]} | {batch} | {weights:.2f} | {' | '.join(cells)} |")


def validate(steps: int = 3) -> dict:
    """The counter on real CPU tensors against the same update on fake tensors (a small UNet and
    VAE, float32, DRaFT-K with K = 1, both memory modes): relative difference of the peaks."""
    import torch
    out = {}
    for mode in ("fast", "lean"):
        real = measure("tiny", "k1", 1, mode, False, steps, 64, fake=False, tiny=True,
                       dtype=torch.float32)
        fake = measure("tiny", "k1", 1, mode, False, steps, 64, fake=True, tiny=True,
                       dtype=torch.float32)
        r, f = real["peak_update_gib"] * GIB, fake["peak_update_gib"] * GIB
        out[mode] = {"real_bytes": int(r), "fake_bytes": int(f), "relative_difference": abs(f / r - 1)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(MODELS) + list(DIT_MODELS),
                        help="models (default: all)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 4])
    parser.add_argument("--modes", nargs="*", default=["fast", "lean"],
                        choices=["fast", "before", "lean", "lean_decoder", "lean_cond"])
    parser.add_argument("--steps", type=int, default=2,
                        help="schedule length for DRaFT-1 / DRaFT-LV rows (see rows_to_run)")
    parser.add_argument("--full-steps", type=int, default=50, help="full DRaFT's steps (paper: 50)")
    parser.add_argument("--full-batches", action="store_true", help="full DRaFT at batch 4 too")
    parser.add_argument("--resolution", type=int, default=0, help="override every model's")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cached-only", action="store_true",
                        help="measure nothing: report the rows found in .cache/vram (and list the rest)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse rows measured before (.cache/vram) instead of measuring again")
    parser.add_argument("--validate", action="store_true", help="check the counter (real vs fake)")
    parser.add_argument("--json-out", default="",
                        help="also write the JSON object to this file (the README's figures: "
                             "docs/vram_figures.json, read by the trainer's estimate test)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        row = json.loads(args.one)
        if row["model"] in DIT_MODELS:
            res = args.resolution or DIT_MODELS[row["model"]]
            result = measure_dit(row["model"], row["method"], row["batch"],
                                 row.get("steps", args.steps), res, row["mode"])
        else:
            res = args.resolution or MODELS[row["model"]]
            result = measure(row["model"], row["method"], row["batch"], row["mode"],
                             row["lowvram"], row.get("steps", args.steps), res)
        os.makedirs(CACHE, exist_ok=True)
        with open(os.path.join(CACHE, _cache_name(row, res)), "w") as f:
            json.dump(result, f)
        print(json.dumps(result))
        return 0
    if args.validate:
        result = validate()
        print(json.dumps(result))
        return 0 if all(v["relative_difference"] <= 0.02 for v in result.values()) else 1

    rows = rows_to_run(args)
    if args.cached_only:
        results, missing = [], []
        for row in rows:
            path = os.path.join(CACHE, _cache_name(row, args.resolution or resolution_of(row["model"])))
            if os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
            else:
                missing.append(key_of(row))
        print(f"make vram (cached rows only): {len(results)} measured, not measured: "
              f"{', '.join(missing) or 'none'}")
    else:
        print(f"make vram: {len(rows)} configurations on fake tensors, {args.jobs} at a time",
              flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda r: run_row(r, args), rows))
    print_table(results)
    print_markdown(results)
    summary = summarise(results)
    for key, check in summary["targets"].items():
        print(f"target {key}: {check['value']} (limit {check['limit']}) "
              f"{'met' if check['met'] else 'MISSED'} -- {check['what']}")
    summary["rows"] = results
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
