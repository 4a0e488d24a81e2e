"""Worker processes for tests/test_distributed.py (importable by ``spawn``d children): the toy
model trained data-parallel over gloo on the CPU."""
from __future__ import annotations

import copy
import datetime
import json
import os
import traceback

import torch

from training import DifferentiableSampler, DraftTrainer, SamplerSettings, TrainSettings
from training.sampler import karras_sigmas
from training.toy_models import build_toy_model, colour_reward, toy_lora

PROMPTS = ["a", "b", "c", "d", "e"]
# (method, eta, row_by_row, grad_accum, batch per process): LV with its re-noising draws, random K
# with eta noises and row-by-row tails, and DRaFT-K with accumulation.
CONFIGS = [("draft_lv", 0.0, False, 1, 1), ("random_k", 0.6, True, 1, 2), ("draft_k", 0.3, False, 2, 1)]
UPDATES = 3


def toy_trainer(method, eta, row_by_row, grad_accum, batch, parallel=None, reward=colour_reward):
    """A toy DRaFT trainer with non-zero LoRA factors (so every factor gets a gradient)."""
    denoiser, decoder = build_toy_model(seed=0)
    lora = toy_lora(denoiser)
    sampler = DifferentiableSampler(denoiser, karras_sigmas(5), SamplerSettings(
        method=method, k=2, k_min=1, k_max=4, lv_samples=2, eta=eta))
    settings = TrainSettings(batch_size=batch, grad_accum=grad_accum, learning_rate=1e-2, seed=7,
                             grad_clip=2e-4)
    return DraftTrainer(sampler, decoder, reward, PROMPTS, lora, (4, 4, 4), settings,
                        row_by_row=row_by_row, parallel=parallel)


def lora_weights(trainer) -> list:
    return [p.detach().clone() for p in trainer.params]


def _join(rank, world, init_file):
    import torch.distributed as dist

    from training import distributed
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    return distributed.current()


def train_configs(rank, world, init_file, out_dir):
    """Every config of CONFIGS for UPDATES updates; rank 0 writes the weights, reports and the
    state after update 2 (for resume in another world size) to ``out_dir``."""
    import torch.distributed as dist
    parallel = _join(rank, world, init_file)
    results = []
    for config in CONFIGS:
        trainer = toy_trainer(*config, parallel=parallel)
        reports, state = [], None
        for i in range(UPDATES):
            reports.append(trainer.step())
            if i == 1:
                state = {"weights": lora_weights(trainer),
                         "trainer": copy.deepcopy(trainer.state_dict())}
        results.append({"weights": lora_weights(trainer), "reports": reports, "state": state,
                        "grad_norms": [r.grad_norm for r in reports]})
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))

    def nan_in_rank_1(images, prompts):  # a non-finite reward in one process, at update 2
        scores = colour_reward(images, prompts)
        # during update 2 one update has finished (the counter moves once an update ends)
        return scores * float("nan") if rank == 1 and trainer.iteration == 1 else scores

    trainer = toy_trainer("draft_k", 0.0, False, 1, 1, parallel=parallel, reward=nan_in_rank_1)
    reports = [trainer.step() for _ in range(3)]
    torch.save({"skipped": [(r.skipped, r.skip_reason) for r in reports],
                "weights": lora_weights(trainer)}, os.path.join(out_dir, f"nan{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def die_in_update_two(rank, world, init_file, out_dir):
    """Rank 0 saves the LoRA (with its side file) after every update, as the launcher does; rank 1
    dies (``os._exit``) in the middle of update 2. Rank 0 writes what it saw to ``rank0.json``."""
    from training import lora_file
    from training.distributed import PeerFailure
    from training.lora_resume import save_training_state, state_path_for
    parallel = _join(rank, world, init_file)

    def reward(images, prompts):
        if rank == 1 and trainer.iteration == 1:  # inside update 2 (one update has finished)
            os._exit(3)
        return colour_reward(images, prompts)

    trainer = toy_trainer("draft_k", 0.0, False, 1, 1, parallel=parallel, reward=reward)
    path = os.path.join(out_dir, "toy_lora.safetensors")
    outcome = {"saved_after": []}
    try:
        for _ in range(3):
            trainer.step()
            if parallel.is_main:
                lora_file.save_kohya(path, trainer.lora, None, metadata={"iteration": trainer.iteration},
                                     dtype=torch.float32, overwrite=True)
                save_training_state(state_path_for(path), trainer.state_dict(), trainer.lora)
                outcome["saved_after"].append(trainer.iteration)
                torch.save(lora_weights(trainer), os.path.join(out_dir, f"weights{trainer.iteration}.pt"))
    except PeerFailure as e:
        outcome["error"] = str(e)
    except Exception as e:  # noqa: BLE001  (reported to the test)
        outcome["other_error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
