"""Data-parallel DRaFT over ``torch.distributed``: N processes with batch ``b`` make the update one
process with batch ``N * b`` makes.

How (with :class:`training.trainer.DraftTrainer`, whose ``parallel`` is a :class:`DataParallel`):

* every process (rank ``r`` of ``N``) rolls out rows ``r * b ... r * b + b - 1`` of each global
  micro-batch; a row draws its prompt, initial noise and rollout noises from its own generator
  ``(seed, iteration, micro-batch, row)``, batch-wide draws (random K) come from
  ``(seed, iteration, micro-batch)``, so the draws are those of the one-process run;
* each process's loss is the mean over its own rows, so after the backward of every micro-batch
  the average of the N gradients is the gradient of the mean over all ``N * b`` rows; one
  ``all_reduce`` (sum, then / N) per update averages the LoRA gradients, the loss and a
  "this process failed" flag (a non-finite loss anywhere skips the update everywhere), before
  clipping; the optimizer then takes the same step in every process, so the LoRA weights and
  optimizer states stay identical without being broadcast;
* the rewards are gathered (``all_gather``) into the one-process order, so every process reports
  and records the same history.

Every collective happens inside ``DraftTrainer.step()``; a process that saves between steps (rank 0)
can never save half an update. If another process dies, the collective raises (gloo) or the
launcher's agent (torchrun) ends the job; :class:`PeerFailure` names what happened.

ComfyUI-free: it is used by the ComfyUI launcher ``tools/draft_torchrun.py`` through
``nodes/training_run.py`` and tested on the toy model with gloo processes on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """A collective failed: another process of the data-parallel job stopped (or the network did)."""


@dataclass
class DataParallel:
    """This process's place in a data-parallel job (see the module docstring).

    Attributes:
        rank: 0-based process index; rank 0 saves files and prints.
        world_size: number of processes N.
        device: where the collectives' buffers live (CUDA for NCCL, CPU for gloo).
        group: the process group (None: the default group).
    """

    rank: int
    world_size: int
    device: torch.device = torch.device("cpu")
    group: Optional[object] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _collective(self, what: str, fn, *args):
        try:
            return fn(*args, group=self.group)
        except Exception as e:  # gloo: "Connection closed by peer"; NCCL: watchdog/abort errors
            raise PeerFailure(
                f"DRaFT data-parallel: the {what} failed in rank {self.rank} of {self.world_size}, "
                f"most likely because another rank stopped (see its error above); the last "
                f"periodic save is intact ({type(e).__name__}: {e})") from e

    def reduce_update(self, params: Sequence[torch.Tensor], loss: float, failed: bool):
        """Average the gradients of ``params`` (in place; a parameter without one counts as zero),
        the update's ``loss`` and the failure flag over all processes.

        Returns ``(mean loss, failed anywhere)``.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.detach().reshape(-1).to(self.device, torch.float32) for g in grads]
                         + [torch.tensor([loss if math.isfinite(loss) else 0.0, float(failed)],
                                         device=self.device)])
        self._collective("gradient all-reduce", dist.all_reduce, flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            mean = flat[offset:offset + n].view_as(g).to(g.device, g.dtype)
            if p.grad is None:
                p.grad = mean.clone()
            else:
                p.grad.copy_(mean)
            offset += n
        return float(flat[-2]), bool(flat[-1] > 0)

    def gather_rewards(self, rewards: Sequence[float], layout: tuple) -> list:
        """All processes' per-sample rewards in the one-process order.

        ``layout = (micro-batches, samples per rollout, rows per process)``: the order in which
        one process lists its rewards (micro-batch, then LV sample, then row). A process that
        stopped early (non-finite loss) is padded with NaN. Returns the
        ``micro-batches * samples * (world_size * rows)`` rewards, rows numbered globally.
        """
        count = int(math.prod(layout))
        local = torch.full((count,), float("nan"), dtype=torch.float64)
        local[:min(count, len(rewards))] = torch.tensor(list(rewards)[:count], dtype=torch.float64)
        local = local.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        self._collective("reward all-gather", dist.all_gather, parts, local)
        stacked = torch.stack(parts).reshape((self.world_size,) + tuple(layout))
        return stacked.permute(1, 2, 0, 3).reshape(-1).cpu().tolist()

    def broadcast_values(self, values: Sequence[float]) -> list:
        """Rank 0's ``values`` (floats) in every process: decisions taken on measured figures
        (the held-out check's keep and stop) must be the same in every process."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self._collective("held-out figures broadcast", dist.broadcast, t, 0)
        return t.cpu().tolist()

    def barrier(self) -> None:
        self._collective("barrier", dist.barrier)


def current(check=None) -> Optional[DataParallel]:
    """The :class:`DataParallel` of the process group this process has joined (``torchrun`` +
    ``init_process_group``), or None outside a data-parallel job (a normal ComfyUI server).

    ``check``: a reward module to pass through :func:`check_supported` when data-parallel."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if check is not None and dist.get_world_size() > 1:
        check_supported(check)
    backend = dist.get_backend()
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    return DataParallel(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def check_supported(reward_module) -> None:
    """Raise ValueError for a reward whose state would drift apart between processes: running
    statistics (Combine's standardisation) are folded per process, which N processes would do on
    different rows, so their rewards, and the update, would differ from the one-process run."""
    modules = reward_module.modules() if isinstance(reward_module, torch.nn.Module) else [reward_module]
    for m in modules:
        if getattr(m, "standardize", False):
            raise ValueError("data-parallel training does not support a Combine reward with "
                             "'standardize' on (its running statistics would differ between "
                             "processes); turn standardize off or train in one process")


def metadata(parallel: Optional[DataParallel], batch_size: int) -> dict:
    """Metadata keys recording the data-parallel layout of a run (empty for one process)."""
    if parallel is None:
        return {}
    return {"world_size": parallel.world_size, "global_batch_size": parallel.world_size * batch_size}


__all__ = ["DataParallel", "PeerFailure", "current", "check_supported", "metadata"]
