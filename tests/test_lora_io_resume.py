"""Resume: LoRA file + optimizer side file restore training exactly (no ComfyUI).

An AdamW run interrupted after a few steps, saved (LoRA in float32 + ``.draft_state``) and
reloaded into fresh objects continues bit-identically to the uninterrupted run; the step count and
the rest of the trainer's state come back; files that do not belong are refused.
"""
import math
import zlib

import pytest
import torch

from lora_fixtures import NAME_MAP, make_lora
from training import lora_file, lora_resume, safe_files
from training.lora import LoRASet


def shapes_of(lora):
    return {n: d.weight_shape for n, d in lora.items()}


def loss_of(lora: LoRASet, step: int) -> torch.Tensor:
    """A deterministic non-quadratic loss of every delta, different at every step."""
    total = 0.0
    for name, d in lora.items():  # inputs depend on (step, layer), not on the layer order
        g = torch.Generator().manual_seed(1000 * step + zlib.crc32(name.encode()))
        w = d.delta().flatten(1)
        x = torch.randn(w.shape[1], 3, generator=g)
        total = total + torch.tanh(w @ x).square().mean() - 0.1 * (w @ x).mean()
    return total


def make_optimizer(lora: LoRASet, amsgrad=False) -> torch.optim.Optimizer:
    params = lora.trainable_parameters()
    # two groups (downs, ups) with their own learning rates, like a trainer might use
    return torch.optim.AdamW([{"params": params[0::2], "lr": 3e-2},
                              {"params": params[1::2], "lr": 1e-2}],
                             betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, amsgrad=amsgrad)


def train(lora, optimizer, steps, clip=None):
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        loss_of(lora, step).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(lora.trainable_parameters(), clip)
        optimizer.step()


def trainer_state(optimizer, iteration):
    return {"iteration": iteration, "skipped_steps": 1, "history": [0.5, float("nan"), 0.75],
            "optimizer": optimizer.state_dict(), "scaler": {"scale": 65536.0, "_growth_tracker": 3},
            "resolution": (512, 768)}


@pytest.mark.parametrize("amsgrad,clip", [(False, None), (True, 0.05)])
def test_resume_continues_bit_identically(tmp_path, amsgrad, clip):
    # uninterrupted
    lora = make_lora(seed=0)
    opt = make_optimizer(lora, amsgrad)
    train(lora, opt, range(5), clip)
    expected = [p.detach().clone() for p in lora.trainable_parameters()]

    # interrupted after 2 steps, saved, reloaded into fresh objects, 3 more steps
    lora = make_lora(seed=0)
    opt = make_optimizer(lora, amsgrad)
    train(lora, opt, range(2), clip)
    path = lora_file.save_kohya(str(tmp_path / "run.safetensors"), lora, NAME_MAP, dtype=torch.float32)
    state_path = lora_resume.save_training_state(lora_resume.state_path_for(path), trainer_state(opt, 2),
                                                 lora, optimizer=opt)
    assert state_path == str(tmp_path / "run.draft_state")
    saved_opt = opt.state_dict()
    del lora, opt

    resumed = lora_file.load_kohya(path, NAME_MAP, shapes_of(make_lora()))
    state = lora_resume.load_training_state(state_path, resumed)
    opt2 = make_optimizer(resumed, amsgrad)
    opt2.load_state_dict(state["optimizer"])
    assert state["iteration"] == 2 and state["skipped_steps"] == 1
    assert state["history"][0] == 0.5 and math.isnan(state["history"][1])
    assert state["scaler"] == {"scale": 65536.0, "_growth_tracker": 3}
    assert state["resolution"] == (512, 768)  # tuples come back as tuples
    restored = opt2.state_dict()
    assert restored["param_groups"] == saved_opt["param_groups"]
    for i, s in saved_opt["state"].items():
        assert set(restored["state"][i]) == set(s)
        assert all(torch.equal(restored["state"][i][k], v) for k, v in s.items())
    train(resumed, opt2, range(2, 5), clip)
    got = resumed.trainable_parameters()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_state_is_matched_by_name_whatever_the_lora_order(tmp_path):
    lora = make_lora(seed=0)
    opt = make_optimizer(lora)
    train(lora, opt, range(2))
    path = lora_file.save_kohya(str(tmp_path / "run.safetensors"), lora, NAME_MAP, dtype=torch.float32)
    lora_resume.save_training_state(lora_resume.state_path_for(path), trainer_state(opt, 2), lora,
                                             optimizer=opt)
    train(lora, opt, range(2, 4))
    expected = {f"{n}.{k}": getattr(d, k).detach().clone() for n, d in lora.items() for k in ("down", "up")}

    reversed_shapes = dict(reversed(list(shapes_of(lora).items())))
    resumed = lora_file.load_kohya(path, NAME_MAP, reversed_shapes)
    assert resumed.names() == list(reversed_shapes)
    state = lora_resume.load_training_state(lora_resume.state_path_for(path), resumed)
    # an optimizer built on the reversed LoRA, groups as saved (their members in this LoRA's order)
    params = resumed.trainable_parameters()
    opt2 = torch.optim.AdamW([{"params": [params[i] for i in g["params"]]}
                              for g in state["optimizer"]["param_groups"]])
    opt2.load_state_dict(state["optimizer"])
    train(resumed, opt2, range(2, 4))
    for n, d in resumed.items():
        assert torch.equal(d.down, expected[f"{n}.down"]) and torch.equal(d.up, expected[f"{n}.up"])


def test_side_file_layout(tmp_path):
    lora = make_lora()
    opt = make_optimizer(lora)
    train(lora, opt, range(1))
    path = lora_resume.save_training_state(str(tmp_path / "s.draft_state"), trainer_state(opt, 1), lora,
                                           optimizer=opt)
    tensors, meta = safe_files.read_safetensors(path)
    assert meta["draft_state.step"] == "1"
    names = [f"{n}.{k}" for n in make_lora().names() for k in ("down", "up")]
    assert __import__("json").loads(meta["draft_state.param_names"]) == names
    first = names[0]
    assert tensors[f"optimizer/{first}/exp_avg"].shape == lora[first[:-5]].down.shape
    assert {k.rsplit("/", 1)[1] for k in tensors} == {"exp_avg", "exp_avg_sq", "step"}
    assert not lora_resume.state_path_for("x/y.safetensors").endswith(".safetensors")  # not listed as a LoRA


def test_state_files_that_do_not_belong_are_refused(tmp_path):
    lora = make_lora(rank=4)
    opt = make_optimizer(lora)
    train(lora, opt, range(1))
    path = lora_resume.save_training_state(str(tmp_path / "s.draft_state"), trainer_state(opt, 1), lora,
                                           optimizer=opt)
    with pytest.raises(safe_files.LoRAFileError, match="other LoRA layers or ranks"):
        lora_resume.load_training_state(path, make_lora(rank=2))
    with pytest.raises(safe_files.LoRAFileError, match="other LoRA layers or ranks"):
        lora_resume.load_training_state(path, make_lora(targets=NAME_MAP.keys() - {"input_blocks.1.conv"}))
    other_weights = make_lora(rank=4, seed=5)
    with pytest.raises(safe_files.LoRAFileError, match="weights differ"):
        lora_resume.load_training_state(path, other_weights)
    assert lora_resume.load_training_state(path, other_weights, check_weights=False)["iteration"] == 1
    lora_path = lora_file.save_kohya(str(tmp_path / "l.safetensors"), lora, NAME_MAP)
    with pytest.raises(safe_files.LoRAFileError, match="not a DRaFT training-state file"):
        lora_resume.load_training_state(lora_path, lora)
    data = open(path, "rb").read()
    (tmp_path / "t.draft_state").write_bytes(data[: len(data) // 2])
    with pytest.raises(safe_files.LoRAFileError, match="truncated or corrupt"):
        lora_resume.load_training_state(str(tmp_path / "t.draft_state"), lora)
    with pytest.raises(ValueError, match="build it on lora.trainable_parameters"):
        lora_resume.save_training_state(str(tmp_path / "x.draft_state"), trainer_state(opt, 1),
                                        make_lora(targets=list(NAME_MAP)[:3]))


def test_a_single_group_optimizer_needs_no_optimizer_object(tmp_path):
    """DraftTrainer builds AdamW on lora.trainable_parameters() in order: its state_dict suffices."""
    lora = make_lora()
    opt = torch.optim.AdamW(lora.trainable_parameters(), lr=1e-2)
    train(lora, opt, range(2))
    path = lora_resume.save_training_state(str(tmp_path / "s.draft_state"), trainer_state(opt, 2), lora)
    state = lora_resume.load_training_state(path, lora)
    assert state["optimizer"]["param_groups"][0]["params"] == list(range(2 * len(lora)))
    for i, s in opt.state_dict()["state"].items():
        assert all(torch.equal(state["optimizer"]["state"][i][k], v) for k, v in s.items())
    # groups in another order than the LoRA's, without the optimizer object: refused, not mixed up
    grouped = make_optimizer(lora)
    train(lora, grouped, range(1))
    with pytest.raises(ValueError, match="has shape"):
        lora_resume.save_training_state(str(tmp_path / "g.draft_state"), trainer_state(grouped, 1), lora)
