"""The effect of DRaFT Memory Options' "conditional only" CFG gradient, measured side by side.

On bench's reduced-width SD UNet (random weights, 128 px, 20 DDIM steps, CFG 7.5, rank-8 LoRA on
the attention projections, the small decoder and the colour reward), DRaFT-1 with the exact
gradient through both CFG branches against the conditional branch only (the unconditional
prediction without gradient): peak memory of one update (live tensor bytes), time of an update
(interleaved rounds, median ratio) and the reward on 8 held-out seeds every 5 updates over 30
updates from the same initial LoRA and the same prompt/noise draws.

    .venv/bin/python -m tools.measure.speed.cfg_gradient_study   # last line: one JSON object

(from the repository root; the models are :class:`tools.measure.setup.Setup`'s, as bench's).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

from tools.measure.setup import Setup


def build(cond_only: bool, steps: int, resolution: int):
    import torch
    from training.sampler import DifferentiableSampler, SamplerSettings
    from training.toy_models import colour_reward
    from training.trainer import DraftTrainer, TrainSettings
    args = SimpleNamespace(model="small", decoder="small", resolution=resolution, rank=8,
                           steps=steps, cfg=7.5, cond_only=cond_only)
    setup = Setup(args, torch.device("cpu"))
    sampler = DifferentiableSampler(setup.denoise, setup.sigmas, SamplerSettings("draft_k", k=1))
    trainer = DraftTrainer(sampler, setup.decoder, colour_reward, setup.prompts, setup.lora,
                           setup.latent_shape, TrainSettings(batch_size=2, learning_rate=2e-3, seed=0))
    return trainer


def main() -> int:
    import torch
    from training.memory_trace import LiveBytes
    torch.set_num_threads(os.cpu_count() or 1)
    steps, resolution, updates, every = 20, 128, 30, 5
    held_out = list(range(500, 508))
    trainers = {"both branches": build(False, steps, resolution),
                "conditional only": build(True, steps, resolution)}
    out = {"settings": {"steps": steps, "resolution": resolution, "updates": updates,
                        "cfg": 7.5, "batch": 2, "lr": 2e-3}}
    curves = {name: [] for name in trainers}
    times = {name: [] for name in trainers}
    peaks = {}
    for name, trainer in trainers.items():
        curves[name].append(float(trainer.evaluate(held_out).mean()))
    for i in range(1, updates + 1):
        for name, trainer in trainers.items():  # interleaved: the same machine state for both
            if i == 2:
                counter = LiveBytes()
                with counter:
                    trainer.step()
                peaks[name] = counter.peak
                continue
            start = time.perf_counter()
            trainer.step()
            times[name].append(time.perf_counter() - start)
        if i % every == 0:
            for name, trainer in trainers.items():
                curves[name].append(float(trainer.evaluate(held_out).mean()))
    ratio = statistics.median(c / b for c, b in zip(times["conditional only"], times["both branches"]))
    out.update({
        "peak_update_mib": {k: round(v / 2**20, 2) for k, v in peaks.items()},
        "memory_cond_only_over_both": round(peaks["conditional only"] / peaks["both branches"], 3),
        "time_cond_only_over_both": round(ratio, 3),
        "held_out_reward_every_5_updates": {k: [round(v, 4) for v in c] for k, c in curves.items()},
    })
    for name, c in curves.items():
        print(f"{name:17s} reward on held-out seeds: " + " ".join(f"{v:.4f}" for v in c))
    print(f"peak update memory: {out['peak_update_mib']}, conditional/both "
          f"{out['memory_cond_only_over_both']}; time conditional/both {out['time_cond_only_over_both']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
