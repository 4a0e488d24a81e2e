"""How one DRaFT update uses memory, and the choice of the fastest way to run it that fits.

Every way gives the same gradient (tests/test_memory_lean.py); they differ in time and peak memory:

* **fast**: every differentiated row (batch rows x CFG branches x LV copies) at once; each
  differentiated step checkpointed, the decoder not at all (the way TRL's AlignProp runs; a
  checkpoint around the whole decode never lowered a peak ``make vram`` traced, since the decoder's
  own backward is the peak either way, and it cost a decode: a quarter of a DRaFT-1 update).
  Fewer kernel launches, the most memory.
* **rows one at a time**: the differentiated tail, decode and reward run per row, each
  backpropagated before the next; the peak is one row's. Costs almost nothing.
* **decoder and reward blocks**: the VAE decoder's blocks checkpointed selectively (their
  convolutions' outputs kept, norms and activations recomputed: a few percent of a decode) and the
  reward model's blocks one by one, once per update whatever K is.
* **all blocks** (lean): the denoiser's blocks too (nested in the per-step checkpointing when
  K > 1): about one extra denoiser forward per differentiated step; the peak is one row through
  one block.

:func:`estimate_update_bytes` gives the peak activation bytes of each from two per-model figures
that ComfyUI knows for every family (``model.memory_required`` for one UNet/DiT forward of a shape,
``vae.memory_used_decode`` for one decode), with factors measured by ``make vram`` on the full-size
architectures (the denoiser's per family; tools/measure/memory/vram.py, README "Memory at full size").
:func:`choose_plan` takes the first of fast / rows one at a time / decoder and reward blocks / all
blocks that fits the free memory, and refuses before the first iteration, saying what to lower,
when not even the leanest does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

GIB = 1024 ** 3

BLOCK_CHOICES = ("auto", "on", "decoder and reward", "off")
ROW_CHOICES = ("auto", "one at a time", "all at once")
CFG_GRADIENT_CHOICES = ("both branches", "conditional only")

# Measured by `make vram` (tools/measure/memory/vram.py: bf16, full-size SD1.5 512 px, SD2.1-v 768 px, SDXL,
# FLUX.1-dev and SD3.5-medium at 1024 px, aesthetic reward; docs/vram_figures.json, checked by
# tests/test_comfyui_memory_estimate.py). The decoder's backward and the denoiser step's come one
# after the other, so an update peaks at the larger of the two, per row at once. Each is a factor
# times ComfyUI's inference estimate: of one decode for the decoder (whole: 2.67-2.68 x traced;
# blocks checkpointed: 1.10-1.14 x), and of one denoiser forward of one row for the denoiser, whose
# factor depends on the family (nodes/architectures.py ``memory_factors``).
LEAN_DECODE_FACTOR = 1.2
FAST_DECODE_FACTOR = 2.9
# The middle way checkpoints the decoder's blocks selectively (convolution outputs kept): 1.56 x
# traced at 512 and 1024 px (the SD VAE decoder alone under fake tensors, bf16).
SELECTIVE_DECODE_FACTOR = 1.7
# The SD1.x/SD2.x denoiser factors (fast, lean): the default of :func:`estimate_update_bytes`.
UNET_DENOISER_FACTORS = (11.5, 1.0)
# The decoder factors (whole, selective, blocks) of the SD / FLUX / SD3 KL VAEs above: the default
# of :func:`estimate_update_bytes`; a family whose VAE differs (Wan's causal video VAE) has its own
# (``nodes/architectures.py`` ``decode_factors``).
KL_DECODE_FACTORS = (FAST_DECODE_FACTOR, SELECTIVE_DECODE_FACTOR, LEAN_DECODE_FACTOR)


@dataclass(frozen=True)
class MemoryOptions:
    """What the DRaFT Memory Options node says (defaults: everything automatic, exact CFG).

    Attributes:
        block_checkpointing: ``auto`` (as little as fits), ``on`` (denoiser, decoder and reward
            blocks), ``decoder and reward`` (their blocks only) or ``off``.
        rows: ``auto``, ``one at a time`` or ``all at once`` (differentiated rows).
        cfg_gradient: ``both branches`` (exact) or ``conditional only`` (the unconditional
            prediction without gradient: less memory and time, a different gradient).
    """

    block_checkpointing: str = "auto"
    rows: str = "auto"
    cfg_gradient: str = "both branches"

    def __post_init__(self):
        for value, choices, name in ((self.block_checkpointing, BLOCK_CHOICES, "block_checkpointing"),
                                     (self.rows, ROW_CHOICES, "rows"),
                                     (self.cfg_gradient, CFG_GRADIENT_CHOICES, "cfg_gradient")):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class MemoryPlan:
    """The resolved settings of a run and the estimates behind them (bytes).

    ``block_checkpointing``: the decoder's and reward's blocks are checkpointed;
    ``denoiser_blocks``: the denoiser's too (``lean_bytes``: all blocks, rows one at a time)."""

    block_checkpointing: bool
    row_by_row: bool
    cond_only: bool
    estimate_bytes: int
    fast_bytes: int
    lean_bytes: int
    available_bytes: int
    reason: str
    denoiser_blocks: bool = True

    def describe(self) -> str:
        blocks = ("off" if not self.block_checkpointing else
                  "on" if self.denoiser_blocks else "decoder and reward")
        return (f"block checkpointing {blocks}, "
                f"rows {'one at a time' if self.row_by_row else 'all at once'}, "
                f"CFG gradient {'conditional only' if self.cond_only else 'both branches'}; "
                f"estimated {self.estimate_bytes / GIB:.2f} GiB for the update beside the weights "
                f"({self.reason})")


class DoesNotFit(RuntimeError):
    """Even the leanest settings need more memory than the device has."""


def estimate_update_bytes(*, rows: int, cfg_branches: int, decode_bytes: float,
                          denoiser_row_bytes: float, lean: bool = False, blocks: str = "",
                          one_row: bool | None = None,
                          denoiser_factors: tuple = UNET_DENOISER_FACTORS,
                          decode_factors: tuple | None = KL_DECODE_FACTORS) -> int:
    """Peak activation bytes of one update beside the weights.

    Args:
        rows: differentiated rows per micro-batch (batch x LV copies).
        cfg_branches: denoiser rows per sample under gradient (2 with CFG, 1 without or with
            conditional-only CFG).
        decode_bytes: ComfyUI's inference estimate of decoding one latent.
        denoiser_row_bytes: ComfyUI's inference estimate of one denoiser forward of one row.
        lean: shorthand for ``blocks="on", one_row=True`` (else ``"off"``, all rows at once).
        blocks: ``"off"``, ``"decoder and reward"`` or ``"on"`` (overrides ``lean``).
        one_row: rows one at a time (overrides ``lean``).
        denoiser_factors: ``(fast, lean)`` peak of one denoiser row under gradient over
            ``denoiser_row_bytes``, the family's (``nodes/architectures.py``).
        decode_factors: ``(whole, selective, blocks)`` peak of one decode under gradient over
            ``decode_bytes``, per way of checkpointing the decoder (the family's VAE's; None:
            :data:`KL_DECODE_FACTORS`).
    """
    blocks = blocks or ("on" if lean else "off")
    one_row = lean if one_row is None else one_row
    fast_factor, lean_factor = denoiser_factors
    decoder = dict(zip(("off", "decoder and reward", "on"),
                       decode_factors or KL_DECODE_FACTORS))[blocks] * decode_bytes
    denoiser = (lean_factor if blocks == "on" else fast_factor) * cfg_branches * denoiser_row_bytes
    return int((1 if one_row else rows) * max(decoder, denoiser))


# The ways to run an update, fastest first (see the module docstring): (blocks, rows one at a time)
WAYS = tuple((b, r) for b in ("off", "decoder and reward", "on") for r in (False, True))


def choose_plan(options: MemoryOptions, *, rows: int, cfg_branches: int, decode_bytes: float,
                denoiser_row_bytes: float, available_bytes: int, streamable_bytes: int = 0,
                hint: str = "", denoiser_factors: tuple = UNET_DENOISER_FACTORS,
                decode_factors: tuple | None = KL_DECODE_FACTORS) -> MemoryPlan:
    """Resolve ``auto`` choices against ``available_bytes`` (free device memory once the weights
    are loaded): the fastest way that fits, or the leanest when none does and it fits with
    ``streamable_bytes`` (weights ComfyUI can stream instead: lowvram partial loading) given up.
    Raises :class:`DoesNotFit` naming what to lower."""
    cond_only = options.cfg_gradient == "conditional only"
    branches = 1 if cond_only else cfg_branches
    kw = dict(rows=rows, cfg_branches=branches, decode_bytes=decode_bytes,
              denoiser_row_bytes=denoiser_row_bytes, denoiser_factors=denoiser_factors,
              decode_factors=decode_factors)
    fast, lean = estimate_update_bytes(lean=False, **kw), estimate_update_bytes(lean=True, **kw)
    want_blocks = None if options.block_checkpointing == "auto" else options.block_checkpointing
    want_row = {"one at a time": True, "all at once": False}.get(options.rows)
    ways = [(b, r) for b, r in WAYS if want_blocks in (None, b) and want_row in (None, r)]
    costs = [(b, r, estimate_update_bytes(blocks=b, one_row=r, **kw)) for b, r in ways]
    fitting = [c for c in costs if c[2] <= available_bytes]
    if len(costs) == 1:
        reason = "as set"
    elif fitting and fitting[0] is costs[0]:
        reason = "the fastest way fits"
    else:
        reason = (f"the fast way needs {fast / GIB:.2f} GiB, {available_bytes / GIB:.2f} GiB free")
    blocks, one_row, estimate = fitting[0] if fitting else costs[-1]
    if estimate > available_bytes + streamable_bytes:
        raise DoesNotFit(
            f"one DRaFT update needs about {estimate / GIB:.2f} GiB beside the weights (leanest: "
            f"{lean / GIB:.2f} GiB) but only {(available_bytes + streamable_bytes) / GIB:.2f} GiB "
            f"can be freed on this device. Lower the resolution, the batch size or the LV samples "
            f"(n){hint}, or set DRaFT Memory Options to block checkpointing 'on' and rows 'one at a "
            f"time'.")
    return MemoryPlan(block_checkpointing=blocks != "off", row_by_row=one_row, cond_only=cond_only,
                      estimate_bytes=estimate, fast_bytes=fast, lean_bytes=lean,
                      available_bytes=available_bytes, reason=reason,
                      denoiser_blocks=blocks == "on")


def trainer_memory_kwargs(plan: MemoryPlan, denoiser_units: Sequence = (),
                          decoder_units: Sequence = (), reward_units: Sequence = (),
                          video: bool = False) -> dict:
    """``DraftTrainer``'s memory arguments for ``plan``, given the modules that can be checkpointed
    one by one (the denoiser's, the decoder's and the reward model's blocks): the fast way
    checkpoints none; the middle way the decoder's selectively (their convolution outputs kept)
    and the reward's; the leanest every block whole, and for a ``video`` decoder (whose backward
    is the update's peak) a single differentiated step whole on top of its blocks
    (``DraftTrainer.whole_step_over_blocks``; :func:`whole_step_over_blocks`). What the trainer node and ``make bench`` build, so
    the bench times the ways ``auto`` picks."""
    units, selective = [], []
    if plan.block_checkpointing:
        if plan.denoiser_blocks:
            units = list(denoiser_units) + list(decoder_units)
        else:
            selective = list(decoder_units)
        units += list(reward_units)
    return dict(block_units=units, selective_units=selective, row_by_row=plan.row_by_row,
                denoiser_blocks_checkpointed=plan.denoiser_blocks,
                whole_step_over_blocks=whole_step_over_blocks(plan, video))


def whole_step_over_blocks(plan: MemoryPlan, video: bool) -> bool:
    """Whether a single differentiated step is checkpointed whole on top of its blocks
    (``DraftTrainer.whole_step_over_blocks``): the leanest way with a ``video`` decoder. Then CFG's
    two branches are also recomputed one at a time inside that step's backward
    (``training.step_checkpoint.branches_apart``: the trainer node's
    ``sampler_calc_cond_batch_function``, the make-vram trace's denoiser), unless only the
    conditional branch has gradient."""
    return bool(video and plan.block_checkpointing and plan.denoiser_blocks)


__all__ = ["MemoryOptions", "MemoryPlan", "DoesNotFit", "estimate_update_bytes", "choose_plan",
           "whole_step_over_blocks",
           "trainer_memory_kwargs", "BLOCK_CHOICES", "ROW_CHOICES", "CFG_GRADIENT_CHOICES",
           "UNET_DENOISER_FACTORS", "KL_DECODE_FACTORS", "WAYS"]
