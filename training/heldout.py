"""The held-out check: judge the LoRA while it trains, on prompts, seeds and rewards it never trains on.

DRaFT maximises a reward it can exploit: the training reward keeps rising while what it was meant
to measure peaks and falls (``make fidelity``: the held-out judge peaks around update 20-30). The
check samples fixed held-out images every ``every`` updates and at the start (update 0, the base
model), scores them with up to three judge rewards (never in the loss, no gradient) and with the
training reward, measures their diversity, keeps the best LoRA by a ranking figure and can stop
the run when that figure stays below its best.

One evaluation (:meth:`HeldoutCheck.evaluate`):

* images: every held-out prompt with each of ``seeds`` fixed noises (seed ``s`` gives the same
  initial noise for every prompt and at every evaluation), sampled with the trainer's own sampler
  under ``no_grad``, ``chunk`` rows at a time, decoded;
* figures (means over all held-out images): ``judge1..judge3`` (each judge's reward), ``reward``
  (the training reward), ``similarity`` (mean pairwise cosine similarity of image embeddings
  across the seeds of each prompt, averaged over prompts, in [-1, 1]; rising similarity is mode
  collapse: the same face for every seed). ``similarity`` needs ``seeds >= 2``;
* videos (a video decoder's frames, :meth:`DraftTrainer.evaluation_frames`): each video is scored
  as the trainer scores it (:func:`training.trainer.score_samples`: an image reward's mean over
  its frames, a video reward on the frames in order), and ``similarity`` compares the embeddings
  of each video's middle frame;
* ranking figure: ``judge1`` when a judge is connected, else ``reward``; higher is better.

The rule for ``stop = "on"``: after an evaluation whose ranking figure is more than ``tolerance``
below the best so far, the streak grows by one (any other evaluation resets it); at ``patience``
the run stops. While the best is still the run's first evaluation (the model it started from),
the rule waits twice as long (``2 * patience``): a judge often dips before training lifts it
(``make fidelity``: the judged digit falls for the first 30-40 updates of DRaFT-1 and DRaFT-LV,
then rises above the base model). Ties keep the earlier best.

ComfyUI-free: judges and the embedding are plain callables, the trainer is a
:class:`training.trainer.DraftTrainer`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .prompt_sets import HELDOUT_PROMPTS
from .trainer import DraftTrainer, derived_generator, score_samples

Score = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]  # images (B,3,H,W) in [0,1] -> (B,)
Embed = Callable[[torch.Tensor], torch.Tensor]  # images (B,3,H,W) in [0,1] -> (B, D)

KEEP = ("best", "last")
STOP = ("off", "on")
MAX_JUDGES = 3
HELDOUT_STREAM = 0x4E1D0  # tags the held-out noises' generators (apart from training and previews)
STEP_NOISE_TAG = 0x57E9  # under HELDOUT_STREAM: the step noises' generators (seeds are < 0x57E9)


@dataclass(frozen=True)
class HeldoutSettings:
    """The DRaFT Held-out Check node's widgets (its tooltips say the same).

    Attributes:
        every: evaluate every N updates (and at the start, update 0: the base model).
        seeds: fixed noise seeds per held-out prompt.
        prompts: held-out prompts (default: :data:`training.prompt_sets.HELDOUT_PROMPTS`).
        keep: ``"best"``: the run's outputs carry the best evaluated LoRA; ``"last"``: the last.
        stop: ``"on"``: end the run after ``patience`` evaluations in a row with the ranking
            figure more than ``tolerance`` below its best.
        patience: P of the stop rule.
        tolerance: in the ranking figure's own units (e.g. PickScore points), >= 0.
    """

    every: int = 10
    seeds: int = 4
    prompts: tuple = HELDOUT_PROMPTS
    keep: str = "best"
    stop: str = "off"
    patience: int = 3
    tolerance: float = 0.0

    def __post_init__(self):
        if self.every < 1 or self.seeds < 1 or self.patience < 1:
            raise ValueError("every, seeds and patience must be >= 1")
        if not self.prompts:
            raise ValueError("the held-out check needs at least one prompt")
        if self.keep not in KEEP or self.stop not in STOP:
            raise ValueError(f"keep must be one of {KEEP}, stop one of {STOP}")
        if not (self.tolerance >= 0 and math.isfinite(self.tolerance)):
            raise ValueError("tolerance must be a finite number >= 0")


@dataclass(frozen=True)
class Series:
    """One held-out figure: ``key`` in the records, ``label`` for people, ``kind`` one of
    ``judge``, ``reward``, ``similarity`` (the only one where lower is better)."""

    key: str
    label: str
    kind: str

    def as_dict(self) -> dict:
        return {"key": self.key, "label": self.label, "kind": self.kind}


@dataclass
class Outcome:
    """What one evaluation decided: ``new_best`` (this update is the best so far), ``stop``
    (the stop rule fired; ``reason`` says it in words)."""

    record: dict
    new_best: bool
    stop: bool = False
    reason: str = ""


@contextlib.contextmanager
def frozen_statistics(*modules):
    """Scoring held-out images must not move a reward's running statistics (Combine's
    standardisation, ``track_stats``): they are frozen inside."""
    saved = {}  # id -> (module, value): a module given twice (judge and training reward) once
    for module in modules:
        for m in (module.modules() if isinstance(module, torch.nn.Module) else [module]):
            if hasattr(m, "track_stats") and id(m) not in saved:
                saved[id(m)] = (m, m.track_stats)
                m.track_stats = False
    try:
        yield
    finally:
        for m, value in saved.values():
            m.track_stats = value


def pairwise_similarity(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of ``embeddings`` (S, D), S >= 2."""
    e = torch.nn.functional.normalize(embeddings.float().flatten(1), dim=-1)
    sim = e @ e.T
    s = e.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (s * (s - 1)))


def pixel_embedding(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """The embedding when no CLIP is at hand: the image at ``size`` px, each image's mean
    removed (so the cosine compares structure, not brightness). (B, 3*size*size)."""
    small = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="area")
    flat = small.flatten(1)
    return flat - flat.mean(1, keepdim=True)


class HeldoutCheck:
    """Runs the held-out evaluations of one training run and keeps their history and the best.

    Args:
        settings: :class:`HeldoutSettings`.
        judges: ``(label, score)`` pairs, at most three; ``score(images, prompts) -> (B,)``,
            higher is better; called under ``no_grad``.
        reward_label: the training reward's label.
        embed: ``(source label, embed)`` for the similarity figure, or None: pixels.
        prompt_offset: where the held-out prompts start in the denoiser's prompt indices (the
            trainer's own prompts are ``0 .. offset - 1``).
        chunk: held-out images sampled at once (no gradient: more rows fit than in an update).
        decode_rows: of those, decoded and scored at once (default ``chunk``; the trainer node
            passes its rows per micro-batch, which its memory plan has room to decode).
        share: data-parallel: ``share(values: list[float]) -> list[float]`` makes every process
            use rank 0's figures (so every process takes the same keep and stop decisions).
    """

    def __init__(self, settings: HeldoutSettings, judges: Sequence = (), reward_label: str = "",
                 embed: Optional[tuple] = None, prompt_offset: int = 0, chunk: int = 4,
                 decode_rows: Optional[int] = None, share: Optional[Callable] = None):
        if len(judges) > MAX_JUDGES:
            raise ValueError(f"at most {MAX_JUDGES} judges")
        self.settings = settings
        self.judges = list(judges)
        self.embed = embed
        self.prompt_offset = int(prompt_offset)
        self.chunk = max(1, int(chunk))
        self.decode_rows = max(1, int(decode_rows)) if decode_rows else self.chunk
        self.share = share
        self.series = [Series(f"judge{i + 1}", label, "judge")
                       for i, (label, _) in enumerate(self.judges)]
        self.series.append(Series("reward", f"training reward ({reward_label or 'reward'})", "reward"))
        if settings.seeds >= 2:
            source = embed[0] if embed is not None else "pixels"
            self.series.append(Series("similarity", f"similarity across seeds ({source})",
                                      "similarity"))
        self.ranking = self.series[0]
        self.history: list = []  # [{"iteration": int, "figures": {key: float}}]
        self.best: Optional[dict] = None  # the record of the best evaluation
        self.best_lora: Optional[list] = None  # CPU copies of the LoRA factors at the best
        self.streak = 0
        self.stop_reason = ""

    # -- evaluation -----------------------------------------------------------------------------
    def evaluated(self, iteration: int) -> bool:
        return any(r["iteration"] == iteration for r in self.history)

    def due(self, iteration: int) -> bool:
        """Whether update ``iteration`` (finished updates) is evaluated: the first evaluation of a
        run (update 0, or a resumed run's first update without a history), every ``every``."""
        if self.evaluated(iteration):
            return False
        return not self.history or iteration % self.settings.every == 0

    def noises(self, latent_shape: tuple) -> torch.Tensor:
        """The fixed held-out noises (seeds, *latent_shape), the same at every evaluation."""
        return torch.cat([torch.randn((1,) + tuple(latent_shape),
                                      generator=derived_generator(HELDOUT_STREAM, s))
                          for s in range(self.settings.seeds)])

    @torch.no_grad()
    def images(self, trainer) -> tuple:
        """``(images (P*S, 3, H, W) float32 on the CPU, prompts)`` of the current LoRA: prompt-major
        (the seeds of prompt 0, then of prompt 1, ...); a video's frames (those the trainer
        evaluates) are consecutive images, ``(P*S*F, 3, H, W)``."""
        prompts = list(self.settings.prompts)
        seeds = self.settings.seeds
        noise = self.noises(trainer.latent_shape)
        pairs = [(p, s) for p in range(len(prompts)) for s in range(seeds)]
        out = []
        for c in range(0, len(pairs), self.chunk):
            part = pairs[c:c + self.chunk]
            x = noise[[s for _, s in part]].to(trainer.device)
            index = torch.tensor([self.prompt_offset + p for p, _ in part], device=trainer.device)
            # eta > 0 step noises (a non-zero last key: derived_generator(H, 1, 0) would be seed
            # 1's initial-noise generator); they depend on the chunk size, fixed within a run
            g = derived_generator(HELDOUT_STREAM, STEP_NOISE_TAG, c + 1)
            with trainer._autocast():
                latent = trainer.sampler.sample(x, index, g)
                for d in range(0, len(part), self.decode_rows):
                    out.append(trainer.decode_frames(latent[d:d + self.decode_rows],
                                                     trainer.evaluation_frames()).float().cpu())
        return torch.cat(out), [prompts[p] for p, _ in pairs]

    @torch.no_grad()
    def evaluate(self, trainer) -> dict:
        """The held-out figures of ``trainer``'s current LoRA: ``{"iteration", "figures"}``."""
        images, prompts = self.images(trainer)
        figures = {}
        with frozen_statistics(trainer.reward, *[fn for _, fn in self.judges]), trainer._autocast():
            for s, (_, fn) in zip(self.series, self.judges):
                figures[s.key] = self._mean(fn, images, prompts)
            figures["reward"] = self._mean(trainer.reward, images, prompts)
            if self.settings.seeds >= 2:
                embed = self.embed[1] if self.embed is not None else pixel_embedding
                seeds = self.settings.seeds
                middle = DraftTrainer.middle_frames(images, len(prompts))  # videos: middle frames
                sims = [pairwise_similarity(embed(middle[i:i + seeds]).float().cpu())
                        for i in range(0, len(middle), seeds)]
                figures["similarity"] = float(sum(sims) / len(sims))
        if self.share is not None:
            keys = list(figures)
            figures = dict(zip(keys, self.share([figures[k] for k in keys])))
        return {"iteration": int(trainer.iteration), "figures": figures}

    def _mean(self, fn, images: torch.Tensor, prompts: list) -> float:
        """The mean of ``fn``'s per-sample scores (videos: per video), ``decode_rows`` samples at
        a time."""
        scores, step = [], self.decode_rows
        frames = len(images) // len(prompts)
        for c in range(0, len(prompts), step):
            scores.append(score_samples(fn, images[c * frames:(c + step) * frames],
                                        prompts[c:c + step]).float().cpu())
        return float(torch.cat(scores).mean())

    # -- decisions ------------------------------------------------------------------------------
    def observe(self, record: dict, params: Sequence[torch.Tensor]) -> Outcome:
        """Add ``record`` to the history, update the best (copying ``params``, the LoRA factors,
        to the CPU when it is new) and apply the stop rule."""
        self.history.append(record)
        value = record["figures"].get(self.ranking.key, float("nan"))
        best = None if self.best is None else self.best["figures"][self.ranking.key]
        new_best = math.isfinite(value) and (best is None or not math.isfinite(best) or value > best)
        if new_best:
            self.best = record
            self.best_lora = [p.detach().to("cpu", copy=True) for p in params]
            self.streak = 0
        elif not math.isfinite(value) or value < best - self.settings.tolerance:
            self.streak += 1
        else:
            self.streak = 0
        outcome = Outcome(record, new_best)
        it = self.best["iteration"] if self.best is not None else None
        at_start = it == self.history[0]["iteration"]
        patience = self.settings.patience * (2 if at_start else 1)
        if self.settings.stop == "on" and self.streak >= patience:
            kept = (f"kept update {it}" if self.settings.keep == "best"
                    else f"kept the last, update {record['iteration']}")
            if at_start:
                word = "did not beat" if self.settings.tolerance == 0 else (
                    f"stayed more than {self.settings.tolerance:g} below")
                self.stop_reason = (f"{self.describe(self.ranking)} {word} update {it}, where the "
                                    f"run started, in {self.streak} evaluations; {kept}")
            else:
                word = "fell" if self.settings.tolerance == 0 else (
                    f"stayed more than {self.settings.tolerance:g} below its best")
                self.stop_reason = (f"{self.describe(self.ranking)} {word} for {self.streak} "
                                    f"evaluations after update {it}; {kept}")
            outcome.stop, outcome.reason = True, self.stop_reason
        return outcome

    def describe(self, series: Series) -> str:
        return f"judge {series.label}" if series.kind == "judge" else series.label

    def best_iteration(self) -> Optional[int]:
        return None if self.best is None else int(self.best["iteration"])

    def series_dicts(self) -> list:
        return [s.as_dict() for s in self.series]

    def summary(self) -> dict:
        """For the history output, the node's status and the run's metadata."""
        return {"series": self.series_dicts(), "ranking": self.ranking.key,
                "evaluations": [dict(r) for r in self.history],
                "best_iteration": self.best_iteration(),
                "best": None if self.best is None else dict(self.best["figures"]),
                "keep": self.settings.keep, "stop_reason": self.stop_reason}

    def lines(self) -> list:
        """The held-out figures in words: the first and best evaluation (and the last)."""
        if not self.history:
            return []
        def fmt(record):
            return ", ".join(f"{s.label} {record['figures'][s.key]:.4g}" for s in self.series
                             if s.key in record["figures"])
        first, last = self.history[0], self.history[-1]
        out = [f"held-out at update {first['iteration']}: {fmt(first)}"]
        if self.best is not None and self.best is not first:
            out.append(f"best at update {self.best['iteration']}: {fmt(self.best)}")
        if last is not first and last is not self.best:
            out.append(f"last at update {last['iteration']}: {fmt(last)}")
        if self.stop_reason:
            out.append(f"stopped: {self.stop_reason}")
        return out

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"series": self.series_dicts(), "history": [dict(r) for r in self.history],
                "best_iteration": self.best_iteration(), "streak": self.streak,
                "best_lora": list(self.best_lora) if self.best_lora is not None else None}

    def load_state_dict(self, state: dict) -> bool:
        """Restore a saved history and best; False (nothing restored) when that run's check had
        other figures (another judge, another similarity source)."""
        if not state or state.get("series") != self.series_dicts():
            return False
        self.history = [dict(r) for r in state.get("history", [])]
        it = state.get("best_iteration")
        self.best = next((r for r in self.history if r["iteration"] == it), None)
        lora = state.get("best_lora")
        self.best_lora = [t.detach().cpu().clone() for t in lora] if lora is not None else None
        if self.best is None or self.best_lora is None:
            self.best, self.best_lora = None, None
        self.streak = int(state.get("streak", 0))
        return True


__all__ = ["HeldoutSettings", "HeldoutCheck", "Series", "Outcome", "KEEP", "STOP",
           "frozen_statistics", "pairwise_similarity", "pixel_embedding", "HELDOUT_PROMPTS"]
