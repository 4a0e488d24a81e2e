"""One DRaFT training run inside ComfyUI: model management, conditioning, the loop, saving.

The optimisation runs inside a single ``CFGGuider.sample()`` call (the idiom of ComfyUI's own
trainer): ComfyUI processes the conditioning, applies CFG and model patches, and we drive the
engine with the guider as the denoiser. Grad-free ComfyUI samplers are never used.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from PIL import Image

import comfy.model_management
import comfy.samplers
import comfy.sd
import comfy.utils
import node_helpers

from ..training import distributed
from ..training.heldout import HeldoutCheck
from ..training.lora import LoRASet
from ..training.memory_plan import (MemoryOptions, MemoryPlan, choose_plan, trainer_memory_kwargs,
                                    whole_step_over_blocks)
from ..training.plot import moving_average
from ..training.run_options import VideoOptions
from ..training.video_frames import FrameChoice
from ..training.sampler import DifferentiableSampler, OtherExpert, SamplerSettings, expert_steps
from ..training.trainer import DraftTrainer, StepReport, TrainSettings
from . import architectures, comfy_glue, lora_files, progress_events
from .reward_types import DeviceReward, clip_vision_encoder, own_image_encoder

log = logging.getLogger("ComfyUI-DRaFT")


@dataclass
class RunConfig:
    """Everything the trainer node's widgets say (see the node's tooltips)."""

    prompts: list
    negative_prompt: str
    sampler: SamplerSettings
    steps: int
    scheduler: str
    cfg: float
    width: int
    height: int
    train: TrainSettings
    rank: int
    alpha: float
    target_set: str
    mixed_precision: str
    save_every: int
    preview_every: int
    lora_name: str
    resume_lora: Optional[str] = None
    sigmas: Optional[torch.Tensor] = None
    node_id: Optional[str] = None
    reward_label: str = ""
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    guidance: Optional[float] = None  # embedded guidance (FluxGuidance's); None: the family's default
    heldout: Optional[object] = None  # DRaFT Held-out Check's HeldoutRequest; None: no check
    video: VideoOptions = field(default_factory=VideoOptions)  # DRaFT Video Settings (video families)
    experts: Optional[object] = None  # DRaFT Wan 2.2 Experts' WanExperts (Wan 2.2 A14B); None: one model


@dataclass
class RunResult:
    lora: LoRASet
    history: list
    skipped: list
    saved: list = field(default_factory=list)
    iteration: int = 0
    metadata: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # things the user should know (shown on the node)
    heldout: Optional[dict] = None  # the held-out check's summary (HeldoutCheck.summary)
    kept_iteration: Optional[int] = None  # the update whose LoRA the outputs carry (keep = best)


class _OptimisationLoop(comfy.samplers.Sampler):
    """A ComfyUI Sampler whose ``sample`` runs the whole training loop (then returns zeros)."""

    def __init__(self, body):
        self.body = body

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        self.body(self, model_wrap, sigmas, extra_args)
        return torch.zeros_like(latent_image)


def _encode(clip, text: str):
    """CLIPTextEncode's two lines; returns a one-entry CONDITIONING with normal (cloned) tensors."""
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    if len(cond) != 1:
        raise ValueError("scheduled CLIP hooks are not supported by DRaFT Trainer")
    return comfy_glue.clone_tensors(cond)


def _to_pil(image: torch.Tensor) -> Image.Image:
    arr = (image[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def _bar_preview(image: Optional[torch.Tensor]):
    """ComfyUI's progress-bar preview tuple for an image batch (its first image), or None."""
    return ("JPEG", _to_pil(image), 512) if image is not None else None


def _resolve_precision(choice: str, patcher) -> str:
    """``auto``: bf16 autocast where the device supports it, else fp16 with loss scaling on a GPU,
    float32 on the CPU. The UNet, VAE decode and reward then compute in half precision while the
    LoRA factors and AdamW's state stay float32."""
    if choice != "auto":
        return choice
    device = patcher.load_device
    if device.type == "cpu":
        return "no"
    if comfy.model_management.should_use_bf16(device):
        return "bf16"
    return "fp16"


def _prompt_denoiser(model_wrap, extra_args: dict, batcher):
    """``(x, sigma (B,), prompt index (B,)) -> x0`` through ComfyUI's model wrapper of a running
    ``sample``: each row gets its prompt's conditioning (``batcher``, a
    :class:`comfy_glue.PromptBatcher`); a Cancel in the UI stops it between model calls."""
    def denoise(x, sigma, index):
        comfy.model_management.throw_exception_if_processing_interrupted()
        model_wrap.conds["positive"] = [batcher(index.tolist())]
        return model_wrap(x, sigma, **extra_args)
    return denoise


def _step_ranges(steps: list) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"`` (1-based step numbers)."""
    out, start = [], None
    for i, n in enumerate(steps):
        if start is None:
            start = n
        if i + 1 == len(steps) or steps[i + 1] != n + 1:
            out.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ", ".join(out)


def clip_encoder(clip):
    """``prompt -> CONDITIONING`` with the checkpoint's CLIP (what CLIPTextEncode does)."""
    return lambda text: _encode(clip, text)


class TrainingRun:
    """Trains a LoRA on ``model`` to maximise ``reward``; see :meth:`run`.

    ``encode`` turns a prompt into a one-entry CONDITIONING (normally :func:`clip_encoder`).
    """

    def __init__(self, model, vae, encode, reward, config: RunConfig):
        self.model, self.vae, self.encode, self.reward, self.cfg = model, vae, encode, reward, config
        self.result: Optional[RunResult] = None
        self._base_fingerprint: Optional[str] = None  # of the base UNet, computed on first save
        self.check: Optional[HeldoutCheck] = None

    @property
    def heldout_prompts(self) -> list:
        return list(self.cfg.heldout.settings.prompts) if self.cfg.heldout is not None else []

    def _patchers(self) -> list:
        """Every model an update or an evaluation uses: loaded together, counted in the plan."""
        extra = []
        if self.cfg.heldout is not None:
            for judge in self.cfg.heldout.judges:
                extra += judge.patchers
            if self.cfg.heldout.clip_vision is not None:
                extra.append(self.cfg.heldout.clip_vision.patcher)
        if self.cfg.experts is not None:  # Wan 2.2 A14B: the other expert denoises its steps
            extra.append(self.cfg.experts.model)
        seen, out = set(), []
        for m in [self.model, self.vae.patcher, *self.reward.patchers, *extra]:
            if id(m) not in seen:  # a judge sharing the training reward's weights
                seen.add(id(m))
                out.append(m)
        return out

    # -- set-up ---------------------------------------------------------------------------------
    def _sigmas(self, patcher) -> torch.Tensor:
        sigmas = comfy_glue.sampling_schedule(patcher, self.cfg.sigmas, self.cfg.scheduler, self.cfg.steps)
        if sigmas.numel() < 2 or float(sigmas[-1]) != 0.0:
            raise ValueError("DRaFT needs a full sampling schedule that ends at sigma 0 "
                             "(use a scheduler node with denoise = 1)")
        return sigmas

    def _latent_shape(self, patcher) -> tuple:
        """``(C, h, w)``; ``(C, 1, h, w)`` for image families with a time axis (Qwen-Image);
        ``(C, T, h, w)`` for video families, ``T`` latent frames of DRaFT Video Settings'
        ``length`` (the family's usual by default)."""
        channels = patcher.model.latent_format.latent_channels
        down = self.vae.spacial_compression_encode()
        if self.cfg.width % down or self.cfg.height % down:
            raise ValueError(f"width and height must be multiples of {down}")
        spatial = (self.cfg.height // down, self.cfg.width // down)
        family = architectures.family_of(patcher)
        time = (1,) * (family.latent_dimensions - 2)
        if family.video_frames:
            time = (self.cfg.video.latent_frames(family.video_frames, family.time_compression),)
        return (channels, *time, *spatial)

    def _frame_choice(self, latent_shape) -> Optional[FrameChoice]:
        """The frames of each video the reward scores (video families), or None (images)."""
        family = architectures.family_of(self.model)
        if not family.video_frames:
            return None
        return self.cfg.video.frame_choice(latent_shape[1], family.time_compression)

    def _decoded_latent_frames(self, latent_shape) -> Optional[int]:
        """The most latent frames the decoder decodes for the reward (video families: those the
        scored frames need at most), or None (images)."""
        choice = self._frame_choice(latent_shape)
        return None if choice is None else choice.most_latent_frames

    def _guidance_cfg(self) -> tuple:
        """``(cfg scale, embedded guidance or None)`` for this model's family: cfg 0 means the
        family's default (1 for guidance-distilled FLUX); the guidance value goes on the
        conditioning the way ComfyUI's FluxGuidance node puts it there."""
        family = architectures.family_of(self.model)
        cfg = self.cfg.cfg if self.cfg.cfg else family.default_cfg
        if family.guidance_distilled and cfg > 1.0:
            log.warning("DRaFT: cfg %.2f on %s, a guidance-distilled model: the negative branch "
                        "doubles the cost and over-saturates; cfg 1 (or 0 = auto) is usual",
                        cfg, family.name)
        guidance = architectures.guidance_value(self.model)
        if guidance is not None and self.cfg.guidance is not None:
            guidance = float(self.cfg.guidance)
        return cfg, guidance

    def _initial_lora(self, diffusion_model, names):
        cfg = self.cfg
        if cfg.resume_lora:
            return lora_files.load_for_resume(cfg.resume_lora, diffusion_model, names, self.model)
        return comfy_glue.build_lora(diffusion_model, names, cfg.rank, cfg.alpha, cfg.train.seed), None

    def _memory_plan(self, patcher, latent_shape) -> MemoryPlan:
        """Fast or lean settings for this device (DRaFT Memory Options; ``auto`` by default),
        decided before anything is loaded; fails here, not mid-run, when nothing fits."""
        cfg = self.cfg
        mm = comfy.model_management
        device = patcher.load_device
        models = [patcher, *self._patchers()[1:]]
        weights = sum(m.model_size() for m in models)
        resident = sum(m.loaded_size() for m in models if m.current_loaded_device() == device)
        available = mm.get_free_memory(device) + resident - weights
        decode, denoiser_row = comfy_glue.update_memory_inputs(
            patcher, self.vae, latent_shape, self._decoded_latent_frames(latent_shape))
        plan = choose_plan(
            cfg.memory, rows=cfg.train.batch_size * cfg.sampler.samples_per_rollout,
            cfg_branches=1 if self.cfg_scale == 1.0 else 2, decode_bytes=decode,
            denoiser_row_bytes=denoiser_row, available_bytes=int(available),
            streamable_bytes=int(patcher.model_size()) if device.type != "cpu" else 0,
            hint=f" (now {cfg.width}x{cfg.height}, batch {cfg.train.batch_size}, "
                 f"n = {cfg.sampler.lv_samples})",
            denoiser_factors=architectures.memory_factors(patcher),
            decode_factors=architectures.decode_factors(patcher))
        log.info("DRaFT memory: %s", plan.describe())
        return plan

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg = self.cfg
        cfg_scale, guidance = self._guidance_cfg()

        def encode(text):
            cond = self.encode(text)
            if guidance is not None:  # what FluxGuidance does
                cond = node_helpers.conditioning_set_values(cond, {"guidance": guidance})
            return cond

        positive = []
        for p in cfg.prompts + self.heldout_prompts:  # held-out ones after: never drawn in training
            positive += encode(p)
        negative = encode(cfg.negative_prompt)
        self.cfg_scale, self.guidance = cfg_scale, guidance

        patcher = self.model.clone()
        diffusion_model = patcher.model.diffusion_model
        names = comfy_glue.target_module_names(patcher, cfg.target_set)
        lora, resume_state = self._initial_lora(diffusion_model, names)
        comfy_glue.attach_lora(patcher, lora)
        sigmas = self._sigmas(patcher)
        latent_shape = self._latent_shape(patcher)
        rows = cfg.train.batch_size * cfg.sampler.samples_per_rollout

        plan = self._memory_plan(patcher, latent_shape)
        if plan.cond_only:
            patcher.set_model_sampler_calc_cond_batch_function(comfy_glue.conditional_only_cfg)
        elif whole_step_over_blocks(plan, self._decoded_latent_frames(latent_shape) is not None):
            # one CFG branch at a time in the differentiated step's backward
            patcher.set_model_sampler_calc_cond_batch_function(
                comfy_glue.branches_apart_cfg(lora))
        comfy.model_management.load_models_gpu(
            [patcher, *self._patchers()[1:]],
            memory_required=plan.estimate_bytes, minimum_memory_required=plan.lean_bytes)

        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg_scale)
        self._state = dict(patcher=patcher, lora=lora, resume_state=resume_state,
                           latent_shape=latent_shape, names=names, plan=plan)
        zeros = torch.zeros((rows,) + latent_shape)
        body = self._body
        if cfg.experts is not None:
            body = self._with_other_expert(positive, negative, cfg_scale, zeros)
        try:
            guider.sample(zeros, zeros, _OptimisationLoop(body), sigmas, seed=cfg.train.seed)
        finally:
            comfy_glue.detach_lora(patcher.model)
        return self.result

    def _with_other_expert(self, positive, negative, cfg_scale, zeros):
        """The loop's body with Wan 2.2 A14B's other expert: a second CFGGuider on it, with the same
        prompts and cfg, whose ``sample`` runs inside the trained model's (ComfyUI processes its
        conditioning and patches as for any sampling), handing the body its model wrapper."""
        other = comfy.samplers.CFGGuider(self.cfg.experts.model)
        other.set_conds(positive, negative)
        other.set_cfg(cfg_scale)

        def body(loop, model_wrap, sigmas, extra_args):
            inner = _OptimisationLoop(lambda _loop, other_wrap, _sigmas, other_args: self._body(
                loop, model_wrap, sigmas, extra_args, other=(other_wrap, other_args)))
            other.sample(zeros, zeros, inner, sigmas.cpu(), seed=self.cfg.train.seed)
        return body

    def _other_expert(self, other, sigmas, notes: list) -> OtherExpert:
        """Wan 2.2 A14B's other expert as the sampler's :class:`OtherExpert` (its steps from the
        boundary), and a note saying which expert is trained on which steps."""
        wrap, args = other
        experts = self.cfg.experts
        comfy_glue.de_inference_(wrap.inner_model)  # its steps after a trained one carry x's gradient
        denoise = _prompt_denoiser(wrap, args, comfy_glue.PromptBatcher(list(wrap.conds["positive"])))
        steps = expert_steps(sigmas.float().cpu(), experts.boundary, experts.trained)
        total = sigmas.numel() - 1
        mine = [i + 1 for i in range(total) if i not in steps]
        s = self.cfg.sampler
        if s.method == "random_k":
            tail = (f"the last K (K from {s.k_min} to {s.k_max}), from the first of them that is "
                    "the trained expert's")
        else:
            first = total - s.truncation_range(total)[0]
            while first < total and first in steps:
                first += 1
            tail = f"{_step_ranges(list(range(first + 1, total + 1)))}"
        notes.append(
            f"Wan 2.2 experts: training the {experts.trained} expert (the trainer's model), which "
            f"denoises steps {_step_ranges(mine) or 'none'} of {total}; the {experts.other} expert "
            f"(DRaFT Wan 2.2 Experts) denoises steps "
            f"{_step_ranges(sorted(i + 1 for i in steps)) or 'none'} and is not trained (boundary: "
            f"sigma {experts.boundary:g}); differentiated steps: {tail}")
        return OtherExpert(denoise, steps)

    def _body(self, loop, model_wrap, sigmas, extra_args, other=None):
        cfg, st = self.cfg, self._state
        inner = model_wrap.inner_model
        for module in (inner, self.vae.first_stage_model, self.reward.model):
            comfy_glue.de_inference_(module)
        batcher = comfy_glue.PromptBatcher(list(model_wrap.conds["positive"]))
        if len(batcher.entries) != len(cfg.prompts) + len(self.heldout_prompts):
            raise RuntimeError("conditioning entries do not match the prompts (area or hook conds?)")
        ms = inner.model_sampling
        lora: LoRASet = st["lora"]

        denoise = _prompt_denoiser(model_wrap, extra_args, batcher)

        def reference(x, sigma, index):
            with lora.disabled():
                return denoise(x, sigma, index)

        notes = []
        other_expert = self._other_expert(other, sigmas, notes) if other is not None else None
        max_denoise = loop.max_denoise(model_wrap, sigmas)
        sampler = DifferentiableSampler(
            denoise, sigmas.float().cpu(), cfg.sampler,
            renoise=lambda s, n, x0: ms.noise_scaling(s, n, x0),
            reference_denoise=reference if cfg.train.kl_coeff else None,
            initial_latent_fn=lambda n: ms.noise_scaling(sigmas[0].to(n), n, torch.zeros_like(n),
                                                         max_denoise),
            other_expert=other_expert)
        reward_model = self.reward.model
        reward_fn = DeviceReward(reward_model, self.reward.device, sigmas.device)

        settings = TrainSettings(**{**cfg.train.__dict__, "mixed_precision": _resolve_precision(
            cfg.mixed_precision, st["patcher"])})
        plan: MemoryPlan = st["plan"]
        memory = {}
        if plan.block_checkpointing:  # which modules each way checkpoints: trainer_memory_kwargs
            units = comfy_glue.denoiser_checkpoint_units(inner.diffusion_model)
            if other is not None:  # its tail steps after a trained one run under gradient too
                units += comfy_glue.denoiser_checkpoint_units(other[0].inner_model.diffusion_model)
            memory = dict(
                denoiser_units=units,
                decoder_units=comfy_glue.decoder_checkpoint_units(self.vae.first_stage_model),
                reward_units=(reward_model.checkpoint_units()
                              if hasattr(reward_model, "checkpoint_units") else ()))
        decoded = self._decoded_latent_frames(st["latent_shape"])
        decoder = comfy_glue.make_decoder(self.vae, inner, decoded)
        trainer = DraftTrainer(sampler, decoder, reward_fn,
                               cfg.prompts, lora, st["latent_shape"], settings,
                               device=st["patcher"].load_device,
                               **trainer_memory_kwargs(plan, **memory, video=decoded is not None),
                               # NCHW on a GPU unless ComfyUI was started with --force-channels-last
                               channels_last_decode=comfy.model_management.force_channels_last() or None,
                               reward_statistics=getattr(reward_model, "deferred_statistics", None),
                               parallel=distributed.current(check=self.reward.model),
                               frame_choice=self._frame_choice(st["latent_shape"]))
        if cfg.heldout is not None:
            self.check = self._heldout_check(trainer, notes)
            trainer.state_parts["heldout"] = self.check
        if st["resume_state"] is not None:
            trainer.load_state_dict(st["resume_state"])
            if self.check is not None and st["resume_state"].get("heldout") and not self.check.history:
                notes.append(f"{cfg.resume_lora}: its held-out history has other figures (judges "
                             "or similarity source changed): this run starts a new one")
        result = RunResult(lora=lora, history=list(trainer.history), skipped=[],
                           iteration=trainer.iteration, notes=notes)
        if st["resume_state"] is not None and st["resume_state"].get("fresh_optimizer"):
            note = (f"resumed {cfg.resume_lora} without its .draft_state side file: continuing "
                    f"from iteration {trainer.iteration} with a fresh optimizer (AdamW moments "
                    "restart, so the run is not bit-identical to an uninterrupted one)")
            log.warning("DRaFT: %s", note)
            result.notes.append(note)
            progress_events.node_text(cfg.node_id, note)
        for note in notes:
            log.warning("DRaFT: %s", note)
            progress_events.node_text(cfg.node_id, note)
        self.result = result
        self._loop(trainer, result)

    def _heldout_check(self, trainer: DraftTrainer, notes: list) -> HeldoutCheck:
        """The held-out check of this run: judges as no-grad callables on their devices, the
        similarity's image encoder (CLIP_VISION, else a judge's or the training reward's own)."""
        cfg, request = self.cfg, self.cfg.heldout
        judges = [(j.label or f"judge {i + 1}", DeviceReward(j.model, j.device))
                  for i, j in enumerate(request.judges)]
        embed = None
        if request.clip_vision is not None:
            cv = request.clip_vision
            encoder, transform = clip_vision_encoder(cv)
            embed = ("CLIP vision", lambda images: encoder(
                transform(images.to(cv.load_device, torch.float32))).float())
        else:
            for handle in (*request.judges, self.reward):
                encoder = own_image_encoder(handle)
                if encoder is not None:
                    embed = (f"{handle.label or 'reward'}'s image encoder", encoder)
                    break
        overlap = sorted(set(cfg.prompts) & set(request.settings.prompts))
        if overlap:
            notes.append(f"held-out check: {len(overlap)} held-out prompt(s) are also training "
                         f"prompts ({overlap[0]!r}...): those figures are not held out")
        parallel = trainer.parallel
        rows = cfg.train.batch_size * cfg.sampler.samples_per_rollout  # the plan has room for these
        return HeldoutCheck(
            request.settings, judges, reward_label=cfg.reward_label, embed=embed,
            prompt_offset=len(cfg.prompts),
            chunk=max(4, rows), decode_rows=rows,
            share=parallel.broadcast_values if parallel is not None else None)

    def _metadata(self, trainer: DraftTrainer, partial: bool) -> dict:
        cfg = self.cfg
        if self._base_fingerprint is None:  # the base weights never change during a run
            self._base_fingerprint = lora_files.base_fingerprint(self.model)
        s = cfg.sampler
        return {
            "method": s.method, "k": s.k, "k_min": s.k_min, "k_max": s.k_max,
            "lv_samples": s.lv_samples, "eta": s.eta, "reward": cfg.reward_label,
            "steps": len(cfg.sigmas) - 1 if cfg.sigmas is not None else cfg.steps,
            "scheduler": cfg.scheduler if cfg.sigmas is None else "custom sigmas",
            "cfg": self.cfg_scale, "guidance": self.guidance, "iterations": cfg.train.iterations, "iteration": trainer.iteration,
            "learning_rate": cfg.train.learning_rate, "weight_decay": cfg.train.weight_decay,
            "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "seed": cfg.train.seed, "prompts": json.dumps(cfg.prompts),
            "negative_prompt": cfg.negative_prompt, "resolution": f"{cfg.width}x{cfg.height}",
            "kl_coeff": cfg.train.kl_coeff, "target_modules": cfg.target_set,
            "partial": partial, "skipped_steps": trainer.skipped_steps,
            "base_model_fingerprint": self._base_fingerprint,
            **distributed.metadata(trainer.parallel, cfg.train.batch_size),
            **({"wan22_expert": cfg.experts.trained, "wan22_boundary": cfg.experts.boundary}
               if cfg.experts is not None else {}),
        }

    def _save(self, trainer: DraftTrainer, result: RunResult, partial: bool, tag: str,
              meta: Optional[dict] = None):
        if trainer.parallel is not None and not trainer.parallel.is_main:
            return None  # data-parallel: rank 0 writes the files
        path = lora_files.save_training_lora(
            self.cfg.lora_name, tag, result.lora, self.model,
            meta if meta is not None else self._metadata(trainer, partial), trainer=trainer)
        if path not in result.saved:
            result.saved.append(path)
        log.info("DRaFT: saved LoRA %s", path)
        return path

    def _save_best(self, trainer: DraftTrainer, result: RunResult) -> Optional[str]:
        """``<lora_name>_best.safetensors`` (and its side file, to resume from the best): the LoRA
        now in the weights, which the check has just found best; replaced atomically."""
        meta = self._metadata(trainer, partial=trainer.iteration < self.cfg.train.iterations)
        meta.update(self._best_metadata())
        return self._save(trainer, result, partial=meta["partial"], tag="best", meta=meta)

    def _best_metadata(self) -> dict:
        check = self.check
        out = {"best_iteration": check.best_iteration(),
               "heldout_labels": json.dumps({s.key: s.label for s in check.series})}
        for key, value in check.best["figures"].items():
            out[f"heldout_{key}"] = value
        return out

    def _evaluate(self, trainer: DraftTrainer, result: RunResult, events):
        """One held-out evaluation: figures, best (saved when new), events; returns the Outcome."""
        check = self.check
        outcome = check.observe(check.evaluate(trainer), trainer.params)
        if outcome.new_best:
            self._save_best(trainer, result)
        figures = ", ".join(f"{s.label} {outcome.record['figures'][s.key]:.5g}"
                            for s in check.series if s.key in outcome.record["figures"])
        log.info("DRaFT held-out at update %d: %s%s", trainer.iteration, figures,
                 " (best so far)" if outcome.new_best else "")
        result.heldout = check.summary()
        events.heldout(result.heldout, outcome.record)
        return outcome

    def _keep(self, trainer: DraftTrainer, result: RunResult) -> None:
        """After the last update: with ``keep = best`` the LoRA goes back to the best evaluated
        one (the last is saved first, as ``<lora_name>_stepNNNNN``, unless it already is)."""
        check = self.check
        best = check.best_iteration() if check is not None else None
        if check is None or check.settings.keep != "best" or best is None \
                or best == trainer.iteration:
            return
        tag = f"step{trainer.iteration:05d}"
        if not any(os.path.basename(p).endswith(f"_{tag}.safetensors") for p in result.saved):
            self._save(trainer, result, partial=False, tag=tag)
        with torch.no_grad():
            for p, v in zip(trainer.params, check.best_lora):
                p.copy_(v.to(p.device, p.dtype))
        result.kept_iteration = best

    def _loop(self, trainer: DraftTrainer, result: RunResult):
        cfg = self.cfg
        total = cfg.train.iterations
        check = self.check
        bar = comfy.utils.ProgressBar(total)
        events = progress_events.RunEvents(
            cfg.node_id, total, start=trainer.iteration, history=list(trainer.history),
            heldout=check.summary() if check is not None and check.history else None)
        preview_seed = cfg.train.seed + 104729
        stopped = ""
        try:
            if check is not None and check.due(trainer.iteration):  # update 0: the base model
                self._evaluate(trainer, result, events)
            while trainer.iteration < total:
                report: StepReport = trainer.step()
                result.history.append(report.reward)
                result.iteration = trainer.iteration
                if report.skipped:
                    result.skipped.append(report.iteration)
                    log.warning("DRaFT: iteration %d skipped (%s)", report.iteration, report.skip_reason)
                saved = None
                if cfg.save_every and trainer.iteration % cfg.save_every == 0:
                    saved = self._save(trainer, result, partial=trainer.iteration < total,
                                       tag=f"step{trainer.iteration:05d}")
                # The finished update is logged, charted and counted before anything that can be
                # interrupted (the preview's sampling) runs: a Cancel there loses none of them.
                ma = moving_average(result.history)[-1]
                log.info("DRaFT iteration %d/%d reward %.5f (mean of 10: %.5f) %.2fs%s",
                         trainer.iteration, total, report.reward, ma, report.seconds,
                         " SKIPPED" if report.skipped else "")
                events.point(report, ma, saved=saved)
                bar.update_absolute(trainer.iteration, total, _bar_preview(trainer.last_images))
                if cfg.preview_every and trainer.iteration % cfg.preview_every == 0:
                    bar.update_absolute(trainer.iteration, total,
                                        _bar_preview(trainer.middle_frames(
                                            trainer.generate([preview_seed], [0]), 1)))
                if check is not None and check.due(trainer.iteration):
                    outcome = self._evaluate(trainer, result, events)
                    if outcome.stop:
                        stopped = outcome.reason
                        log.info("DRaFT: stopped after update %d: %s", trainer.iteration, stopped)
                        break
            if check is not None and not check.evaluated(trainer.iteration):
                self._evaluate(trainer, result, events)  # the last LoRA, for 'keep'
        except comfy.model_management.InterruptProcessingException:
            # trainer.iteration counts finished updates only: the interrupted one left no trace.
            if trainer.iteration == events.start_iteration:
                note = (f"cancelled before update {trainer.iteration + 1} finished: nothing saved "
                        "(no update of this run is in the weights)")
                if result.saved:  # the held-out check's best: the LoRA this run started from
                    note = (f"cancelled before update {trainer.iteration + 1} finished (no update of "
                            f"this run is in the weights); the held-out check's best, update "
                            f"{trainer.iteration}, is {lora_files.relative_to_loras(result.saved[-1])}")
                log.info("DRaFT: %s", note)
                events.finished(interrupted=True, saved=None)
                progress_events.set_summary(cfg.node_id, note)
                raise
            path = self._save(trainer, result, partial=True, tag=f"step{trainer.iteration:05d}_partial")
            events.finished(interrupted=True, saved=path)
            progress_events.set_summary(cfg.node_id, f"cancelled after {trainer.iteration} updates; "
                                                     f"saved {lora_files.relative_to_loras(path)}")
            raise
        self._keep(trainer, result)
        events.finished(interrupted=False, saved=result.saved[-1] if result.saved else None,
                        stop_reason=stopped)
        result.metadata = self._metadata(trainer, partial=False)
        if check is not None and check.best is not None:
            result.metadata.update(self._best_metadata())
            result.metadata["kept"] = check.settings.keep
            if stopped:
                result.metadata["stopped"] = stopped
            if result.kept_iteration is not None:
                result.metadata["iteration"] = result.kept_iteration

    # -- outputs --------------------------------------------------------------------------------
    def model_with_lora(self, strength: float = 1.0):
        """The input MODEL with the trained LoRA applied through ComfyUI's LoRA loader."""
        sd = comfy_glue.lora_to_comfy_state_dict(self.result.lora)
        model, _ = comfy.sd.load_lora_for_models(self.model, None, sd, strength, 0)
        return model, sd

