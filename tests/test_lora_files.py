"""LoRA files without ComfyUI: kohya layout, round trips, resume, and refusals."""
import os

import pytest
import torch
from safetensors import safe_open

from training import DifferentiableSampler, DraftTrainer, SamplerSettings, TrainSettings, karras_sigmas, wrap_module
from training import lora_diffusers, lora_file, lora_resume, safe_files
from training.toy_models import TOY_LORA_TARGETS, build_toy_model, colour_reward

# The toy model's layers under made-up "diffusers" names (the real map comes from ComfyUI).
NAME_MAP = {n: n.replace("eps_net.", "unet_blocks.") for n in TOY_LORA_TARGETS}


def toy_lora(seed=0, rank=4, alpha=3.0):
    denoiser, decoder = build_toy_model(seed=0)
    lora = wrap_module(denoiser, TOY_LORA_TARGETS, rank=rank, alpha=alpha, seed=seed)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 7))
    return denoiser, decoder, lora


def shapes_of(lora):
    return {name: d.weight_shape for name, d in lora.items()}


def test_kohya_export_layout_alpha_and_metadata(tmp_path):
    _, _, lora = toy_lora(alpha=3.0)
    path = lora_file.save_kohya(str(tmp_path / "x.safetensors"), lora, NAME_MAP,
                                metadata={"draft_method": "draft_lv", "draft_partial": False},
                                base_model="sd_v1", dtype=torch.float16)
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        conv_down = f.get_tensor("lora_unet_unet_blocks_conv_in.lora_down.weight")
        conv_up = f.get_tensor("lora_unet_unet_blocks_conv_in.lora_up.weight")
        lin_down = f.get_tensor("lora_unet_unet_blocks_time_proj.lora_down.weight")
        alpha = f.get_tensor("lora_unet_unet_blocks_conv_in.alpha")
    assert len(keys) == 3 * len(TOY_LORA_TARGETS)
    assert all(k.startswith("lora_unet_") and k.count(".") in (1, 2) for k in keys)
    assert conv_down.shape == (4, 4, 3, 3) and conv_up.shape == (32, 4, 1, 1)  # conv stored 4-D
    assert lin_down.shape == (4, 16) and conv_down.dtype == torch.float16
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and float(alpha) == 3.0
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "3" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["draft_partial"] == "false" and meta["modelspec.sai_model_spec"] == "1.0.0"


def test_round_trip_is_bit_identical_in_fp32(tmp_path):
    _, _, lora = toy_lora()
    path = lora_file.save_kohya(str(tmp_path / "x.safetensors"), lora, NAME_MAP, dtype=torch.float32)
    back = lora_file.load_kohya(path, NAME_MAP, shapes_of(lora))
    assert back.names() == lora.names()
    for name, d in lora.items():
        b = back[name]
        assert torch.equal(b.up, d.up) and torch.equal(b.down, d.down)
        assert b.alpha == d.alpha and b.rank == d.rank and torch.equal(b.delta(), d.delta())


def test_refuses_to_overwrite_and_leaves_no_temp_files(tmp_path):
    _, _, lora = toy_lora()
    path = str(tmp_path / "x.safetensors")
    lora_file.save_kohya(path, lora, NAME_MAP)
    with pytest.raises(FileExistsError):
        lora_file.save_kohya(path, lora, NAME_MAP)
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_truncated_foreign_and_mismatched_files_are_refused(tmp_path):
    _, _, lora = toy_lora()
    path = lora_file.save_kohya(str(tmp_path / "x.safetensors"), lora, NAME_MAP, dtype=torch.float32)
    data = open(path, "rb").read()
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(safe_files.LoRAFileError, match="truncated or corrupt"):
        lora_file.load_kohya(str(truncated), NAME_MAP, shapes_of(lora))
    # A LoRA for layers this model does not have.
    with pytest.raises(safe_files.LoRAFileError, match="matches no target layer"):
        lora_file.load_kohya(path, NAME_MAP, {n: s for n, s in shapes_of(lora).items() if "mid" not in n})
    # Same names, other widths.
    wrong = {n: (s[0] * 2,) + tuple(s[1:]) for n, s in shapes_of(lora).items()}
    with pytest.raises(safe_files.LoRAFileError, match="do not fit"):
        lora_file.load_kohya(path, NAME_MAP, wrong)
    # A safetensors file that is not a LoRA at all.
    from safetensors.torch import save_file
    save_file({"model.diffusion_model.x.weight": torch.zeros(2)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(safe_files.LoRAFileError, match="not a LoRA factor"):
        lora_file.load_kohya(str(tmp_path / "ckpt.safetensors"), NAME_MAP, shapes_of(lora))


def test_kohya_file_from_another_trainer_without_alpha_defaults_to_rank(tmp_path):
    _, _, lora = toy_lora(rank=4, alpha=1.0)
    sd = lora_file.kohya_state_dict(lora, NAME_MAP, torch.float32)
    sd = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "other.safetensors"))
    back = lora_file.load_kohya(str(tmp_path / "other.safetensors"), NAME_MAP, shapes_of(lora))
    assert all(d.alpha == 4.0 for _, d in back.items())


def make_trainer(lora, denoiser, decoder):
    sampler = DifferentiableSampler(denoiser, karras_sigmas(6), SamplerSettings(method="draft_k", k=2))
    return DraftTrainer(sampler, decoder, colour_reward, ["a", "b"], lora, (4, 8, 8),
                        TrainSettings(batch_size=1, learning_rate=1e-2, seed=3))


def test_save_load_resume_continues_bit_identically(tmp_path):
    denoiser, decoder, lora = toy_lora()
    trainer = make_trainer(lora, denoiser, decoder)
    for _ in range(3):
        trainer.step()
    path = str(tmp_path / "run_step00003.safetensors")
    lora_file.save_kohya(path, lora, NAME_MAP, dtype=torch.float32)
    lora_resume.save_training_state(lora_resume.state_path_for(path), trainer.state_dict(), lora)
    for _ in range(2):
        trainer.step()
    expected = [p.detach().clone() for p in lora.trainable_parameters()]

    denoiser2, decoder2 = build_toy_model(seed=0)
    resumed = lora_file.load_kohya(path, NAME_MAP, shapes_of(lora))
    # attach the loaded deltas to a fresh model, in the same order as the original
    from torch.nn.utils import parametrize
    from training.lora import LoRASet, _WrappedWeight
    ordered = LoRASet()
    modules = dict(denoiser2.named_modules())
    for name in lora.names():
        ordered.add(name, resumed[name])
        modules[name].weight.requires_grad_(False)
        parametrize.register_parametrization(modules[name], "weight", _WrappedWeight(resumed[name]), unsafe=True)
    trainer2 = make_trainer(ordered, denoiser2, decoder2)
    trainer2.load_state_dict(lora_resume.load_training_state(lora_resume.state_path_for(path), ordered))
    assert trainer2.iteration == 3 and len(trainer2.history) == 3
    for _ in range(2):
        trainer2.step()
    assert all(torch.equal(a, b) for a, b in zip(expected, ordered.trainable_parameters()))


def test_state_file_for_other_layers_is_refused(tmp_path):
    denoiser, decoder, lora = toy_lora()
    trainer = make_trainer(lora, denoiser, decoder)
    trainer.step()
    path = lora_resume.save_training_state(str(tmp_path / "s.draft_state"), trainer.state_dict(), lora)
    _, _, other = toy_lora(rank=2)
    with pytest.raises(safe_files.LoRAFileError, match="other LoRA layers or ranks"):
        lora_resume.load_training_state(path, other)


def test_diffusers_layout_folds_scale_into_b(tmp_path):
    _, _, lora = toy_lora(rank=4, alpha=2.0)
    sd = lora_diffusers.diffusers_state_dict(lora, NAME_MAP)
    d = lora["eps_net.time_proj"]
    a, b = sd["unet.unet_blocks.time_proj.lora_A.weight"], sd["unet.unet_blocks.time_proj.lora_B.weight"]
    assert torch.allclose(b @ a, d.delta(), atol=1e-7)
