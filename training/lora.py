"""LoRA deltas applied as weight wrappers.

A :class:`LoRADelta` is a callable ``w -> w + (alpha / rank) * (up @ down).reshape(w.shape)``.
It is the one LoRA implementation of the project:

* in ComfyUI it is registered with ``ModelPatcher.add_weight_wrapper("<module>.weight", delta)``,
  which calls it on every forward from ``comfy/ops.py:cast_bias_weight`` (full and lowvram
  loading alike) and never touches the base weights;
* in the engine's tests it wraps plain ``torch.nn`` layers through :func:`wrap_module`.

Layout (the same as kohya's and ComfyUI's ``lora_up``/``lora_down``):

* ``down``: ``(rank, in_features * kh * kw)`` -- for a conv weight ``(out, in, kh, kw)`` the input
  dimensions are flattened; export reshapes it to 4-D ``(rank, in, kh, kw)``;
* ``up``: ``(out_features, rank)``;
* ``alpha``: a float; the delta is scaled by ``alpha / rank`` (kohya's convention).

Initialisation follows PEFT/kohya: ``down`` Kaiming-uniform, ``up`` zero, so a new LoRA is an exact
no-op and its first gradient reaches ``up``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator

import torch
from torch import nn


class LoRADelta(nn.Module):
    """Low-rank additive update of one weight tensor.

    Args:
        weight_shape: shape of the wrapped weight, ``(out, in)`` or ``(out, in, kh, kw)``.
        rank: LoRA rank ``r`` (>= 1).
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        dtype, device: of the trainable factors (keep float32 for training; the delta is cast to
            the wrapped weight's dtype on the fly).
        generator: CPU generator for ``down``'s initialisation (seeded runs are reproducible).
    """

    def __init__(self, weight_shape: Iterable[int], rank: int, alpha: float,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        weight_shape = tuple(int(s) for s in weight_shape)
        if len(weight_shape) < 2:
            raise ValueError(f"LoRA needs a weight of 2 or more dimensions, got shape {weight_shape}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.weight_shape = weight_shape
        self.rank = int(rank)
        self.alpha = float(alpha)
        in_flat = math.prod(weight_shape[1:])
        down = torch.empty(self.rank, in_flat, dtype=torch.float32)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.down = nn.Parameter(down.to(device=device, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(weight_shape[0], self.rank, dtype=dtype, device=device))
        self.enabled = True
        self.strength = 1.0

    @property
    def scale(self) -> float:
        """The factor ``alpha / rank`` applied to ``up @ down``."""
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update, shaped like the wrapped weight, in the factors' dtype."""
        return ((self.up @ self.down) * (self.scale * self.strength)).reshape(self.weight_shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D401 - a weight wrapper
        """Return ``weight + delta`` in ``weight``'s dtype and device (identity when disabled)."""
        if not self.enabled:
            return weight
        d = self.delta()
        return weight + d.to(device=weight.device, dtype=weight.dtype)

    # ComfyUI's ModelPatcher calls these on weight functions when it moves a model.
    def passive_memory_usage(self) -> int:
        """Bytes held by the factors."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device) -> int:
        """Move the factors (the same Parameter objects, so optimizers keep them); return bytes."""
        self.to(device=device)
        return self.passive_memory_usage()

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, rank={self.rank}, alpha={self.alpha}"


class LoRASet(nn.Module):
    """The LoRA deltas of one model, keyed by the wrapped module's name.

    Names are those of the model the deltas were built for (in ComfyUI: the ldm module path under
    ``diffusion_model``, e.g. ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``). ``nn.ModuleDict``
    forbids dots in keys, so they are stored with ``.`` replaced by ``/``; use :meth:`items`.
    """

    def __init__(self):
        super().__init__()
        self._deltas = nn.ModuleDict()

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "/")

    def add(self, name: str, delta: LoRADelta) -> LoRADelta:
        self._deltas[self._key(name)] = delta
        return delta

    def __getitem__(self, name: str) -> LoRADelta:
        return self._deltas[self._key(name)]

    def __contains__(self, name: str) -> bool:
        return self._key(name) in self._deltas

    def __len__(self) -> int:
        return len(self._deltas)

    def items(self) -> Iterator[tuple[str, LoRADelta]]:
        for key, delta in self._deltas.items():
            yield key.replace("/", "."), delta

    def names(self) -> list[str]:
        return [name for name, _ in self.items()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The factors in a fixed order (``down`` then ``up`` per module, in insertion order)."""
        params = []
        for _, delta in self.items():
            params += [delta.down, delta.up]
        return params

    def set_enabled(self, enabled: bool) -> None:
        for _, delta in self.items():
            delta.enabled = enabled

    @contextlib.contextmanager
    def disabled(self):
        """Temporarily make every delta an identity (the base model), e.g. for a KL reference."""
        previous = [(d, d.enabled) for _, d in self.items()]
        self.set_enabled(False)
        try:
            yield
        finally:
            for d, state in previous:
                d.enabled = state


class _WrappedWeight(nn.Module):
    """Parametrization that routes a plain layer's weight through a :class:`LoRADelta`."""

    def __init__(self, delta: LoRADelta):
        super().__init__()
        self.delta = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.delta(weight)


def wrap_module(model: nn.Module, names: Iterable[str], rank: int, alpha: float,
                lora_set: LoRASet | None = None, seed: int | None = None) -> LoRASet:
    """Attach LoRA deltas to plain torch layers of ``model`` (no ComfyUI), for tests and tools.

    Each named submodule must have a ``weight`` of 2+ dimensions (``nn.Linear``/``nn.Conv2d``). The
    base weight is frozen; the delta is applied through ``torch.nn.utils.parametrize``. ``seed``
    seeds the factors' initialisation.
    """
    from torch.nn.utils import parametrize

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    lora_set = lora_set if lora_set is not None else LoRASet()
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise KeyError(f"no module named {name!r} in {type(model).__name__}")
        layer = modules[name]
        layer.weight.requires_grad_(False)
        delta = lora_set.add(name, LoRADelta(layer.weight.shape, rank, alpha,
                                             device=layer.weight.device, generator=generator))
        parametrize.register_parametrization(layer, "weight", _WrappedWeight(delta), unsafe=True)
    return lora_set
