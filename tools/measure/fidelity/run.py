"""``make fidelity`` / ``python -m tools.measure.fidelity.run``: the whole pipeline, last line one JSON.

    python -m tools.measure.fidelity.run                 # full budget, writes docs/fidelity.md + PNGs
    python -m tools.measure.fidelity.run --tiny --out D  # CI smoke: seconds, everything under D

Models (denoiser, reward classifier, judge) are cached under ``--cache`` (default
``.cache/fidelity``), keyed by their training settings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict

import torch

from tools.measure.setup import REPO

from .data import splits, to_unit
from .doc import markdown
from training.heldout import HeldoutSettings

from .experiments import METHODS, Budget, Lab, replay_stop
from .metrics import grid_image, nn_distance
from .models import DigitClassifier, TinyUNet, accuracy, cached, train_classifier, train_denoiser
from .report import decide_claims, plots, summary, write_json

FULL = dict(budget=Budget(), denoiser_steps=1200, denoiser_batch=64, classifier_steps=600)
TINY = dict(budget=Budget(steps=3, updates=2, eval_every=1, eval_seeds=4, batch_size=2,
                          seeds=(0, 1), var_draws=3, norm_ks=(1, 3), norm_draws=2,
                          long_updates=4, long_eval_every=2, kl_coeffs=(0.0, 0.1, 1.0),
                          cond_chains=2, cond_draws=2),
            denoiser_steps=8, denoiser_batch=16, classifier_steps=10)


def log(msg: str) -> None:
    print(msg, flush=True)


def build_models(cfg: dict, cache: str, sp: dict) -> tuple:
    """(unet, reward classifier, judge, seconds spent training, whether all came from the cache)."""
    ds, db, cs = cfg["denoiser_steps"], cfg["denoiser_batch"], cfg["classifier_steps"]
    unet, t_unet, c1 = cached(
        os.path.join(cache, f"denoiser_w32_s{ds}_b{db}_seed0.pt"),
        lambda: train_denoiser(sp["denoiser"], ds, seed=0, batch=db, log=log), TinyUNet, log)
    reward_clf, t_rew, c2 = cached(
        os.path.join(cache, f"reward_clf_s{cs}_seed1.pt"),
        lambda: train_classifier(sp["reward"], cs, seed=1, log=log), DigitClassifier, log)
    judge, t_judge, c3 = cached(
        os.path.join(cache, f"judge_clf_s{cs}_seed2.pt"),
        lambda: train_classifier(sp["judge"], cs, seed=2, log=log), DigitClassifier, log)
    return unet, reward_clf, judge, {"denoiser": t_unet, "reward_clf": t_rew,
                                     "judge": t_judge}, c1 and c2 and c3


def replay_stops(results: dict) -> None:
    """Every run's ``stop_replay`` again with the current :class:`training.heldout.HeldoutCheck`
    rule (a pure function of the recorded evaluations: the runs ran with stop off)."""
    b = results["budget"]
    settings = HeldoutSettings(patience=b["heldout_patience"], tolerance=b["heldout_tolerance"])
    for rec in [r for rs in results["runs"].values() for r in rs] + list(results["hacking"].values()):
        rec["heldout"]["stop_replay"] = replay_stop(rec["heldout"]["evaluations"], settings)


def redoc(out: str) -> int:
    """Re-render the report and plots of a finished run (no training): the stop replays and the
    verdicts (pure functions of the recorded results) with the current code; prints the JSON
    line."""
    fig_dir = os.path.join(out, "fidelity")
    with open(os.path.join(fig_dir, "results.json")) as f:
        results = json.load(f)
    replay_stops(results)
    claims = results["claims"] = decide_claims(results)
    write_json(os.path.join(fig_dir, "results.json"), results)
    figures = plots(results, fig_dir)
    with open(os.path.join(out, "fidelity.md"), "w") as f:
        f.write(markdown(results, claims, figures, fig_dir))
    print(json.dumps(summary(results, claims)), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CI smoke budget (seconds)")
    p.add_argument("--cache", default=os.path.join(REPO, ".cache", "fidelity"))
    p.add_argument("--out", default=os.path.join(REPO, "docs"),
                   help="writes <out>/fidelity.md, <out>/fidelity/*.png, <out>/fidelity/results.json")
    p.add_argument("--target", type=int, default=3, help="the digit the reward asks for")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: these small ops gain little from 2, and lose a lot on a "
                        "shared machine)")
    p.add_argument("--redoc", action="store_true",
                   help="only re-render <out>/fidelity.md and the plots from the saved results.json")
    args = p.parse_args(argv)
    if args.redoc:
        return redoc(args.out)
    torch.set_num_threads(args.threads)
    cfg = TINY if args.tiny else FULL
    budget: Budget = cfg["budget"]
    fig_dir = os.path.join(args.out, "fidelity")
    os.makedirs(fig_dir, exist_ok=True)
    t0 = time.perf_counter()
    phases = {}

    def phase(name, start):
        phases[name] = round(time.perf_counter() - start, 1)
        log(f"[{name}: {phases[name]:.0f}s, total {time.perf_counter() - t0:.0f}s]")

    log("== data and models")
    t = time.perf_counter()
    sp = splits(seed=0)
    unet, reward_clf, judge, train_secs, from_cache = build_models(cfg, args.cache, sp)
    phase("models", t)
    acc = {"reward_clf_on_judge_split": accuracy(reward_clf, sp["judge"]),
           "judge_on_reward_split": accuracy(judge, sp["reward"]),
           "reward_clf_on_denoiser_split": accuracy(reward_clf, sp["denoiser"]),
           "judge_on_denoiser_split": accuracy(judge, sp["denoiser"])}
    log("  accuracies " + json.dumps({k: round(v, 4) for k, v in acc.items()}))
    reference = to_unit(sp["judge"].images)

    lab = Lab(unet, reward_clf, judge, reference, args.target, budget)
    base_images = lab.samples()
    grid_image(base_images).save(os.path.join(fig_dir, "samples_base.png"))
    grid_image(to_unit(sp["denoiser"].images[:64])).save(os.path.join(fig_dir, "real_digits.png"))
    with torch.no_grad():
        probs = torch.softmax(judge(base_images), 1)
    base = {"eval": lab.evaluate(),
            "judge_confidence": float(probs.max(1).values.mean()),
            "judge_class_histogram": torch.bincount(probs.argmax(1), minlength=10).tolist(),
            "real_nn_dist": float(nn_distance(to_unit(sp["reward"].images), reference).mean())}
    log(f"  base model: {base['eval']}  judge confidence {base['judge_confidence']:.3f}  "
        f"classes {base['judge_class_histogram']}  real digits' NN distance "
        f"{base['real_nn_dist']:.3f}")

    log(f"== method runs: {len(METHODS)} methods x {len(budget.seeds)} seeds x "
        f"{budget.updates} updates, T = {budget.steps}")
    t = time.perf_counter()
    runs = {m: [] for m in METHODS}
    for seed in budget.seeds:  # seeds outermost: a busy machine slows every method alike
        for m in METHODS:
            runs[m].append(lab.train_run(m, seed, budget.updates, budget.eval_every, log=log))
    phase("method_runs", t)
    after_rows = []
    for m in METHODS:
        lab.reset_lora(0)
        lab.load_lora_state(runs[m][0]["lora"])
        after_rows.append(lab.samples(16))
    lab.reset_lora(0)
    grid_image(torch.cat(after_rows), cols=16).save(os.path.join(fig_dir, "samples_methods.png"))
    lab.load_lora_state(runs["draft_lv2"][0]["lora"])
    grid_image(lab.samples()).save(os.path.join(fig_dir, "samples_after_lv2.png"))

    log("== gradient variance and norm at fixed parameters (the base model)")
    t = time.perf_counter()
    grad_variance = lab.gradient_variance(None, log=log)
    grad_norm = lab.grad_norm_by_k(None, log=log)
    phase("gradients", t)

    log("== DRaFT-LV's gradient variance given the chain (only the re-noising varied)")
    t = time.perf_counter()
    lv_cond = lab.lv_conditional_variance(log=log)
    phase("lv_conditional_variance", t)

    log(f"== LoRA strength sweep ({budget.strength_method}, seed 0)")
    t = time.perf_counter()
    sweep = lab.strength_sweep(runs[budget.strength_method][0]["lora"], log=log)
    strip = sweep.pop("_images")
    grid_image(torch.cat([strip[k] for k in strip]), cols=16).save(
        os.path.join(fig_dir, "samples_strengths.png"))
    phase("strength_sweep", t)

    log(f"== long runs and DRaFT+'s KL sweep (DRaFT-LV n=2, {budget.long_updates} updates), "
        f"KL {budget.kl_coeffs}")
    t = time.perf_counter()
    hacking, end_rows = {}, []
    for kl in budget.kl_coeffs:
        rec = lab.train_run("draft_lv2", 0, budget.long_updates, budget.long_eval_every,
                            kl_coeff=kl, log=log)
        end_rows.append(lab.samples(16))
        rec.pop("lora")
        rec.pop("kept_lora")
        hacking[f"{kl:g}"] = rec
    grid_image(torch.cat(end_rows), cols=16).save(os.path.join(fig_dir, "samples_long_runs.png"))
    phase("long_runs", t)

    for rs in runs.values():
        for r in rs:
            r.pop("lora")
            r.pop("kept_lora")
    results = {"reward_before": base["eval"]["reward"], "base": base, "accuracy": acc,
               "runs": runs, "grad_variance": grad_variance, "grad_norm_by_k": grad_norm,
               "strength_sweep": sweep, "hacking": hacking, "lv_conditional_variance": lv_cond,
               "target": args.target,
               "budget": asdict(budget), "config": {k: v for k, v in cfg.items() if k != "budget"},
               "train_seconds": train_secs, "models_from_cache": from_cache}
    claims = decide_claims(results)
    phases["total"] = round(time.perf_counter() - t0, 1)
    results.update(claims=claims, phases=phases, machine={
        "platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
        "load_average_at_end": list(os.getloadavg()), "torch": torch.__version__})
    write_json(os.path.join(fig_dir, "results.json"), results)
    figures = plots(results, fig_dir)
    with open(os.path.join(args.out, "fidelity.md"), "w") as f:
        f.write(markdown(results, claims, figures, fig_dir))
    for name, c in claims.items():
        log(f"  {name}: {c['verdict']} -- {c['numbers']}")
    log(f"[total {phases['total']:.0f}s]")
    print(json.dumps(summary(results, claims)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
