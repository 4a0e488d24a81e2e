"""The measurements, on the engine only: LoRA'd denoiser, ``DifferentiableSampler``,
``DraftTrainer``.

A :class:`Lab` holds the frozen base UNet with LoRA deltas attached once (``wrap_module``); every run
re-initialises the deltas from its seed (PEFT's init: ``down`` Kaiming-uniform, ``up`` zero, so
each run starts at the base model) and gets a fresh trainer, so all methods start from the same
point with the same seeds and budgets.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.heldout import HeldoutCheck, HeldoutSettings
from training.lora import LoRASet, wrap_module
from training.sampler import DifferentiableSampler, SamplerSettings
from training.trainer import DraftTrainer, TrainSettings, derived_generator

from .data import to_unit
from .metrics import ClassifierReward, judge_scores, nn_distance
from .models import SigmaDenoiser, ddim_sigmas, lora_targets, vp_initial_latent

LATENT = (1, 16, 16)
PROMPTS = ["a handwritten digit"]  # the model is unconditional; the trainer wants a prompt list

# method name -> SamplerSettings overrides (``k`` for draft is T, set in Lab.settings_for)
METHODS = {
    "draft_full": dict(method="draft"),
    "draft_k1": dict(method="draft_k", k=1),
    "draft_k5": dict(method="draft_k", k=5),
    "draft_k10": dict(method="draft_k", k=10),
    "draft_lv2": dict(method="draft_lv", lv_samples=2),
    "random_k": dict(method="random_k", k_min=1, k_max=10),
}


@dataclass
class Budget:
    """Sizes of every measurement (``full`` for ``make fidelity``, ``tiny`` for the CI smoke)."""

    steps: int = 15                 # DDIM sampling steps T
    updates: int = 60               # optimizer updates per method run
    eval_every: int = 10            # updates between held-out evaluations
    eval_seeds: int = 32            # held-out noise seeds per evaluation
    batch_size: int = 4             # samples per update (the paper's small setting)
    learning_rate: float = 4e-4       # the paper's small-run setting (TrainSettings default)
    rank: int = 4
    seeds: tuple = (0, 1, 2)
    var_draws: int = 24             # noise draws for the gradient variance
    var_batch: int = 1              # samples per gradient in the variance measurement
    norm_ks: tuple = (1, 2, 5, 10, 15)
    norm_draws: int = 6
    long_updates: int = 300         # the reward-hacking run, and DRaFT+'s KL sweep
    long_eval_every: int = 15
    kl_coeffs: tuple = (0.0, 0.01, 0.1, 1.0, 10.0)
    heldout_patience: int = 3       # the held-out check's stop rule (HeldoutSettings' defaults)
    heldout_tolerance: float = 0.0
    cond_chains: int = 8            # LV's variance given the chain: chains (noise draws) ...
    cond_draws: int = 6             # ... and re-noising draws per chain
    cond_ns: tuple = (1, 2, 4)      # LV copies n
    strengths: tuple = (0.0, 0.25, 0.5, 1.0, 1.5)
    strength_method: str = "draft_lv2"


def replay_stop(evaluations: list, settings: HeldoutSettings) -> dict:
    """What ``stop = "on"`` would have done to a run checked with ``settings`` (stop off): the
    real :meth:`HeldoutCheck.observe` fed the run's held-out ``evaluations`` in order.

    Returns ``{"stop_update": the update after whose evaluation the run would have ended (None:
    never), "kept_update": the best so far there (what keep = best returns), "saved_updates": the
    run's last evaluated update minus ``stop_update`` (0 when it never fires), "reason"}``."""
    n_judges = sum(1 for k in evaluations[0]["figures"] if k.startswith("judge"))
    check = HeldoutCheck(replace(settings, stop="on"),
                         [(f"judge{i + 1}", None) for i in range(n_judges)])
    last = int(evaluations[-1]["iteration"])
    for record in evaluations:
        outcome = check.observe(dict(record), [])
        if outcome.stop:
            it = int(record["iteration"])
            return {"stop_update": it, "kept_update": check.best_iteration(),
                    "saved_updates": last - it, "reason": outcome.reason}
    return {"stop_update": None, "kept_update": check.best_iteration(), "saved_updates": 0,
            "reason": ""}


class Lab:
    """Base model + LoRA + reward/judge/guard, and the runs on them.

    Args:
        unet: the trained EPS :class:`~.models.TinyUNet` (frozen; LoRA is attached here).
        reward_clf, judge_clf: classifiers on disjoint splits.
        reference: real digits (M,1,16,16) in [0,1] for the realism guard.
        target: the digit the reward asks for.
        budget: :class:`Budget`.
    """

    def __init__(self, unet, reward_clf, judge_clf, reference: torch.Tensor, target: int,
                 budget: Budget):
        self.budget = budget
        self.unet = unet.eval().requires_grad_(False)
        self.lora: LoRASet = wrap_module(self.unet, lora_targets(self.unet), rank=budget.rank,
                                         alpha=float(budget.rank), seed=0)
        self.denoise = SigmaDenoiser(self.unet)
        self.sigmas = ddim_sigmas(budget.steps)
        self.initial = vp_initial_latent(float(self.sigmas[0]))
        self.reward = ClassifierReward(reward_clf, target)
        self.judge = judge_clf
        self.reference = reference
        self.target = int(target)
        g = [derived_generator(10_000 + i, 0xE7A1) for i in range(budget.eval_seeds)]
        self.eval_noise = torch.cat([torch.randn((1,) + LATENT, generator=gi) for gi in g])
        self._base_eval = None

    # -- pieces ---------------------------------------------------------------------------------
    def reset_lora(self, seed: int) -> None:
        """PEFT's init from ``seed``: ``down`` Kaiming-uniform, ``up`` zero; strength 1, enabled."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, d in self.lora.items():
                nn.init.kaiming_uniform_(d.down, a=math.sqrt(5), generator=g)
                d.up.zero_()
                d.strength, d.enabled = 1.0, True

    def lora_state(self) -> list:
        return [p.detach().clone() for p in self.lora.trainable_parameters()]

    def load_lora_state(self, state: list) -> None:
        with torch.no_grad():
            for p, v in zip(self.lora.trainable_parameters(), state):
                p.copy_(v)

    def set_strength(self, strength: float) -> None:
        for _, d in self.lora.items():
            d.strength = float(strength)

    def reference_denoise(self, x, sigma, idx):
        """The base model (LoRA disabled): DRaFT+'s KL reference."""
        with self.lora.disabled():
            return self.denoise(x, sigma, idx)

    def settings_for(self, method: str) -> SamplerSettings:
        kw = dict(METHODS[method])
        T = self.budget.steps
        if kw["method"] == "draft":
            kw["k"] = T
        kw["k"] = min(kw.get("k", 1), T)  # the CI smoke's T is smaller than the K list
        kw["k_max"] = min(kw.get("k_max", 10), T)
        return SamplerSettings(**kw)

    def sampler(self, settings: SamplerSettings, kl: bool = False) -> DifferentiableSampler:
        return DifferentiableSampler(self.denoise, self.sigmas, settings,
                                     reference_denoise=self.reference_denoise if kl else None,
                                     initial_latent_fn=self.initial)

    def trainer(self, method: str, seed: int, updates: int, kl_coeff: float = 0.0) -> DraftTrainer:
        b = self.budget
        settings = TrainSettings(iterations=updates, batch_size=b.batch_size,
                                 learning_rate=b.learning_rate, kl_coeff=kl_coeff, seed=seed)
        return DraftTrainer(sampler=self.sampler(self.settings_for(method), kl=kl_coeff > 0),
                            decode=to_unit, reward=self.reward, prompts=PROMPTS, lora=self.lora,
                            latent_shape=LATENT, settings=settings)

    @torch.no_grad()
    def samples(self, n: Optional[int] = None) -> torch.Tensor:
        """Images (n,1,16,16) in [0,1] from the held-out noise seeds, current LoRA."""
        noise = self.eval_noise[:n]
        s = self.sampler(SamplerSettings(method="draft_k"))
        out = [to_unit(s.sample(chunk, torch.zeros(len(chunk), dtype=torch.long)))
               for chunk in noise.split(64)]
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out means: ``reward``, ``judge_logp``, ``judge_frac``, ``nn_dist``."""
        images = self.samples()
        out = {"reward": float(self.reward(images).mean())}
        out.update(judge_scores(self.judge, images, self.target))
        out["nn_dist"] = float(nn_distance(images, self.reference).mean())
        return out

    # -- the held-out check (training/heldout.py) -------------------------------------------------
    def heldout_settings(self, every: int, stop: str = "off") -> HeldoutSettings:
        """The check of every run: the one prompt, ``eval_seeds`` held-out noise seeds (the check's
        own, apart from :attr:`eval_noise`), evaluated every ``every`` updates, the best kept."""
        b = self.budget
        return HeldoutSettings(every=every, seeds=b.eval_seeds, prompts=tuple(PROMPTS), keep="best",
                               stop=stop, patience=b.heldout_patience,
                               tolerance=b.heldout_tolerance)

    def heldout_judges(self) -> list:
        """The check's judges, never in the loss, higher is better: ``judge1`` = the judge
        classifier's probability of the target digit per image (its mean is a smooth version of
        the judged-target fraction; it ranks the kept update), ``judge2`` = the realism guard as
        minus the NN distance to real digits."""
        def judge_p(images, prompts):
            return F.softmax(self.judge(images), dim=1)[:, self.target]

        def realism(images, prompts):
            return -nn_distance(images, self.reference)

        return [(f"p_judge({self.target})", judge_p), ("-NN distance (realism guard)", realism)]

    def heldout_check(self, every: int, stop: str = "off") -> HeldoutCheck:
        return HeldoutCheck(self.heldout_settings(every, stop), self.heldout_judges(),
                            reward_label=f"log p_reward({self.target})", prompt_offset=0,
                            chunk=64)

    # -- runs -----------------------------------------------------------------------------------
    def train_run(self, method: str, seed: int, updates: int, eval_every: int,
                  kl_coeff: float = 0.0, log=print) -> dict:
        """One seeded run from the base model. Returns ``{"updates": [...], "seconds": [...]
        (training wall time at each evaluation, evaluations excluded), "eval": [dict...],
        "train_reward": [per update], "grad_norm": [per update], "k": [per update],
        "skipped": int, "heldout": the check's summary plus ``stop_replay``, "lora": final LoRA
        state, "kept_lora": the check's best}``; evaluation 0 is the base model.

        A :class:`training.heldout.HeldoutCheck` (stop off, keep best) runs beside the trainer at
        the same updates as :meth:`evaluate` (on its own held-out noises); the stop rule is then
        replayed over its history (:func:`replay_stop`): what ``stop = "on"`` would have done."""
        if updates % eval_every:
            raise ValueError("the held-out check evaluates at multiples of eval_every only")
        self.reset_lora(seed)
        if self._base_eval is None:  # a fresh LoRA is exactly the base model (up = 0)
            self._base_eval = self.evaluate()
        trainer = self.trainer(method, seed, updates, kl_coeff)
        check = self.heldout_check(eval_every)
        rec = {"updates": [0], "seconds": [0.0], "eval": [dict(self._base_eval)],
               "train_reward": [],
               "grad_norm": [], "k": [], "skipped": 0}
        check.observe(check.evaluate(trainer), trainer.params)  # update 0: the base model
        elapsed = 0.0
        for u in range(1, updates + 1):
            t0 = time.perf_counter()
            report = trainer.step()
            elapsed += time.perf_counter() - t0
            rec["train_reward"].append(report.reward)
            rec["grad_norm"].append(report.grad_norm)
            rec["k"].append(report.k)
            rec["skipped"] += int(report.skipped)
            if check.due(trainer.iteration):
                check.observe(check.evaluate(trainer), trainer.params)
            if u % eval_every == 0 or u == updates:
                rec["updates"].append(u)
                rec["seconds"].append(elapsed)
                rec["eval"].append(self.evaluate())
        e = rec["eval"][-1]
        held = check.summary()
        held["stop_replay"] = replay_stop(held["evaluations"], self.heldout_settings(eval_every))
        rec["heldout"] = held
        log(f"  {method:10s} seed {seed} kl {kl_coeff:g}: reward {rec['eval'][0]['reward']:.3f}"
            f" -> {e['reward']:.3f}  judge {e['judge_logp']:.3f}  nn {e['nn_dist']:.3f}  "
            f"{elapsed:.1f}s; held-out best at update {held['best_iteration']}, stop would end "
            f"at {held['stop_replay']['stop_update']}")
        rec["lora"] = self.lora_state()
        rec["kept_lora"] = [t.clone() for t in check.best_lora]
        return rec

    def gradient(self, settings: SamplerSettings, draw: int, batch: int, k=None) -> torch.Tensor:
        """The flattened gradient of ``-mean reward`` w.r.t. the LoRA factors for noise draw
        ``draw`` at the current parameters (as the trainer computes it, before clipping)."""
        params = self.lora.trainable_parameters()
        g = derived_generator(777, draw)
        noise = torch.randn((batch,) + LATENT, generator=g)
        rollout = self.sampler(settings).rollout(noise, torch.zeros(batch, dtype=torch.long),
                                                 generator=g, k=k)
        loss = -self.reward(to_unit(rollout.latents)).mean()
        grads = torch.autograd.grad(loss, params)
        return torch.cat([gr.flatten() for gr in grads])

    def gradient_variance(self, state: Optional[list], log=print) -> dict:
        """Over ``var_draws`` noise draws at fixed LoRA ``state`` (None: the base init, seed 0):
        per estimator ``{"trace_var": E|g - E g|^2, "mean_norm2": |E g|^2, "rel_var":
        trace_var / mean_norm2, "seconds_per_grad"}`` for DRaFT-1 and DRaFT-LV n = 2, 4."""
        b = self.budget
        self.reset_lora(0)
        if state is not None:
            self.load_lora_state(state)
        out = {}
        for name, st in (("draft_k1", SamplerSettings(method="draft_k", k=1)),
                         ("draft_lv2", SamplerSettings(method="draft_lv", lv_samples=2)),
                         ("draft_lv4", SamplerSettings(method="draft_lv", lv_samples=4))):
            t0 = time.perf_counter()
            gs = torch.stack([self.gradient(st, d, b.var_batch) for d in range(b.var_draws)])
            sec = (time.perf_counter() - t0) / b.var_draws
            mean = gs.mean(0)
            trace = float(((gs - mean) ** 2).sum(1).mean() * b.var_draws / (b.var_draws - 1))
            m2 = float(mean.pow(2).sum())
            out[name] = {"trace_var": trace, "mean_norm2": m2, "rel_var": trace / max(m2, 1e-30),
                         "seconds_per_grad": sec}
            log(f"  grad variance {name}: trace {trace:.4g}  |mean|^2 {m2:.4g}  "
                f"rel {trace / max(m2, 1e-30):.3g}  {sec:.3f}s/grad")
        return out

    def lv_conditional_variance(self, log=print) -> dict:
        """DRaFT-LV's gradient variance given the chain: for each of ``cond_chains`` initial
        noises (batch ``var_batch``) the deterministic DDIM chain and its ``x_0`` are fixed, and
        only LV's re-noising noises vary over ``cond_draws`` draws (the generator handed to the
        rollout draws nothing else: eta = 0, K fixed). At the base init (seed 0), per estimator
        (DRaFT-1 and DRaFT-LV with each n in ``cond_ns``): ``{"cond_var": mean over chains of the
        trace of the covariance over re-noising draws, "between_var": trace of the covariance of
        the per-chain means, "total_var": over all chains x draws, "mean_norm2": |mean|^2,
        "cond_share": cond_var / total_var, "seconds_per_grad"}``."""
        b = self.budget
        self.reset_lora(0)
        params = self.lora.trainable_parameters()
        ests = [("draft_k1", SamplerSettings(method="draft_k", k=1))] + [
            (f"draft_lv{n}", SamplerSettings(method="draft_lv", lv_samples=n)) for n in b.cond_ns]
        out = {}
        for name, st in ests:
            sampler = self.sampler(st)
            t0 = time.perf_counter()
            chains = []
            for c in range(b.cond_chains):
                noise = torch.randn((b.var_batch,) + LATENT, generator=derived_generator(778, c))
                draws = []
                for d in range(b.cond_draws):
                    g = derived_generator(779, c, d)  # only LV's re-noising noises
                    rollout = sampler.rollout(noise, torch.zeros(b.var_batch, dtype=torch.long),
                                              generator=g)
                    loss = -self.reward(to_unit(rollout.latents)).mean()
                    draws.append(torch.cat([gr.flatten()
                                            for gr in torch.autograd.grad(loss, params)]))
                chains.append(torch.stack(draws))
            G = torch.stack(chains).double()  # (C, R, P)
            C, R = G.shape[:2]
            sec = (time.perf_counter() - t0) / (C * R)
            cond = float(((G - G.mean(1, keepdim=True)) ** 2).sum((1, 2)).mean() / (R - 1))
            means = G.mean(1)
            between = float(((means - means.mean(0)) ** 2).sum() / (C - 1))
            flat = G.flatten(0, 1)
            total = float(((flat - flat.mean(0)) ** 2).sum() / (C * R - 1))
            m2 = float(flat.mean(0).pow(2).sum())
            out[name] = {"cond_var": cond, "between_var": between, "total_var": total,
                         "mean_norm2": m2, "cond_share": cond / max(total, 1e-30),
                         "seconds_per_grad": sec}
            log(f"  LV variance given the chain, {name}: cond {cond:.4g}  between {between:.4g}  "
                f"total {total:.4g}  share {cond / max(total, 1e-30):.3g}  {sec:.3f}s/grad")
        return out

    def grad_norm_by_k(self, state: Optional[list], log=print) -> dict:
        """``{K: {"mean": mean |g|, "std": ..}}`` over ``norm_draws`` draws (batch = the update's
        batch size) at fixed LoRA ``state``, for DRaFT-K with each K in ``norm_ks``."""
        b = self.budget
        self.reset_lora(0)
        if state is not None:
            self.load_lora_state(state)
        out = {}
        for k in b.norm_ks:
            if k > b.steps:
                continue
            st = SamplerSettings(method="draft_k", k=k)
            norms = [float(self.gradient(st, d, b.batch_size).norm()) for d in range(b.norm_draws)]
            out[str(k)] = {"mean": float(np.mean(norms)), "std": float(np.std(norms))}
            log(f"  grad norm K={k}: {np.mean(norms):.4g} +- {np.std(norms):.2g}")
        return out

    def strength_sweep(self, state: list, log=print) -> dict:
        """``{strength: evaluate()}`` with the LoRA ``state`` scaled by each strength; also keeps
        the sample images under ``"_images"``."""
        self.reset_lora(0)
        self.load_lora_state(state)
        out, images = {}, {}
        for s in self.budget.strengths:
            self.set_strength(s)
            out[f"{s:g}"] = self.evaluate()
            images[f"{s:g}"] = self.samples(16)
            e = out[f"{s:g}"]
            log(f"  strength {s:g}: reward {e['reward']:.3f}  judge {e['judge_logp']:.3f}  "
                f"frac {e['judge_frac']:.2f}  nn {e['nn_dist']:.3f}")
        self.set_strength(1.0)
        out["_images"] = images
        return out
