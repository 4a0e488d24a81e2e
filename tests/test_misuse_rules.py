"""Misuse without ComfyUI: iteration accounting on interruption, portable names, left-over
temporary files of killed saves, the engine's setting rules."""
import os
import subprocess
import sys
import time

import pytest
import torch

from training import SamplerSettings
from training import lora_file, safe_files
from training.input_rules import (lora_ranks_alphas, rank_problem, resume_iteration_problem,
                                  resume_mismatch, schedule_problem)
from training.lora import LoRADelta, LoRASet
from training.toy_models import colour_reward

from test_trainer import make_trainer, weights


class Cancel(Exception):
    pass


def test_an_interrupted_update_leaves_counter_weights_and_seed_as_after_the_last_finished_one():
    """A Cancel inside update 3 (raised from the reward, as ComfyUI's interrupt is raised from the
    denoiser) leaves iteration 2 and the weights of 2 updates; continuing gives exactly the run
    that was never interrupted."""
    straight, lora_s = make_trainer()
    for _ in range(4):
        straight.step()

    calls = {"n": 0, "cancel_at": 3}

    def cancellable(images, prompts=()):
        calls["n"] += 1
        if calls["n"] == calls["cancel_at"]:
            raise Cancel()
        return colour_reward(images)

    trainer, lora = make_trainer(reward=cancellable)
    trainer.step()
    trainer.step()
    after_two = weights(lora)
    with pytest.raises(Cancel):
        trainer.step()
    assert trainer.iteration == 2 and len(trainer.history) == 2
    assert trainer.state_dict()["iteration"] == 2
    assert all(torch.equal(a, b) for a, b in zip(after_two, weights(lora)))
    r3, r4 = trainer.step(), trainer.step()
    assert (r3.iteration, r4.iteration, trainer.iteration) == (3, 4, 4)
    assert all(torch.equal(a, b) for a, b in zip(weights(lora_s), weights(lora)))


def test_a_cancel_inside_the_first_update_leaves_iteration_zero():
    def cancel(images, prompts=()):
        raise Cancel()

    trainer, lora = make_trainer(reward=cancel)
    before = weights(lora)
    with pytest.raises(Cancel):
        trainer.step()
    assert trainer.iteration == 0 and trainer.history == []
    assert all(torch.equal(a, b) for a, b in zip(before, weights(lora)))


@pytest.mark.parametrize("name, fragment", [
    ("draft/a:b", "':'"), ("dra*ft/x", "'*'"), ('x"y', "'\"'"), ("a?b", "'?'"), ("a<b>", "'<'"),
    ("a|b", "'|'"), ("tab\there", "'\\t'"), ("folder./x", "dot"), ("x ", "space"),
    ("CON", "reserved"), ("draft/nul.txt", "reserved"), ("lpt1", "reserved"), ("Com9/x", "reserved"),
    ("a" * 256, "bytes"),
])
def test_names_other_systems_cannot_hold_are_refused(name, fragment):
    problem = safe_files.portable_name_problem(name)
    assert problem is not None and fragment in problem, problem


@pytest.mark.parametrize("name", ["draft/draft_lora", "my lora v1.2", "ünïcode/名前", "CONSOLE",
                                  "com10", "a.b.c", "x-y_z"])
def test_ordinary_names_pass(name):
    assert safe_files.portable_name_problem(name) is None


def _lora():
    lora = LoRASet()
    lora.add("layer", LoRADelta((8, 8), 2, 2.0))
    return lora


def test_leftover_temp_files_of_a_killed_save_are_removed_at_the_next_save(tmp_path):
    """A save process killed mid-write leaves its hidden temporary file; the next save into that
    folder removes it, and leaves a live process's temporary file, other hidden files and other
    folders alone."""
    folder = tmp_path / "loras" / "draft"
    folder.mkdir(parents=True)
    # a real save killed mid-write: a child process that stops inside save_file
    code = (
        "import os, sys, signal\n"
        "import safetensors.torch as st\n"
        "from training import lora_file, safe_files\n"
        "def stop(*a, **k):\n"
        "    open(a[1], 'wb').write(b'partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "safe_files.save_file = stop\n"
        "from training.lora import LoRASet, LoRADelta\n"
        "lora = LoRASet(); lora.add('layer', LoRADelta((8, 8), 2, 2.0))\n"
        f"lora_file.save_kohya({str(folder / 'killed.safetensors')!r}, lora, None)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert proc.returncode != 0
    leftovers = [n for n in os.listdir(folder) if n.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".killed.safetensors.draft-"), os.listdir(folder)
    assert not (folder / "killed.safetensors").exists()
    # a temporary file a live process (this one's parent) is writing, an old-style left-over,
    # a fresh old-style one (liveness unknown), someone else's hidden file, a sub-folder's left-over
    live = folder / f".other.safetensors.draft-{os.getppid()}-abcd1234.tmp"
    live.write_bytes(b"x")
    old_style = folder / ".old.safetensors.a1b2c3d4.tmp"
    old_style.write_bytes(b"x")
    past = time.time() - 2 * safe_files.STALE_SECONDS
    os.utime(old_style, (past, past))
    fresh_old_style = folder / ".new.safetensors.z9y8x7w6.tmp"
    fresh_old_style.write_bytes(b"x")
    foreign = folder / ".DS_Store"
    foreign.write_bytes(b"x")
    sub = folder / "sub"
    sub.mkdir()
    sub_left = sub / f".s.safetensors.draft-{leftovers[0].split('-')[1]}-00000000.tmp"
    sub_left.write_bytes(b"x")

    lora_file.save_kohya(str(folder / "next.safetensors"), _lora(), None)
    names = set(os.listdir(folder))
    assert leftovers[0] not in names and old_style.name not in names
    assert {live.name, fresh_old_style.name, foreign.name, "next.safetensors", "sub"} <= names
    assert not [n for n in names if n.startswith(".next.")]  # its own temporary file is gone
    assert sub_left.exists()  # only the folder saved into is cleaned


def test_a_temp_file_being_written_by_this_process_is_not_a_leftover(tmp_path):
    tmp = safe_files.temp_path_for(str(tmp_path / "x.safetensors"))
    open(tmp, "wb").close()
    assert not safe_files.is_leftover(tmp)
    safe_files.release_temp(tmp)
    assert safe_files.is_leftover(tmp)


def test_schedule_rules():
    assert schedule_problem(SamplerSettings(method="draft_k", k=7), 6) is not None
    assert "k = 7" in schedule_problem(SamplerSettings(method="draft_k", k=7), 6)
    assert schedule_problem(SamplerSettings(method="draft_k", k=6), 6) is None
    assert "k_max = 10" in schedule_problem(SamplerSettings(method="random_k", k_min=1, k_max=10), 6)
    assert schedule_problem(SamplerSettings(method="draft_lv", k=50), 1) is None
    assert schedule_problem(SamplerSettings(method="draft"), 0) is not None


def test_rank_and_resume_rules():
    widths = {"narrow": (4, 64), "wide": (64, 64)}
    assert rank_problem(4, widths) is None
    assert "at most 4" in rank_problem(5, widths) and "narrow" in rank_problem(5, widths)
    ranks, alphas = lora_ranks_alphas(_lora())  # rank 2, alpha 2
    assert resume_mismatch(ranks, alphas, 2, 2.0) is None
    assert "rank 2" in resume_mismatch(ranks, alphas, 8, 2.0)
    assert "alpha 2" in resume_mismatch(ranks, alphas, 2, 8.0)
    assert "2..4" in resume_mismatch([2, 4], [2.0, 2.0], 2, 2.0)
    where = "DRaFT LoRA Settings (node 11) says"  # the settings' node, as the trainer names it
    assert f"{where} lora_rank 8, lora_alpha 2" in resume_mismatch(ranks, alphas, 8, 2.0, where)
    assert resume_iteration_problem(3, 5) is None
    assert "above 5" in resume_iteration_problem(5, 5)
