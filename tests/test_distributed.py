"""Data-parallel DRaFT (training/distributed.py) with 2 gloo processes on the CPU, on the toy model:

* N = 2 processes with batch b give the LoRA (and reward history) of one process with batch 2b,
  for DRaFT-LV, random K with eta noises and row-by-row tails, and DRaFT-K with accumulation;
* a non-finite reward in one process skips that update in both, which stay identical;
* the state rank 0 holds after update 2 resumes in ONE process to the same update 3 (resume across
  a different number of processes);
* a process that dies mid-update makes the survivor stop with a clear PeerFailure, and the last
  periodic save (LoRA + side file) is intact and resumable.
"""
import json
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import distributed_workers as W
from training import lora_file
from training.lora_resume import load_training_state, state_path_for

pytestmark = pytest.mark.distributed


def _run(target, world, out_dir, timeout=240):
    """Start ``world`` spawned processes of ``target(rank, world, init_file, out_dir)``; returns
    their exit codes."""
    ctx = mp.get_context("spawn")
    init_file = os.path.join(out_dir, "pg_init")
    procs = [ctx.Process(target=target, args=(r, world, init_file, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = []
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join()
        codes.append(p.exitcode)
    return codes


@pytest.fixture(scope="module")
def two_process_results():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        codes = _run(W.train_configs, 2, out)
        assert codes == [0, 0], codes
        results = torch.load(os.path.join(out, "results.pt"), weights_only=False)
        results.append([torch.load(os.path.join(out, f"nan{r}.pt")) for r in range(2)])
        yield results


@pytest.mark.parametrize("i", range(len(W.CONFIGS)), ids=[c[0] for c in W.CONFIGS])
def test_two_processes_equal_one_process_with_twice_the_batch(two_process_results, i):
    method, eta, row_by_row, accum, batch = W.CONFIGS[i]
    dp = two_process_results[i]
    single = W.toy_trainer(method, eta, row_by_row, accum, 2 * batch)
    start = W.lora_weights(single)
    reports = [single.step() for _ in range(W.UPDATES)]
    assert not any(r.skipped for r in reports)
    for a, b, w0 in zip(dp["weights"], W.lora_weights(single), start):
        assert not torch.equal(b, w0)  # it trained
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    # the gathered rewards are the one-process rewards, in its order
    for r_dp, r_one in zip(dp["reports"], reports):
        assert len(r_dp.rewards) == len(r_one.rewards) == accum * 2 * batch * (2 if method == "draft_lv" else 1)
        assert r_dp.rewards == pytest.approx(r_one.rewards, abs=1e-6)
        assert r_dp.k == r_one.k
    # the norm is the global gradient's, and clipping (at 2e-4) acted on it
    assert [r.grad_norm for r in reports] == pytest.approx(dp["grad_norms"], rel=1e-5)
    assert max(r.grad_norm for r in reports) > single.settings.grad_clip


def test_a_non_finite_reward_in_one_process_skips_the_update_in_all(two_process_results):
    rank0, rank1 = two_process_results[-1]
    assert rank1["skipped"] == [(False, ""), (True, "non-finite reward or loss"), (False, "")]
    assert rank0["skipped"] == [(False, ""), (True, "non-finite reward or loss in another process"),
                                (False, "")]
    for a, b in zip(rank0["weights"], rank1["weights"]):  # the processes stay in step
        assert torch.equal(a, b)


def test_state_of_two_processes_resumes_in_one(two_process_results):
    method, eta, row_by_row, accum, batch = W.CONFIGS[0]
    dp = two_process_results[0]
    resumed = W.toy_trainer(method, eta, row_by_row, accum, 2 * batch)
    with torch.no_grad():
        for p, w in zip(resumed.params, dp["state"]["weights"]):
            p.copy_(w)
    resumed.load_state_dict(dp["state"]["trainer"])
    assert resumed.iteration == 2
    resumed.step()
    for a, b in zip(W.lora_weights(resumed), dp["weights"]):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_a_dying_process_stops_the_job_and_leaves_the_last_save_intact():
    with tempfile.TemporaryDirectory() as out:
        codes = _run(W.die_in_update_two, 2, out, timeout=120)
        assert codes[1] == 3
        with open(os.path.join(out, "rank0.json")) as f:
            outcome = json.load(f)
        assert "other_error" not in outcome, outcome.get("other_error")
        assert outcome["saved_after"] == [1]
        assert "another rank stopped" in outcome["error"] and "gradient all-reduce" in outcome["error"]
        path = os.path.join(out, "toy_lora.safetensors")
        expected = torch.load(os.path.join(out, "weights1.pt"))
        trainer = W.toy_trainer("draft_k", 0.0, False, 1, 1)
        saved = lora_file.load_kohya(path, {name: name for name, _ in trainer.lora.items()})
        with torch.no_grad():
            for p, w in zip(trainer.params, expected):
                p.copy_(w)
        assert len(saved) == len(trainer.lora) > 0
        for name, d in trainer.lora.items():  # the file holds the weights after update 1
            assert torch.allclose(saved[name].down.reshape(d.down.shape), d.down, atol=1e-7)
            assert torch.allclose(saved[name].up.reshape(d.up.shape), d.up, atol=1e-7)
        state = load_training_state(state_path_for(path), trainer.lora)
        assert state["iteration"] == 1
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
