"""The DRaFT training loop: sample, decode, reward, backward into LoRA, clip, AdamW.

One update (DRAFT_METHOD.md, "Loop"):

1. for each of ``grad_accum`` micro-batches: row ``j`` draws its prompt index, initial noise and its
   own rollout noises (eta noises, LV re-noising) from a generator seeded by ``(seed, iteration,
   micro-batch, ROW_STREAM, j)``, batch-wide draws (random K) from ``(seed, iteration, micro-batch)``;
   so a row's sample does not depend on the other rows of its batch, and ``N`` data-parallel
   processes with batch ``b`` (rows ``rank * b ...``) draw what one process with batch ``N * b`` does;
2. roll the sampler out (no-grad prefix, differentiated tail per the method);
3. decode the final latents (never checkpointed as a whole: the decoder's own backward is the
   peak either way, and a recompute costs a decode; see :mod:`training.memory_plan`), score them,
   ``loss = -mean(reward) / grad_accum``
   (+ ``kl_coeff * kl`` and any weighted regularisers), backward;
4. data-parallel (``parallel`` set, :mod:`training.distributed`): average the gradients, the loss
   and the skip decision over the processes, gather every process's rewards;
5. if the loss or any gradient is NaN/Inf: skip the update (weights and optimizer state untouched),
   count and report it; else clip the gradient norm and take an AdamW step.

Seeded and deterministic: on the CPU the same settings give bit-identical LoRA weights.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .checkpointing import KEEP_CONVOLUTIONS, checkpoint_blocks
from .lora import LoRASet
from .sampler import DifferentiableSampler, Rollout
from .video_frames import FRAME_PICK_STREAM, FrameChoice

Decoder = Callable[[torch.Tensor], torch.Tensor]
Reward = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
Regularizer = Callable[[Rollout, torch.Tensor], torch.Tensor]

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings. Defaults are the paper's small-run settings as quoted by public
    re-implementations (DRAFT_METHOD.md, "Published settings"), clip from DRaFT+ (NeMo-Aligner).

    Attributes:
        iterations: optimizer updates to run.
        batch_size: samples per micro-batch (paper: 4 small / 16 large).
        grad_accum: micro-batches per update; the effective batch is ``batch_size * grad_accum``.
        learning_rate: AdamW learning rate (paper: 4e-4 small, 2e-4 large).
        weight_decay: AdamW decoupled weight decay (paper: 0.1).
        betas: AdamW betas (paper: (0.9, 0.999)).
        grad_clip: max global gradient norm; 0 disables clipping (DRaFT+: 10).
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` autocast; LoRA weights stay float32.
        kl_coeff: DRaFT+'s ``kl_coeff * mean((eps_lora - eps_base)^2)``; needs a reference denoiser.
        seed: seeds prompts, noises, K draws and LV re-noising.
    """

    iterations: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 4e-4
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 10.0
    mixed_precision: str = "no"
    kl_coeff: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.iterations < 0:
            raise ValueError("batch_size and grad_accum must be >= 1, iterations >= 0")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")


@dataclass
class StepReport:
    """What one update did.

    Attributes:
        iteration: number of updates finished so far, this one included (1-based; skipped ones
            count).
        reward: mean reward over the update's samples (NaN if the reward was not finite).
        rewards: per-sample rewards, in sample order.
        loss: the update's total loss (sum over micro-batches).
        grad_norm: global gradient norm before clipping (NaN/Inf if the step was skipped for it).
        k: differentiated steps of the last micro-batch's rollout.
        skipped: True when the update was skipped; ``skip_reason`` says why.
        seconds: wall time of the update.
    """

    iteration: int
    reward: float
    rewards: list
    loss: float
    grad_norm: float
    k: int
    skipped: bool = False
    skip_reason: str = ""
    seconds: float = 0.0


def _host_float(t: torch.Tensor) -> float:
    """``float(t)``; 0.0 for a fake tensor (memory traces run the update under FakeTensorMode,
    where values do not exist)."""
    from torch._subclasses.fake_tensor import FakeTensor
    return 0.0 if isinstance(t, FakeTensor) else float(t)


def _host_list(t: torch.Tensor) -> list:
    from torch._subclasses.fake_tensor import FakeTensor
    return [0.0] * t.numel() if isinstance(t, FakeTensor) else t.tolist()


def _frames_per_sample(images: torch.Tensor, samples: int) -> int:
    """Decoded images per sample: 1 for an image decoder, ``F`` for a video decoder that returns
    each sample's ``F`` frames as consecutive images."""
    if samples < 1 or images.shape[0] % samples:
        raise ValueError(f"{images.shape[0]} decoded images for {samples} samples")
    return images.shape[0] // samples


def score_samples(reward: Reward, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Per-sample rewards ``(B,)`` (float32) of decoded ``images``: ``(B,3,H,W)``, or for videos
    ``(B*F,3,H,W)``, sample ``b``'s ``F`` frames at ``b*F ... b*F+F-1`` (what a video decoder
    returns). A reward that scores whole videos (``reward.scores_videos``, e.g. temporal
    consistency) is called ``reward(images, prompts, frames_per_video=F)``; an image reward scores
    each frame with its video's prompt and a video's reward is the mean over its frames."""
    frames = _frames_per_sample(images, len(prompts))
    if getattr(reward, "scores_videos", False):
        return reward(images, prompts, frames_per_video=frames).float()
    if frames == 1:
        return reward(images, prompts).float()
    per_frame = [p for p in prompts for _ in range(frames)]
    return reward(images, per_frame).float().view(len(prompts), frames).mean(1)


ROW_STREAM = 0x524F57  # tags per-row generators: SeedSequence([a, b, c]) == SeedSequence([a, b, c, 0])


def derived_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers through numpy's SeedSequence (no collisions between
    e.g. (seed=1, iteration=0) and (seed=0, iteration=1); but trailing zero keys do collide)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)
    g = torch.Generator()
    g.manual_seed(int(state[0] >> np.uint64(1)))
    return g


@dataclass
class DraftTrainer:
    """Owns the optimizer and runs DRaFT updates.

    Args:
        sampler: the differentiable sampler (its denoiser closes over the LoRA'd model).
        decode: ``latent (B,C,h,w) -> images (B,3,H,W)`` in [0, 1], differentiable; a video
            decoder returns ``F`` frames per latent, ``(B*F,3,H,W)``, and each sample's reward is
            the mean over its frames (:meth:`score`).
        reward: ``(images, prompts) -> (B,)``, differentiable, higher is better; a reward with
            ``scores_videos`` true scores whole videos (:func:`score_samples`).
        prompts: the prompt list; batches draw indices into it uniformly with replacement.
        lora: the trained deltas (or a plain list of parameters).
        latent_shape: ``(C, h, w)`` of one latent.
        settings: :class:`TrainSettings`.
        device: where noises and latents live.
        regularizers: ``(weight, fn(rollout, images) -> scalar)`` pairs added to the loss (a mean
            over the rows it is given: with ``row_by_row`` it is called per row and weighted by the
            row's share).
        block_units: modules (of the denoiser and the decoder) to checkpoint one by one during an
            update (:func:`training.checkpointing.checkpoint_blocks`, given the trained
            parameters), restored after each update.
        selective_units: modules (the decoder's blocks in the middle memory way) checkpointed
            selectively: their convolutions' outputs are kept, the rest recomputed
            (:data:`training.checkpointing.KEEP_CONVOLUTIONS`); distinct from ``block_units``.
        denoiser_blocks_checkpointed: whether ``block_units`` include the denoiser's blocks (then
            a single differentiated step is not checkpointed as a whole: its blocks already are).
            None: whenever there are ``block_units``.
        whole_step_over_blocks: checkpoint a single differentiated step whole even when the
            denoiser's blocks are checkpointed (:func:`training.step_checkpoint.recomputed_step`):
            its blocks' saved inputs then do not sit beside the decoder's backward, which runs
            first, for one more denoiser forward (a video decoder's backward is the update's peak:
            Wan's, where the 30 blocks' inputs of both CFG branches are 2.4 GiB at 480x832).
        row_by_row: run the differentiated tail, decode and reward one row at a time.
        channels_last_decode: hand the decoder 4-D latents in channels-last memory format (NHWC
            strides, the same values; the images come back contiguous). None: on the CPU only,
            where oneDNN runs the SD VAE decoder's forward plus backward about 10 % faster so
            (``make bench``: ``decode_channels_last_vs_nchw``); on a GPU ComfyUI keeps NCHW
            unless started with ``--force-channels-last``.
        reward_statistics: optional context-manager factory under which a reward with running
            statistics defers their update to the end of the update (``row_by_row`` only).
        parallel: data-parallel partner (:class:`training.distributed.DataParallel`): this
            process's rank and the world size (its rows are ``rank * batch_size ...`` of each
            global micro-batch of ``world_size * batch_size`` rows) and the collectives that make
            the update the one over the global batch. None: one process.
        state_parts: ``name -> object`` with ``state_dict()`` / ``load_state_dict(state)`` whose
            state travels with the trainer's (the resume side file), e.g. the held-out check's
            history (:class:`training.heldout.HeldoutCheck`).
        frame_choice: video families: which decoded frames the reward scores
            (:class:`training.video_frames.FrameChoice`; ``decode`` then decodes at most its
            ``latent_frames`` latent frames, and is handed only those the picked frames need).
            None: every frame the decoder returns (images: the image).
    """

    sampler: DifferentiableSampler
    decode: Decoder
    reward: Reward
    prompts: Sequence[str]
    lora: object
    latent_shape: tuple
    settings: TrainSettings = field(default_factory=TrainSettings)
    device: torch.device = torch.device("cpu")
    regularizers: Sequence = ()
    block_units: Sequence = ()
    denoiser_blocks_checkpointed: Optional[bool] = None
    selective_units: Sequence = ()
    whole_step_over_blocks: bool = False
    row_by_row: bool = False
    channels_last_decode: Optional[bool] = None
    reward_statistics: Optional[Callable] = None
    parallel: Optional[object] = None
    state_parts: dict = field(default_factory=dict)
    frame_choice: Optional[FrameChoice] = None

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("need at least one prompt")
        self.params = (self.lora.trainable_parameters() if isinstance(self.lora, LoRASet)
                       else list(self.lora))
        if not self.params:
            raise ValueError("no trainable parameters")
        s = self.settings
        self.optimizer = torch.optim.AdamW(self.params, lr=s.learning_rate, betas=tuple(s.betas),
                                           weight_decay=s.weight_decay)
        self.device = torch.device(self.device)
        if self.channels_last_decode is None:
            self.channels_last_decode = self.device.type == "cpu"
        self.scaler = (torch.amp.GradScaler(self.device.type) if s.mixed_precision == "fp16"
                       else None)
        self.iteration = 0
        self.skipped_steps = 0
        self.history: list = []
        self._block_state: dict = {}  # training.checkpointing's, per checkpointed block
        self.last_images: Optional[torch.Tensor] = None  # first sample of the last update (video: middle frame)
        if self.reward_statistics is None and hasattr(self.reward, "deferred_statistics"):
            self.reward_statistics = self.reward.deferred_statistics

    # -- helpers --------------------------------------------------------------------------------
    def _autocast(self):
        s = self.settings
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.mixed_precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32,
                              enabled=dtype is not None)

    def _noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((n,) + tuple(self.latent_shape), generator=generator).to(self.device)

    def _prompts(self, index: torch.Tensor) -> list:
        return [self.prompts[int(i)] for i in index.tolist()]

    # -- one update -----------------------------------------------------------------------------
    def _row_groups(self, rows: int) -> list:
        """Index tensors of the tail rows processed together: one row at a time when
        ``row_by_row``, else all rows at once."""
        if not self.row_by_row or rows == 1:
            return [None]
        return [torch.tensor([r]) for r in range(rows)]

    def step(self) -> StepReport:
        """Run one update; returns its :class:`StepReport` (also appended to ``history``).

        Per micro-batch: the no-grad part of the rollout runs batched; the differentiated tail,
        the decode and the reward run over all rows at once, or one row (batch row, LV copy) at a
        time when ``row_by_row``, each backpropagated before the next, so the peak memory is that of
        one row. The loss is ``-sum(rewards) / (rows * grad_accum)`` either way, so both give the
        same gradient.

        ``iteration`` counts finished updates: it moves only once this one has finished (taken
        or skipped), so an exception inside it (a Cancel) leaves the counter, the weights and the
        optimizer as they were after the last finished update, and a retry draws the same noise.
        """
        s = self.settings
        start = time.perf_counter()
        iteration = self.iteration + 1  # the update being run (1-based); counted once finished
        self.optimizer.zero_grad(set_to_none=True)
        rewards, total_loss, k, reason = [], 0.0, 0, ""
        step_ckpt = None  # the sampler's own setting, unless blocks are checkpointed (below)
        frames = self.frames_for_update(iteration)  # video: the frames the reward scores
        with checkpoint_blocks(self.block_units, params=self.params, state=self._block_state), \
                checkpoint_blocks(self.selective_units, keep=KEEP_CONVOLUTIONS), self._statistics():
            for micro in range(s.grad_accum):
                g, rows_g = self._generators(micro, iteration)
                index = torch.cat([torch.randint(len(self.prompts), (1,), generator=r)
                                   for r in rows_g])
                noise = torch.cat([self._noise(1, r) for r in rows_g])
                with self._autocast():
                    tail = self.sampler.prefix(noise, index.to(self.device), generator=g,
                                               row_generators=rows_g)
                k = tail.k
                denoiser_blocks = (bool(self.block_units) if self.denoiser_blocks_checkpointed
                                   is None else self.denoiser_blocks_checkpointed)
                if denoiser_blocks:  # a single checkpointed step would only add a forward
                    step_ckpt = self.sampler.settings.checkpointing and (
                        tail.k > 1 or self.whole_step_over_blocks)
                groups = self._row_groups(tail.rows)
                for rows in groups:
                    n_rows = tail.rows if rows is None else len(rows)
                    with self._autocast():
                        rollout = self.sampler.tail(tail, rows, step_checkpoint=step_ckpt,
                                                    params=self.params)
                        images = self.decode_frames(rollout.latents, frames)
                        scores = self.score(images, self._prompts(rollout.prompt_index))
                        share = n_rows / tail.rows  # this group's part of the micro-batch mean
                        # -mean over the micro-batch's rows, split into per-group parts
                        loss = -scores.sum() / tail.rows
                        if s.kl_coeff:
                            loss = loss + s.kl_coeff * rollout.kl * share
                        for weight, fn in self.regularizers:
                            loss = loss + weight * fn(rollout, images) * share
                        loss = loss / s.grad_accum
                    if rows is None or int(rows[0]) == 0:
                        self.last_images = self.middle_frames(images.detach(), n_rows)[:1].float().cpu()
                    rewards += _host_list(scores.detach().cpu())
                    loss_value = _host_float(loss.detach())
                    if not math.isfinite(loss_value):
                        reason = "non-finite reward or loss"
                        break
                    total_loss += loss_value
                    if self.scaler is not None:
                        self.scaler.scale(loss).backward()
                    else:
                        loss.backward()
                    del rollout, images, scores, loss
                if reason:
                    break

        if self.parallel is not None:  # every process takes part, even one that failed
            total_loss, failed_elsewhere = self.parallel.reduce_update(
                self.params, total_loss, failed=bool(reason))
            if failed_elsewhere and not reason:
                reason = "non-finite reward or loss in another process"
            rewards = self.parallel.gather_rewards(
                rewards, (s.grad_accum, self.sampler.settings.samples_per_rollout, s.batch_size))
        grad_norm = float("nan")
        if not reason:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            max_norm = s.grad_clip if s.grad_clip > 0 else float("inf")
            grad_norm = _host_float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            if not math.isfinite(grad_norm):
                reason = "non-finite gradient"
        if reason:
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None and grad_norm == grad_norm:  # unscaled: let it back off
                self.scaler.update()
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        mean_reward = float(np.mean(rewards)) if rewards else float("nan")
        self.iteration = iteration
        report = StepReport(iteration=self.iteration, reward=mean_reward, rewards=rewards,
                            loss=total_loss, grad_norm=grad_norm, k=k, skipped=bool(reason),
                            skip_reason=reason, seconds=time.perf_counter() - start)
        self.history.append(mean_reward)
        return report

    def _generators(self, micro: int, iteration: int):
        """``(batch generator, [row generator per local row])`` of micro-batch ``micro`` of update
        ``iteration`` (1-based); rows are numbered globally (``rank * batch_size + local row``)
        when data-parallel."""
        s = self.settings
        first = self.parallel.rank * s.batch_size if self.parallel is not None else 0
        return (derived_generator(s.seed, iteration, micro),
                [derived_generator(s.seed, iteration, micro, ROW_STREAM, first + r)
                 for r in range(s.batch_size)])

    def _statistics(self):
        """While the rows of one update are scored: a reward with running statistics (Combine's
        standardisation) folds them in once per update, not once per row."""
        if self.row_by_row and self.reward_statistics is not None:
            return self.reward_statistics()
        return contextlib.nullcontext()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-sample rewards ``(B,)`` (float32) of decoded ``images`` (:func:`score_samples`
        with this trainer's reward): for videos, a video's reward is the mean over its frames (or
        a video reward's score of them), so the loss stays ``-mean`` over samples (videos)."""
        return score_samples(self.reward, images, prompts)

    def frames_for_update(self, iteration: int) -> Optional[tuple]:
        """The frames the reward scores in update ``iteration`` (video: indices among the decoded
        frames, a fresh draw per update for a random pick, from ``(seed, iteration)``); None for
        images or when every decoded frame is scored."""
        choice = self.frame_choice
        if choice is None or choice.every_frame:
            return None
        g = (derived_generator(self.settings.seed, iteration, FRAME_PICK_STREAM)
             if choice.pick == "random" else None)
        return choice.frames(g)

    def evaluation_frames(self) -> Optional[tuple]:
        """The frames held-out evaluations and previews score (a random pick: every decoded
        frame); None as in :meth:`frames_for_update`."""
        choice = self.frame_choice
        if choice is None or choice.every_frame:
            return None
        frames = choice.evaluation_frames()
        return None if len(frames) == choice.decoded_frames else frames

    def decode_frames(self, latents: torch.Tensor, frames: Optional[Sequence[int]] = None
                      ) -> torch.Tensor:
        """:meth:`decode_images`, and for a video with ``frames`` picked: only the latent frames
        those need are decoded (the time axis of ``(B,C,T,h,w)`` cut), and only the picked frames
        come back, ``(B*len(frames),3,H,W)`` (the others get no gradient)."""
        if frames is None:
            return self.decode_images(latents)
        needed = self.frame_choice.latent_frames_for(frames)
        images = self.decode_images(latents[:, :, :needed])
        per = _frames_per_sample(images, latents.shape[0])
        return images.unflatten(0, (latents.shape[0], per))[:, list(frames)].flatten(0, 1)

    @staticmethod
    def middle_frames(images: torch.Tensor, samples: int) -> torch.Tensor:
        """The middle frame of each of ``samples`` decoded samples (for a video decoder's
        ``(samples*F,3,H,W)``; images unchanged): what previews show."""
        frames = _frames_per_sample(images, samples)
        return images[frames // 2::frames] if frames > 1 else images

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """``self.decode`` in the memory format of ``channels_last_decode``: images (B,3,H,W),
        contiguous."""
        if not (self.channels_last_decode and latents.ndim == 4):
            return self.decode(latents)
        return self.decode(latents.contiguous(memory_format=torch.channels_last)).contiguous()

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, seeds: Sequence[int], prompt_index: Optional[Sequence[int]] = None
                 ) -> torch.Tensor:
        """Decoded images (N,3,H,W) in [0,1] for held-out ``seeds`` (one sample each; a video
        decoder's ``F`` frames each, those :meth:`evaluation_frames` picks: (N*F,3,H,W)), no grad.

        ``prompt_index`` defaults to cycling through the prompts."""
        if prompt_index is None:
            prompt_index = [i % len(self.prompts) for i in range(len(seeds))]
        images = []
        for seed, p in zip(seeds, prompt_index):
            g = derived_generator(seed, 0xE7A1)
            noise = self._noise(1, g)
            with self._autocast():
                latent = self.sampler.sample(noise, torch.tensor([p], device=self.device), g)
                images.append(self.decode_frames(latent, self.evaluation_frames()).float())
        return torch.cat(images)

    @torch.no_grad()
    def evaluate(self, seeds: Sequence[int], prompt_index: Optional[Sequence[int]] = None
                 ) -> torch.Tensor:
        """Per-seed rewards (N,) of :meth:`generate`'s images."""
        if prompt_index is None:
            prompt_index = [i % len(self.prompts) for i in range(len(seeds))]
        images = self.generate(seeds, prompt_index)
        with self._autocast():
            return self.score(images, [self.prompts[p] for p in prompt_index]).cpu()

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Optimizer, scaler and counters (the LoRA weights are saved separately)."""
        return {"iteration": self.iteration, "skipped_steps": self.skipped_steps,
                "history": list(self.history), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                **{name: part.state_dict() for name, part in self.state_parts.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.history = list(state.get("history", []))
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        for name, part in self.state_parts.items():
            if state.get(name) is not None:
                part.load_state_dict(state[name])
