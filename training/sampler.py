"""Differentiable DDIM sampling in sigma space, truncated for DRaFT, DRaFT-K, DRaFT-LV and random K.

Notation (ComfyUI's, which is k-diffusion's):

* ``x = a(sigma) * x0 + sigma * eps`` with ``a = 1`` for EPS and v-prediction models (the "VE" view
  of a VP model: ``sigma = sqrt((1 - alphabar) / alphabar)``) and ``a = 1 - sigma`` for flow models.
  ``a`` is read off the model's own re-noising function (``renoise(sigma, 0, 1)``), so the sampler
  never needs to know the model type.
* A denoiser maps ``(x (B,C,H,W), sigma (B,), prompt_index (B,) long) -> x0 (B,C,H,W)``; in ComfyUI it
  is the CFG-combined prediction of the guider.

One DDIM step from ``sigma`` to ``sigma_next`` (Song et al. 2021, eq. 12, in this notation):

    eps_hat = (x - a * x0) / sigma
    c       = eta * sigma_next * sqrt(1 - (a^2 sigma_next^2) / (a_next^2 sigma^2))
    x_next  = a_next * x0 + sqrt(sigma_next^2 - c^2) * eps_hat + c * z,    z ~ N(0, I)

With ``eta = 0`` this is deterministic DDIM, identical to the Euler step ``x + (x - x0)/sigma *
(sigma_next - sigma)`` for every model type; with ``a = 1`` the stochastic part is k-diffusion's
ancestral step (``sigma_up = c``). The last step (``sigma_next = 0``) returns ``x0``.

Gradient truncation (DRAFT_METHOD.md):

* ``draft``: every step differentiated;
* ``draft_k``: steps ``1..T-K`` under ``torch.no_grad()``, the last ``K`` differentiated;
* ``random_k``: like ``draft_k`` with ``K`` drawn uniformly from ``[k_min, k_max]`` per update
  (AlignProp);
* ``draft_lv``: the whole chain without gradient gives ``x0``; ``n`` fresh noises re-noise it to the
  last step's level, ``x1_i = renoise(sigma_last, eps_i, x0)``, and one differentiated step from each
  gives ``x0_hat_i``; the caller averages the reward over the ``n`` samples. Optionally the chain's
  own last step is differentiated too (``n + 1`` terms).

Two experts (Wan 2.2 A14B): an :class:`OtherExpert` denoises the steps on its side of a boundary
(:func:`expert_steps`), never with gradient into its weights; the trained denoiser the rest. A
tail step of the other expert *before* the first trained step carries no gradient (nothing trained
precedes it) and joins the no-grad prefix; one *after* a trained step (training the high-noise
expert with a K reaching back past the boundary) is differentiated through its input only. A tail
with no trained step is refused (:func:`tail_problem`).

Each differentiated step runs under activation checkpointing when ``checkpointing`` is on: only
the latent entering the step is stored, the denoiser's activations are recomputed in the backward
pass, so activation memory does not grow with ``K``. Given the trained parameters (the trainer
passes them), the step's first forward builds no autograd graph at all
(:mod:`training.step_checkpoint`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .step_checkpoint import recomputed_step

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Renoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

METHODS = ("draft", "draft_k", "draft_lv", "random_k")


def ve_renoise(sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``x0 + sigma * noise``: the re-noising of EPS / v-prediction models in sigma space."""
    return x0 + _per_sample(sigma, noise) * noise


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a scalar or (B,) tensor to broadcast against ``like`` (B, ...)."""
    value = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if value.ndim == 0:
        return value
    return value.reshape(value.shape[:1] + (1,) * (like.ndim - 1))


def signal_scale(renoise: Renoise, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``a(sigma)``: the factor on ``x0`` in ``x = a x0 + sigma eps``, read off ``renoise``.

    Returns a tensor broadcastable against ``like`` (B, C, H, W).
    """
    shape = (like.shape[0],) + (1,) * (like.ndim - 1)
    sigma_b = torch.as_tensor(sigma, device=like.device, dtype=like.dtype).expand(like.shape[0])
    zeros = torch.zeros(shape, device=like.device, dtype=like.dtype)
    ones = torch.ones(shape, device=like.device, dtype=like.dtype)
    return renoise(sigma_b, zeros, ones)


def ddim_step(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
              a: torch.Tensor, a_next: torch.Tensor, eta: float = 0.0,
              noise: Optional[torch.Tensor] = None, last: Optional[bool] = None) -> torch.Tensor:
    """One DDIM update in sigma space (see the module docstring for the formula).

    Args:
        x: the latent at ``sigma`` (B, C, H, W); x0: the denoiser's prediction at ``sigma``.
        sigma, sigma_next: scalar tensors, ``sigma > sigma_next >= 0``.
        a, a_next: signal scales at ``sigma`` and ``sigma_next`` (see :func:`signal_scale`).
        eta: 0 is deterministic DDIM; 1 is DDPM-like ancestral sampling.
        noise: ``z`` for ``eta > 0``, shaped like ``x``.
        last: whether ``sigma_next`` is 0 (read off ``sigma_next`` when not given).
    """
    if last is None:
        last = float(sigma_next) == 0.0
    if last:
        return x0
    eps_hat = (x - a * x0) / sigma
    if eta == 0.0:
        return a_next * x0 + sigma_next * eps_hat
    ratio = (a * sigma_next) ** 2 / ((a_next * sigma) ** 2)
    c = eta * sigma_next * torch.sqrt(torch.clamp(1.0 - ratio, min=0.0))
    return a_next * x0 + torch.sqrt(sigma_next ** 2 - c ** 2) * eps_hat + c * noise


@dataclass(frozen=True)
class SamplerSettings:
    """How the sampler runs and which steps carry gradients.

    Attributes:
        method: one of ``METHODS``.
        k: differentiated steps for ``draft_k`` (1 <= k <= T); ``draft`` uses T, ``draft_lv`` 1.
        k_min, k_max: the range ``random_k`` draws K from, uniformly, inclusive.
        lv_samples: ``n``, the re-noised single-step samples of ``draft_lv`` (paper: 2).
        lv_include_original: ``draft_lv`` also differentiates the chain's own last step (n + 1 terms).
        eta: DDIM stochasticity in [0, 1]; 0 (deterministic) in the paper.
        checkpointing: recompute each differentiated step's activations in the backward pass.
    """

    method: str = "draft_lv"
    k: int = 1
    k_min: int = 1
    k_max: int = 10
    lv_samples: int = 2
    lv_include_original: bool = False
    eta: float = 0.0
    checkpointing: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown DRaFT method {self.method!r}; choose one of {METHODS}")
        if self.k < 1 or self.k_min < 1 or self.k_max < self.k_min:
            raise ValueError(f"need 1 <= k and 1 <= k_min <= k_max (got k={self.k}, "
                             f"k_min={self.k_min}, k_max={self.k_max})")
        if self.lv_samples < 1:
            raise ValueError(f"lv_samples must be >= 1, got {self.lv_samples}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")

    def truncation_range(self, num_steps: int) -> tuple:
        """``(fewest, most)`` differentiated trailing steps of one update, K capped at
        ``num_steps`` (random K: ``[k_min, k_max]``; the others: one value)."""
        if self.method == "draft":
            return num_steps, num_steps
        if self.method == "draft_lv":
            return 1, 1
        if self.method == "draft_k":
            return min(self.k, num_steps), min(self.k, num_steps)
        hi = min(self.k_max, num_steps)
        return min(self.k_min, hi), hi

    def truncation(self, num_steps: int, generator: Optional[torch.Generator] = None) -> int:
        """The number of differentiated trailing steps for one update, in ``[1, num_steps]``."""
        if self.method == "draft_k" and self.k > num_steps:
            raise ValueError(f"K = {self.k} exceeds the {num_steps} sampling steps")
        lo, hi = self.truncation_range(num_steps)
        if self.method != "random_k":
            return lo
        return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())

    @property
    def samples_per_rollout(self) -> int:
        """How many decoded latents one rollout yields per batch row."""
        if self.method != "draft_lv":
            return 1
        return self.lv_samples + (1 if self.lv_include_original else 0)


@dataclass(frozen=True)
class OtherExpert:
    """A second denoiser for some steps of the schedule (Wan 2.2 A14B's expert that is not trained).

    Attributes:
        denoise: ``(x, sigma (B,), prompt_index (B,)) -> x0``, like the sampler's; its weights are
            frozen (only the sampler's own denoiser is trained).
        steps: the 0-based steps it denoises (:func:`expert_steps`).
    """

    denoise: Denoiser
    steps: frozenset


EXPERT_SIDES = ("low noise", "high noise")


def expert_steps(sigmas, boundary: float, trained: str) -> frozenset:
    """The 0-based steps of ``sigmas`` (T + 1 values) that the *other* expert denoises when the
    ``trained`` one (``"low noise"`` or ``"high noise"``) is the sampler's denoiser. Wan 2.2 picks
    the expert by the step's timestep: the high-noise one while ``t >= boundary * 1000``, i.e.
    ``sigma >= boundary`` for its flow schedule (``t = 1000 sigma``); 0.875 for T2V A14B, 0.9 for
    I2V A14B."""
    if trained not in EXPERT_SIDES:
        raise ValueError(f"trained expert must be one of {EXPERT_SIDES}, got {trained!r}")
    values = torch.as_tensor(sigmas, dtype=torch.float32).flatten()[:-1]  # ComfyUI's schedules' dtype
    high = {i for i, is_high in enumerate((values >= torch.tensor(boundary, dtype=torch.float32))
                                          .tolist()) if is_high}
    other = high if trained == "low noise" else set(range(values.numel())) - high
    return frozenset(other)


def tail_problem(settings: "SamplerSettings", num_steps: int, other_steps) -> Optional[str]:
    """Why an update of ``settings`` could differentiate only steps of the other expert (its
    tail, the last K steps, all in ``other_steps``), or None. Says which K would reach the
    trained expert's steps."""
    other = frozenset(other_steps or ())
    k = settings.truncation_range(num_steps)[0]
    if not other or any(i not in other for i in range(num_steps - k, num_steps)):
        return None
    trained = [i for i in range(num_steps) if i not in other]
    what = {"draft_lv": "DRaFT-LV differentiates only the last step",
            "draft_k": f"DRaFT-K with K = {k} differentiates steps {num_steps - k + 1}-{num_steps}",
            "random_k": f"random K from k_min = {k} differentiates steps {num_steps - k + 1}-{num_steps}"
            }.get(settings.method, "")
    if not trained:
        return (f"{what}, and every one of the {num_steps} steps belongs to the other expert: "
                "the trained expert denoises none (check the boundary)")
    need = num_steps - max(trained)
    return (f"{what}, which the other expert denoises: the trained expert's last step is step "
            f"{max(trained) + 1} of {num_steps}, so no gradient would reach it; train the other "
            f"expert, or use DRaFT-K with K >= {need} (random K: k_min >= {need})")


@dataclass
class Rollout:
    """What one differentiable rollout returns.

    Attributes:
        latents: (B * r, C, H, W), ``r = samples_per_rollout``, ordered sample-major: rows
            ``[j*B:(j+1)*B]`` are the j-th sample of every batch row. Differentiable w.r.t. the
            parameters the denoiser uses on the differentiated steps.
        prompt_index: (B * r,) the prompt index of each row.
        k: the number of differentiated steps of this rollout.
        kl: mean squared difference between the denoiser's and the reference denoiser's noise
            predictions on the differentiated steps (0 without a reference), differentiable.
    """

    latents: torch.Tensor
    prompt_index: torch.Tensor
    k: int
    kl: torch.Tensor


class DifferentiableSampler:
    """Runs a sigma schedule through a denoiser with DRaFT's gradient truncation.

    Args:
        denoise: ``(x, sigma (B,), prompt_index (B,)) -> x0``.
        sigmas: (T + 1,) decreasing, ending in 0 (ComfyUI's schedules do).
        settings: :class:`SamplerSettings`.
        renoise: ``(sigma (B,), noise, x0) -> x``, the model's re-noising (default :func:`ve_renoise`;
            in ComfyUI ``model_sampling.noise_scaling``).
        reference_denoise: optional frozen-model denoiser for DRaFT+'s KL term.
        initial_latent_fn: optional ``noise -> x_T``; default ``renoise(sigma_max, noise, 0)``
            (ComfyUI's samplers scale EPS noise by ``sqrt(1 + sigma_max^2)`` at full denoise).
        other_expert: optional :class:`OtherExpert` denoising some steps instead of ``denoise``
            (Wan 2.2 A14B; see the module docstring).
    """

    def __init__(self, denoise: Denoiser, sigmas: torch.Tensor, settings: SamplerSettings,
                 renoise: Renoise = ve_renoise, reference_denoise: Optional[Denoiser] = None,
                 initial_latent_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 other_expert: Optional[OtherExpert] = None):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
        if sigmas.numel() < 2:
            raise ValueError("need at least one sampling step (two sigmas)")
        if not bool((sigmas[:-1] > sigmas[1:]).all()):
            raise ValueError("sigmas must be strictly decreasing")
        self.denoise = denoise
        self.sigmas = sigmas
        self._sigma_values = sigmas.tolist()  # Python floats: no device sync (and fake-tensor safe)
        self.settings = settings
        self.renoise = renoise
        self.reference_denoise = reference_denoise
        self.initial_latent_fn = initial_latent_fn
        self.other_expert = other_expert
        self.step_checkpoint_state: dict = {}  # training.step_checkpoint's, shared by every step

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    def trained_step(self, i: int) -> bool:
        """Whether step ``i`` (0-based) is the trained denoiser's (not the other expert's)."""
        return self.other_expert is None or i not in self.other_expert.steps

    # -- pieces ---------------------------------------------------------------------------------
    def initial_latent(self, noise: torch.Tensor) -> torch.Tensor:
        """``x_T`` from standard normal noise: ``renoise(sigma_max, noise, 0)`` unless overridden."""
        if self.initial_latent_fn is not None:
            return self.initial_latent_fn(noise)
        sigma = self.sigmas[0].to(noise.device, noise.dtype).expand(noise.shape[0])
        return self.renoise(sigma, noise, torch.zeros_like(noise))

    def step_noises(self, shape, generator: Optional[torch.Generator], device, dtype,
                    row_generators: Optional[Sequence[torch.Generator]] = None) -> list:
        """Per-step ``z`` for ``eta > 0`` (drawn up front so recomputation sees the same noise).

        With ``row_generators`` (one per batch row), row ``j``'s noises come from its own
        generator (all T steps in order), so they do not depend on which other rows share the batch.
        """
        if self.settings.eta == 0.0:
            return [None] * self.num_steps
        if row_generators is None:
            return [torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
                    for _ in range(self.num_steps)]
        per_row = [[torch.randn((1,) + tuple(shape[1:]), generator=g) for _ in range(self.num_steps)]
                   for g in _check_rows(row_generators, shape[0])]
        return [torch.cat([row[i] for row in per_row]).to(device=device, dtype=dtype)
                for i in range(self.num_steps)]

    def _step(self, i: int, x: torch.Tensor, prompt_index: torch.Tensor,
              noise: Optional[torch.Tensor]):
        """Step ``i`` (0-based) from ``sigmas[i]`` to ``sigmas[i+1]``; returns ``(x_next, x0)``."""
        sigma = self.sigmas[i].to(x.device, x.dtype)
        sigma_next = self.sigmas[i + 1].to(x.device, x.dtype)
        denoise = self.denoise if self.trained_step(i) else self.other_expert.denoise
        x0 = denoise(x, sigma.expand(x.shape[0]), prompt_index)
        a = signal_scale(self.renoise, sigma, x)
        a_next = signal_scale(self.renoise, sigma_next, x)
        return ddim_step(x, x0, sigma, sigma_next, a, a_next, self.settings.eta, noise,
                         last=self._sigma_values[i + 1] == 0.0), x0

    def _grad_step(self, i, x, prompt_index, noise, use_checkpoint: Optional[bool] = None,
                   params: Optional[Sequence[torch.Tensor]] = None):
        if use_checkpoint is None:
            use_checkpoint = self.settings.checkpointing
        if use_checkpoint and torch.is_grad_enabled():
            if params is not None:  # the forward builds no graph (training/step_checkpoint.py)
                return recomputed_step(lambda x_in: self._step(i, x_in, prompt_index, noise), x,
                                       params, self.step_checkpoint_state)
            return checkpoint(self._step, i, x, prompt_index, noise, use_reentrant=False)
        return self._step(i, x, prompt_index, noise)

    def _kl_term(self, i, x, x0, prompt_index) -> torch.Tensor:
        """``mean((eps - eps_ref)^2)`` at step ``i``; eps = (x - a x0) / sigma."""
        with torch.no_grad():
            sigma = self.sigmas[i].to(x.device, x.dtype)
            x0_ref = self.reference_denoise(x, sigma.expand(x.shape[0]), prompt_index)
            a = signal_scale(self.renoise, sigma, x)
        return ((a * (x0_ref - x0) / sigma).float() ** 2).mean()

    # -- public ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, prompt_index: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Plain sampling without gradient; returns the final latent (B, C, H, W)."""
        x = self.initial_latent(noise)
        zs = self.step_noises(noise.shape, generator, noise.device, noise.dtype)
        for i in range(self.num_steps):
            x, _ = self._step(i, x, prompt_index, zs[i])
        return x

    def rollout(self, noise: torch.Tensor, prompt_index: torch.Tensor,
                generator: Optional[torch.Generator] = None, k: Optional[int] = None,
                step_checkpoint: Optional[bool] = None,
                params: Optional[Sequence[torch.Tensor]] = None) -> Rollout:
        """One DRaFT rollout from standard normal ``noise`` (B, C, H, W): :meth:`prefix` then
        :meth:`tail` over every row at once.

        ``generator`` draws the per-step noises (``eta > 0``), K for ``random_k`` and the
        re-noising noises of ``draft_lv``. ``k`` overrides the method's truncation (tests, bench).
        ``step_checkpoint`` and ``params``: see :meth:`tail`.
        """
        return self.tail(self.prefix(noise, prompt_index, generator, k),
                         step_checkpoint=step_checkpoint, params=params)

    def prefix(self, noise: torch.Tensor, prompt_index: torch.Tensor,
               generator: Optional[torch.Generator] = None, k: Optional[int] = None,
               row_generators: Optional[Sequence[torch.Generator]] = None) -> "TailStart":
        """Everything of a rollout that carries no gradient, batched: the chain up to the first
        differentiated step (DRaFT-K) or the whole chain and the ``n`` re-noised copies (DRaFT-LV).

        All random draws of the rollout happen here, so the differentiated tail can then run over
        any subset of rows (one at a time, to bound memory) with exactly the batched values.
        ``generator`` draws what is shared by the batch (K for ``random_k``) and, without
        ``row_generators``, everything else too. ``row_generators`` (one per row of ``noise``) draw
        each row's own noises (the ``eta > 0`` step noises, then the ``n`` LV re-noising noises),
        so a row's rollout is the same whichever rows share its batch (data-parallel ranks).
        """
        s = self.settings
        T = self.num_steps
        if row_generators is not None:
            _check_rows(row_generators, noise.shape[0])
        k = s.truncation(T, generator) if k is None else int(k)
        if not 1 <= k <= T:
            raise ValueError(f"K = {k} must lie in [1, {T}]")
        zs = self.step_noises(noise.shape, generator, noise.device, noise.dtype, row_generators)
        first_grad = T - k
        while first_grad < T and not self.trained_step(first_grad):
            first_grad += 1  # the other expert's steps before any trained one: nothing to carry
        if first_grad == T:
            other = self.other_expert.steps
            raise ValueError(tail_problem(s, T, other) or
                             f"K = {k}: the last {k} steps are all the other expert's")
        k = T - first_grad
        with torch.no_grad():
            x = self.initial_latent(noise)
            for i in range(first_grad):
                x, _ = self._step(i, x, prompt_index, zs[i])
        x = x.detach()
        if s.method != "draft_lv":
            return TailStart(x=x, prompt_index=prompt_index, first_step=first_grad, k=k,
                             noises=zs[first_grad:])
        with torch.no_grad():
            x_final, _ = self._step(T - 1, x, prompt_index, zs[T - 1])
        x0 = x_final.detach()
        sigma_last = self.sigmas[T - 1].to(x.device, x.dtype)
        starts = [x] if s.lv_include_original else []
        for _ in range(s.lv_samples):
            if row_generators is None:
                eps = torch.randn(x0.shape, generator=generator)
            else:
                eps = torch.cat([torch.randn((1,) + tuple(x0.shape[1:]), generator=g)
                                 for g in row_generators])
            eps = eps.to(x0.device, x0.dtype)
            starts.append(self.renoise(sigma_last.expand(x0.shape[0]), eps, x0).detach())
        z = zs[T - 1]
        z = None if z is None else z.repeat((len(starts),) + (1,) * (z.ndim - 1))
        return TailStart(x=torch.cat(starts), prompt_index=prompt_index.repeat(len(starts)),
                         first_step=T - 1, k=1, noises=[z])

    def tail(self, start: "TailStart", rows=None, step_checkpoint: Optional[bool] = None,
             params: Optional[Sequence[torch.Tensor]] = None) -> Rollout:
        """The differentiated steps from ``start`` for ``rows`` (an index tensor, a slice or None
        for all rows). ``step_checkpoint`` overrides ``settings.checkpointing`` for the per-step
        checkpointing (callers that checkpoint the denoiser's blocks skip it for a single step,
        where it would only add a forward). ``params``: every tensor requiring grad that the
        denoiser closes over (the LoRA factors); given, a checkpointed step's forward builds no
        autograd graph (:func:`training.step_checkpoint.recomputed_step`: faster, the same
        gradient); None: ``torch.utils.checkpoint``'s non-reentrant variant."""
        sel = slice(None) if rows is None else rows
        x = start.x[sel]
        prompt_index = start.prompt_index[sel]
        noises = [None if z is None else z[sel] for z in start.noises]
        use_ckpt = self.settings.checkpointing if step_checkpoint is None else step_checkpoint
        kl = torch.zeros((), device=x.device)
        for j, i in enumerate(range(start.first_step, start.first_step + start.k)):
            x_in = x
            x, x0 = self._grad_step(i, x_in, prompt_index, noises[j], use_ckpt, params)
            if self.reference_denoise is not None and self.trained_step(i):
                kl = kl + self._kl_term(i, x_in, x0, prompt_index) / start.k
        return Rollout(latents=x, prompt_index=prompt_index, k=start.k, kl=kl)


@dataclass
class TailStart:
    """Where a rollout's differentiated part begins (from :meth:`DifferentiableSampler.prefix`).

    Attributes:
        x: (R, C, ...) latents entering the first differentiated step, no gradient behind them;
            R = B for DRaFT-K, ``B * samples_per_rollout`` for DRaFT-LV (sample-major rows).
        prompt_index: (R,) prompt index of each row.
        first_step: 0-based index of the first differentiated step.
        k: number of differentiated steps.
        noises: per differentiated step, the ``eta > 0`` noise (R, C, ...) or None.
    """

    x: torch.Tensor
    prompt_index: torch.Tensor
    first_step: int
    k: int
    noises: list

    @property
    def rows(self) -> int:
        return self.x.shape[0]


def _check_rows(row_generators: Sequence[torch.Generator], rows: int) -> Sequence[torch.Generator]:
    if len(row_generators) != rows:
        raise ValueError(f"{len(row_generators)} row generators for {rows} rows")
    return row_generators


def karras_sigmas(n: int, sigma_min: float = 0.0292, sigma_max: float = 14.6146,
                  rho: float = 7.0) -> torch.Tensor:
    """A Karras schedule ending in 0, (n + 1,), for the engine's tests and tools (ComfyUI supplies
    its own schedules to the nodes)."""
    ramp = torch.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sig, torch.zeros(1)]).float()


def vp_sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor, timesteps) -> torch.Tensor:
    """``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)`` at ``timesteps`` (descending), then 0."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)[torch.as_tensor(list(timesteps))]
    sig = ((1 - ac) / ac).sqrt()
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).float()


__all__ = [
    "Denoiser", "Renoise", "METHODS", "SamplerSettings", "Rollout", "TailStart",
    "DifferentiableSampler", "OtherExpert", "EXPERT_SIDES", "expert_steps", "tail_problem",
    "ddim_step", "signal_scale", "ve_renoise", "karras_sigmas",
    "vp_sigmas_from_alphas_cumprod",
]
