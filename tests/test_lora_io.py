"""The LoRA file modules without ComfyUI: kohya layout, metadata, atomic writes, import and refusals.

The real ldm<->diffusers map and the real loaders are exercised in test_lora_io_comfy.py; here a
small plain-torch model with ldm-like names and a made-up map stands in (lora_fixtures).
"""
import datetime
import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_fixtures import NAME_MAP, TARGETS, make_lora
from training import lora_diffusers, lora_file, lora_metadata, safe_files


def shapes_of(lora):
    return {n: d.weight_shape for n, d in lora.items()}


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# -- export ---------------------------------------------------------------------------------------
def test_kohya_layout_conv_4d_alpha_and_metadata(tmp_path):
    lora = make_lora(rank=4, alpha=3.0)
    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"pretend checkpoint")
    settings = {"method": "draft_k", "K": 1, "n": 2, "reward": "aesthetic", "steps": 20, "cfg": 7.5,
                "iterations": 100, "learning_rate": 1e-4, "seed": 7,
                "prompts": ["a cat", 'a "quoted" dog'],
                "base_model_sha256": lora_metadata.sha256_file(str(ckpt)), "partial": False, "step": 100}
    path = lora_file.save_kohya(str(tmp_path / "my_lora.safetensors"), lora, NAME_MAP,
                              metadata=lora_metadata.draft_metadata(settings), base_model="sd_v1",
                              dtype=torch.float16)
    tensors, meta = read(path)
    assert len(tensors) == 3 * len(TARGETS)
    stem = "lora_unet_down_blocks_0_attentions_0"
    assert tensors[f"{stem}_proj_in.lora_down.weight"].shape == (4, 8, 1, 1)  # conv: 4-D
    assert tensors[f"{stem}_proj_in.lora_up.weight"].shape == (16, 4, 1, 1)
    assert tensors[f"{stem}_conv.lora_down.weight"].shape == (4, 12, 3, 3)
    assert tensors[f"{stem}_conv.lora_up.weight"].shape == (12, 4, 1, 1)
    assert tensors[f"{stem}_attn1_to_out_0.lora_down.weight"].shape == (4, 16)  # Linear: 2-D
    assert tensors[f"{stem}_attn1_to_out_0.lora_up.weight"].shape == (12, 4)
    assert tensors[f"{stem}_attn1_to_q.lora_down.weight"].dtype == torch.float16
    alpha = tensors[f"{stem}_conv.alpha"]
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and float(alpha) == 3.0
    d = lora["input_blocks.1.conv"]
    torch.testing.assert_close(tensors[f"{stem}_conv.lora_down.weight"].float().flatten(1), d.down.detach(),
                               rtol=1e-3, atol=1e-4)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "3"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.title"] == "my_lora"
    assert datetime.datetime.fromisoformat(meta["modelspec.date"]).year >= 2024
    assert meta["draft_method"] == "draft_k" and meta["draft_K"] == "1" and meta["draft_n"] == "2"
    assert meta["draft_cfg"] == "7.5" and meta["draft_learning_rate"] == "0.0001"
    assert json.loads(meta["draft_prompts"]) == settings["prompts"]
    assert meta["draft_base_model_sha256"] == hashlib.sha256(b"pretend checkpoint").hexdigest()
    assert meta["draft_partial"] == "false" and meta["draft_step"] == "100"


@pytest.mark.parametrize("base_model,v_pred,version,arch", [
    ("sd_v1", None, "sd_v1", "stable-diffusion-v1/lora"),
    ("sd_v2", False, "sd_v2", "stable-diffusion-v2-512/lora"),
    ("sd_v2", True, "sd_v2", "stable-diffusion-v2-768-v/lora"),
    ("sd_v2", None, "sd_v2", "stable-diffusion-v2-768-v/lora"),  # kohya's choice when unknown
    ("sd_v2_512", None, "sd_v2", "stable-diffusion-v2-512/lora"),
    ("sdxl_base_v1-0", None, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
])
def test_base_model_metadata(base_model, v_pred, version, arch):
    meta = lora_metadata.kohya_metadata(make_lora(), base_model, v_prediction=v_pred)
    assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == arch
    assert meta["ss_v2"] == ("True" if version == "sd_v2" else "False")
    # an alias passed as metadata is normalised too
    meta = lora_metadata.kohya_metadata(make_lora(), None, {"ss_base_model_version": "sd_v2_768_v"})
    assert meta["ss_base_model_version"] == "sd_v2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


@pytest.mark.parametrize("base_model,version,arch,module", [
    # values kohya's trainers write (checked against their code in tests/test_kohya_tools.py)
    ("sd_v1", "sd_v1", "stable-diffusion-v1/lora", "networks.lora"),
    ("sd3_medium", "medium", "stable-diffusion-3-medium/lora", "networks.lora_sd3"),
    ("sd3_5_medium", "5-medium", "stable-diffusion-3-5-medium/lora", "networks.lora_sd3"),
    ("sd3_5_large", "5-large", "stable-diffusion-3-5-large/lora", "networks.lora_sd3"),
    ("flux1_dev", "flux1", "flux-1-dev/lora", "networks.lora_flux"),
    ("flux1_schnell", "flux1", "flux-1-schnell/lora", "networks.lora_flux"),
    ("chroma", "chroma", "chroma/lora", "networks.lora_flux"),
    ("qwen_image", "qwen_image", "Qwen-Image/lora", "networks.lora_qwen_image"),
    ("lumina2", "lumina2", "lumina-2/lora", "networks.lora_lumina"),
    ("hunyuan_image_2_1", "hunyuan-image-2.1", "hunyuan-image-2.1/lora", "networks.lora_hunyuan_image"),
    ("hidream_i1", "hidream_i1", None, "networks.lora"),  # unknown: no architecture claimed
])
def test_network_module_and_base_model_per_family(base_model, version, arch, module):
    meta = lora_metadata.kohya_metadata(make_lora(), base_model, {"ss_network_module": "mine"})
    assert meta["ss_base_model_version"] == version
    assert meta.get("modelspec.architecture") == arch
    assert meta["ss_network_module"] == module  # describes the file; a caller cannot override it


def test_unknown_base_model_claims_no_architecture_and_mixed_ranks_are_dynamic():
    lora = make_lora(rank=2, alpha=1.0, targets=TARGETS[:4])
    for n, d in make_lora(rank=8, alpha=8.0, targets=TARGETS[4:]).items():
        lora.add(n, d)
    meta = lora_metadata.kohya_metadata(lora, "hidream_i1")
    assert meta["ss_base_model_version"] == "hidream_i1" and "modelspec.architecture" not in meta
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert lora_metadata.base_model_version_from_config("SD15") == "sd_v1"
    assert lora_metadata.base_model_version_from_config("SSD1B") is None


def test_caller_metadata_cannot_contradict_the_tensors():
    meta = lora_metadata.kohya_metadata(make_lora(rank=4, alpha=3.0), "sd_v1",
                                        {"ss_network_dim": "128", "modelspec.title": "Mine", "draft_x": None})
    assert meta["ss_network_dim"] == "4" and meta["modelspec.title"] == "Mine" and "draft_x" not in meta


def test_round_trip_fp32_is_bit_identical_and_keeps_the_model_order(tmp_path):
    lora = make_lora(alpha=0.1)  # 0.1 is not a float32: the exact alpha travels in the metadata
    path = lora_file.save_kohya(str(tmp_path / "x.safetensors"), lora, NAME_MAP, dtype=torch.float32)
    _, meta = read(path)
    assert lora_metadata.EXACT_ALPHA_KEY in meta
    shapes = dict(reversed(list(shapes_of(lora).items())))
    back = lora_file.load_kohya(path, NAME_MAP, shapes)
    assert back.names() == list(shapes)
    for name, d in lora.items():
        b = back[name]
        assert b.alpha == d.alpha == 0.1 and b.rank == d.rank and b.weight_shape == d.weight_shape
        assert torch.equal(b.up, d.up) and torch.equal(b.down, d.down)
        assert b.down.dtype == torch.float32 and torch.equal(b.delta(), d.delta())


def test_fp16_export_reads_back_close_with_exact_alpha(tmp_path):
    lora = make_lora(alpha=3.0)
    path = lora_file.save_kohya(str(tmp_path / "x.safetensors"), lora, NAME_MAP, dtype=torch.float16)
    back = lora_file.load_kohya(path, NAME_MAP, shapes_of(lora))
    for name, d in lora.items():
        assert back[name].alpha == 3.0
        torch.testing.assert_close(back[name].delta(), d.delta().detach(), rtol=2e-3, atol=1e-4)


def test_names_as_they_are_without_a_map(tmp_path):
    lora = make_lora()
    path = lora_file.save_kohya(str(tmp_path / "x.safetensors"), lora, None, dtype=torch.float32)
    tensors, _ = read(path)
    assert "lora_unet_input_blocks_1_attn1_to_out_0.lora_up.weight" in tensors
    back = lora_file.load_kohya(path, None, shapes_of(lora))
    assert all(torch.equal(back[n].up, d.up) for n, d in lora.items())


def test_refuses_what_it_cannot_write_faithfully(tmp_path):
    lora = make_lora()
    with pytest.raises(safe_files.LoRAFileError, match="no diffusers name"):
        lora_file.save_kohya(str(tmp_path / "a.safetensors"), lora, {TARGETS[0]: "x"})
    with torch.no_grad():
        lora[TARGETS[1]].up.mul_(1e6)
    with pytest.raises(safe_files.LoRAFileError, match="overflows torch.float16"):
        lora_file.save_kohya(str(tmp_path / "b.safetensors"), lora, NAME_MAP, dtype=torch.float16)
    with torch.no_grad():
        lora[TARGETS[1]].up[0, 0] = float("nan")
    with pytest.raises(safe_files.LoRAFileError, match="not finite"):
        lora_file.save_kohya(str(tmp_path / "c.safetensors"), lora, NAME_MAP, dtype=torch.float32)
    assert os.listdir(tmp_path) == []


def test_diffusers_layout_folds_alpha_over_rank_into_lora_b():
    lora = make_lora(rank=4, alpha=2.0)
    sd = lora_diffusers.diffusers_state_dict(lora, NAME_MAP)
    a = sd["unet.down_blocks.0.attentions.0.attn1.to_out.0.lora_A.weight"]
    b = sd["unet.down_blocks.0.attentions.0.attn1.to_out.0.lora_B.weight"]
    torch.testing.assert_close(b @ a, lora["input_blocks.1.attn1.to_out.0"].delta().detach())
    assert sd["unet.down_blocks.0.attentions.0.conv.lora_A.weight"].shape == (4, 12, 3, 3)
    assert sd["unet.down_blocks.0.attentions.0.conv.lora_B.weight"].shape == (12, 4, 1, 1)


# -- atomic writes --------------------------------------------------------------------------------
def test_never_overwrites_unless_asked_and_leaves_no_temp_files(tmp_path):
    path = str(tmp_path / "x.safetensors")
    lora_file.save_kohya(path, make_lora(seed=0), NAME_MAP)
    before = open(path, "rb").read()
    with pytest.raises(FileExistsError):
        lora_file.save_kohya(path, make_lora(seed=1), NAME_MAP)
    assert open(path, "rb").read() == before
    lora_file.save_kohya(path, make_lora(seed=1), NAME_MAP, overwrite=True)
    assert open(path, "rb").read() != before
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_an_interrupted_write_leaves_the_old_file_and_no_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "x.safetensors")
    lora_file.save_kohya(path, make_lora(seed=0), NAME_MAP)
    before = open(path, "rb").read()

    def dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(safe_files, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        lora_file.save_kohya(path, make_lora(seed=1), NAME_MAP, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        lora_file.save_kohya(str(tmp_path / "new.safetensors"), make_lora(seed=1), NAME_MAP)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["x.safetensors"]


# -- import: other trainers' files ----------------------------------------------------------------
def kohya_tensors(lora, name_map=NAME_MAP):
    return lora_file.kohya_state_dict(lora, name_map, torch.float32)


def write(tmp_path, tensors, name="f.safetensors", metadata=None):
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def test_other_trainers_layouts_load(tmp_path):
    lora = make_lora(rank=4, alpha=4.0)  # alpha = rank, so a file without alpha means the same
    shapes = shapes_of(lora)
    no_alpha = {k: v for k, v in kohya_tensors(lora).items() if not k.endswith(".alpha")}
    ldm_names = kohya_tensors(lora, None)
    flat = {}  # ComfyUI's own trainer: dotted ldm names, conv factors 2-D
    for n, d in lora.items():
        flat[f"diffusion_model.{n}.lora_down.weight"] = d.down.detach()
        flat[f"diffusion_model.{n}.lora_up.weight"] = d.up.detach()
        flat[f"diffusion_model.{n}.alpha"] = torch.tensor(4.0)
    for i, sd in enumerate([no_alpha, ldm_names, flat]):
        back = lora_file.load_kohya(write(tmp_path, sd, f"{i}.safetensors"), NAME_MAP, shapes)
        for n, d in lora.items():
            assert back[n].alpha == 4.0
            assert torch.equal(back[n].delta(), d.delta()), (i, n)


def test_a_1x1_conv_lora_fits_a_linear_layer(tmp_path):
    """SD1.5 LoRAs store proj_in 4-D; on an SD2-style linear proj_in the same factors apply."""
    lora = make_lora()
    sd = kohya_tensors(lora)
    key = "lora_unet_down_blocks_0_attentions_0_attn1_to_q"
    sd[f"{key}.lora_down.weight"] = sd[f"{key}.lora_down.weight"][:, :, None, None]
    back = lora_file.load_kohya(write(tmp_path, sd), NAME_MAP, shapes_of(lora))
    assert torch.equal(back["input_blocks.1.attn1.to_q"].down, lora["input_blocks.1.attn1.to_q"].down)


def test_without_shapes_they_come_from_the_file(tmp_path):
    lora = make_lora()
    back = lora_file.load_kohya(write(tmp_path, kohya_tensors(lora)), NAME_MAP)
    assert back.names() == TARGETS and shapes_of(back) == shapes_of(lora)


# -- import: refusals ------------------------------------------------------------------------------
def test_truncated_empty_and_non_safetensors_files_are_refused(tmp_path):
    lora = make_lora()
    path = lora_file.save_kohya(str(tmp_path / "x.safetensors"), lora, NAME_MAP, dtype=torch.float32)
    data = open(path, "rb").read()
    for name, content in [("t.safetensors", data[: len(data) - 100]), ("h.safetensors", data[:40]),
                          ("e.safetensors", b""), ("g.safetensors", b"PK\x03\x04 a zip, not safetensors")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(safe_files.LoRAFileError, match="truncated or corrupt"):
            lora_file.load_kohya(str(tmp_path / name), NAME_MAP, shapes_of(lora))
    with pytest.raises(FileNotFoundError):
        lora_file.load_kohya(str(tmp_path / "missing.safetensors"), NAME_MAP)


@pytest.mark.parametrize("change,message", [
    (lambda sd: {"model.diffusion_model.input_blocks.1.proj_in.weight": torch.zeros(2)},
     "not a LoRA factor"),
    (lambda sd: dict(sd, **{"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(2, 2)}),
     "text-encoder LoRA"),
    (lambda sd: dict(sd, **{"lora_unet_down_blocks_0_attentions_0_conv.lora_mid.weight": torch.zeros(2)}),
     "not a LoRA factor"),
    (lambda sd: dict(sd, **{"lora_unet_down_blocks_0_attentions_0_conv.hada_w1_a": torch.zeros(2)}),
     "not a LoRA factor"),
    (lambda sd: dict(sd, **{"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(2, 2)}),
     "matches no target layer"),
    (lambda sd: {k: v for k, v in sd.items() if "attentions_1_conv.lora_up" not in k},
     "lacks lora_up or lora_down"),
    (lambda sd: {k: (torch.full_like(v, float("nan")) if "to_q.lora_up" in k else v) for k, v in sd.items()},
     "NaN or Inf"),
    (lambda sd: {k: (torch.ones(2) if k.endswith("to_q.alpha") else v) for k, v in sd.items()},
     "not a scalar"),
    (lambda sd: {k: (v[:, :8] if "attentions_0_attn1_to_q.lora_down" in k else v) for k, v in sd.items()},
     "input width"),
    (lambda sd: {k: (v[:3] if "attentions_0_attn1_to_q.lora_down" in k else v) for k, v in sd.items()},
     "ranks of up and down differ"),
    (lambda sd: {k: (v[:, :, :1, :1] if "attentions_0_conv.lora_down" in k else v) for k, v in sd.items()},
     "input channels or kernel"),
])
def test_foreign_and_mismatched_files_are_refused_naming_the_problem(tmp_path, change, message):
    lora = make_lora()
    path = write(tmp_path, change(kohya_tensors(lora)))
    with pytest.raises(safe_files.LoRAFileError, match=message):
        lora_file.load_kohya(path, NAME_MAP, shapes_of(lora))


def test_other_widths_and_missing_layers_are_refused(tmp_path):
    lora = make_lora()
    path = write(tmp_path, kohya_tensors(lora))
    wider = {n: (s[0] * 2,) + tuple(s[1:]) for n, s in shapes_of(lora).items()}
    with pytest.raises(safe_files.LoRAFileError, match="do not fit the layer's weight"):
        lora_file.load_kohya(path, NAME_MAP, wider)
    more = dict(shapes_of(lora), **{"input_blocks.3.proj_in": (16, 8, 1, 1)})
    with pytest.raises(safe_files.LoRAFileError, match="8 of the 9 target layers"):
        lora_file.load_kohya(path, dict(NAME_MAP, **{"input_blocks.3.proj_in": "x"}), more)
    back = lora_file.load_kohya(path, NAME_MAP, more, strict=False)
    assert back.names() == TARGETS
    with pytest.raises(safe_files.LoRAFileError, match="pass the name map"):
        lora_file.load_kohya(path)
