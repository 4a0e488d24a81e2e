"""Checkpointing of one differentiated sampler step whose first forward builds no autograd graph.

``torch.utils.checkpoint`` (non-reentrant) runs the forward with gradients on and drops what
autograd saves, but every operation still creates its autograd node; its reentrant variant runs
the forward without gradients but accumulates the parameters' gradients into ``.grad`` itself,
which ``torch.autograd.grad`` refuses. :func:`recomputed_step` does what both do right: the
forward under ``no_grad`` (no graph at all), and in the backward pass the recompute with gradients
on, returning the gradients of the input and of the ``params`` the step closes over (the trained
LoRA factors, passed explicitly), so the result works under ``loss.backward()`` and
``torch.autograd.grad`` alike. On the CPU this made a full-DRaFT update (50 differentiated steps)
about 7 % faster than the non-reentrant checkpoint, the same arithmetic (``make bench``,
``auto_time_vs_trl_full``); the values and gradients are the same (tests/test_step_checkpoint.py).

The recompute sees the forward's RNG state (CPU, and the input's CUDA device) and autocast state.

**Models that modify saved tensors in place.** ComfyUI's FLUX and Chroma blocks write residuals in
place (``txt += ...``, ``x += ...``, ``img.addcmul_(...)``) into tensors a layer norm saved for its
backward. Plain autograd refuses that ("modified by an inplace operation"); torch's non-reentrant
checkpoint does not notice and computes a wrong gradient from the modified values. Here the first
such refusal switches the recompute (of this step and, through ``state``, every later one) to
copying each saved activation when it is saved, which gives the exact gradient: the step's
backward is retried once, and later steps pay one copy of their activations.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

StepFn = Callable[[torch.Tensor], tuple]
IN_PLACE = "modified by an inplace operation"  # autograd's refusal of a changed saved tensor


def _copy_activations(t: torch.Tensor) -> torch.Tensor:
    """Saved-tensor pack hook: a copy of an activation (a non-leaf that requires grad), so a later
    in-place write cannot change what the backward reads; leaves (weights, LoRA factors) and
    tensors without gradient are kept as they are."""
    return t.clone() if t.requires_grad and not t.is_leaf else t


def _autocast_states(device_type: str) -> list:
    """``(device type, enabled, dtype)`` of autocast for the CPU and ``device_type``."""
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
            for d in dict.fromkeys(("cpu", device_type))]


class _RecomputedStep(torch.autograd.Function):
    """``fn(x) -> tuple of tensors``: forward without a graph, recomputed for the backward."""

    @staticmethod
    def forward(ctx, fn: StepFn, state: dict, x: torch.Tensor, *params: torch.Tensor):
        ctx.fn, ctx.state, ctx.params = fn, state, params
        ctx.save_for_backward(x)
        ctx.set_materialize_grads(False)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.autocast = _autocast_states(x.device.type)
        with torch.no_grad():  # (autograd already runs forward so; stated for the reader)
            return tuple(fn(x))

    @staticmethod
    def backward(ctx, *grads):
        if not ctx.state.get("copy_activations"):
            try:
                return _RecomputedStep._backward(ctx, grads, copy=False)
            except RuntimeError as e:
                if IN_PLACE not in str(e):
                    raise
                ctx.state["copy_activations"] = True
        return _RecomputedStep._backward(ctx, grads, copy=True)

    @staticmethod
    def _backward(ctx, grads, copy: bool):
        (x,) = ctx.saved_tensors
        # a copy: the step may write into its input, and a retry must start from the saved value
        x_in = x.detach().clone().requires_grad_(ctx.needs_input_grad[2])
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            with contextlib.ExitStack() as recompute:
                recompute.enter_context(torch.enable_grad())
                for device, on, dtype in ctx.autocast:  # the forward's autocast states
                    recompute.enter_context(torch.autocast(device, dtype=dtype, enabled=on))
                if copy:
                    recompute.enter_context(
                        torch.autograd.graph.saved_tensors_hooks(_copy_activations, lambda t: t))
                outputs = ctx.fn(x_in)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        wanted = ([x_in] if x_in.requires_grad else []) + [
            p for p, need in zip(ctx.params, ctx.needs_input_grad[3:]) if need]
        if not pairs or not wanted:
            return (None, None, None) + (None,) * len(ctx.params)
        got = list(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                       allow_unused=True))
        grad_x = got.pop(0) if x_in.requires_grad else None
        grad_params = [got.pop(0) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, None, grad_x, *grad_params)


def recomputed_step(fn: StepFn, x: torch.Tensor, params: Sequence[torch.Tensor],
                    state: Optional[dict] = None) -> tuple:
    """``fn(x)`` (a tuple of tensors, e.g. a sampler step's ``(x_next, x0)``) with its activations
    recomputed in the backward pass, the forward building no autograd graph.

    Args:
        fn: the step; deterministic given ``x``, the RNG state and autocast (it may close over
            anything else that does not require grad).
        x: (B, ...) the step's input latent; may or may not require grad.
        params: every tensor requiring grad that ``fn`` closes over (the LoRA factors). A
            closed-over tensor missing here would silently get no gradient.
        state: shared by the steps of one sampler: remembers that the model writes saved tensors
            in place (see the module docstring); None: this step alone.
    """
    return _RecomputedStep.apply(fn, {} if state is None else state, x, *params)


def branches_apart(branches: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
                   params: Sequence[torch.Tensor], state: Optional[dict] = None) -> list:
    """``[branch(x) for branch in branches]``, each branch (a CFG branch's denoiser call) under
    gradient a :func:`recomputed_step` of its own: nested in a checkpointed step, the step's
    backward then recomputes and backpropagates one branch at a time, so only one branch's
    activations (with block checkpointing, its blocks' saved inputs) are alive at once instead of
    both's, for one more forward of each branch. The branches must not depend on each other (CFG's
    conditional and unconditional rows do not: a batched call computes each row alone); the
    gradient is the batched call's, summed in another order. Without gradient: each branch as is.
    ``params``: the trained tensors the branches close over (see :func:`recomputed_step`)."""
    if not torch.is_grad_enabled():
        return [branch(x) for branch in branches]
    return [recomputed_step(lambda x_in, branch=branch: (branch(x_in),), x, params, state)[0]
            for branch in branches]


__all__ = ["recomputed_step", "branches_apart"]
