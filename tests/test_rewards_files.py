"""Safe, strict, explained file loading: code-carrying pickles refused, missing files and wrong
architectures reported with what to get and where."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import reward_models as R
from reward_models.files import check_state_dict
from reward_fixtures import TINY_OPEN_CLIP, tiny_open_clip, write_aesthetic_head, write_hps_checkpoint

HEAD_NAME = "sac+logos+ava1-l14-linearMSE.pth"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CustomObject:
    def __init__(self):
        self.weight = torch.zeros(2)


@pytest.mark.parametrize("how", ["torch_reduce", "plain_pickle_reduce", "custom_class"])
def test_code_carrying_pickle_is_refused(tmp_path, how):
    marker = tmp_path / "code_ran"
    path = tmp_path / HEAD_NAME
    if how == "torch_reduce":
        torch.save({"layers.0.weight": torch.zeros(2), "payload": _RunsCode(marker)}, path)
    elif how == "plain_pickle_reduce":
        with open(path, "wb") as f:
            pickle.dump({"payload": _RunsCode(marker)}, f)
    else:
        torch.save({"model": _CustomObject()}, path)
    with pytest.raises(R.UnsafeWeightsFileError, match="not a plain weights file and was refused for safety") as err:
        R.load_aesthetic_head(path)
    assert HEAD_NAME in str(err.value) and "weights_only=False" not in str(err.value)
    assert isinstance(err.value, R.RewardModelFileError) and isinstance(err.value, ValueError)
    assert not marker.exists()


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "ViT-L-14.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(R.UnsafeWeightsFileError, match="TorchScript"):
        R.load_weights(path)


def test_plain_files_load_in_every_published_container(tmp_path):
    sd = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    torch.save(sd, tmp_path / "x.pth")
    torch.save({"state_dict": sd, "epoch": 7, "name": "run"}, tmp_path / "x.pt")
    save_file(sd, str(tmp_path / "x.safetensors"))
    for name in ("x.pth", "x.pt", "x.safetensors"):
        loaded = R.load_weights(tmp_path / name)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(R.RewardModelFileError, match="unsupported weights file type"):
        R.load_weights(tmp_path / "x.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(R.RewardModelFileError, match="could not be read"):
        R.load_weights(tmp_path / "broken.safetensors")


@pytest.mark.parametrize("loader, name, architecture, source", [
    (lambda p: R.load_aesthetic_head(p), HEAD_NAME, "768->1024->128->64->16->1",
     "https://github.com/christophschuhmann/improved-aesthetic-predictor"),
    (lambda p: R.load_hpsv2(p), "HPS_v2.1_compressed.pt", "ViT-H-14", "https://huggingface.co/xswu/HPSv2"),
    (lambda p: R.load_pickscore(p), "PickScore_v1", "CLIPModel", "https://huggingface.co/yuvalkirstain/PickScore_v1"),
    (lambda p: R.load_aesthetic(p.parent / HEAD_NAME, p), "open_clip_model.safetensors", "ViT-L-14-quickgelu",
     "timm/vit_large_patch14_clip_224.openai"),
])
def test_missing_file_names_file_folder_architecture_and_source(tmp_path, loader, name, architecture, source):
    if name == "open_clip_model.safetensors":  # head present, backbone missing
        write_aesthetic_head(str(tmp_path / HEAD_NAME))
    with pytest.raises(R.MissingWeightsFileError) as err:
        loader(tmp_path / name)
    message = str(err.value)
    for needle in (name, str(tmp_path), architecture, source):
        assert needle in message, (needle, message)


def test_pickscore_folder_without_weights_or_config(tmp_path):
    folder = tmp_path / "PickScore_v1"
    folder.mkdir()
    with pytest.raises(R.MissingWeightsFileError, match="config.json"):
        R.load_pickscore(folder)
    (folder / "config.json").write_text("{}")
    with pytest.raises(R.MissingWeightsFileError, match="model.safetensors"):
        R.load_pickscore(folder)


def test_find_weights_and_download_hint(tmp_path):
    with pytest.raises(R.MissingWeightsFileError, match="HPS_v2.1_compressed.pt"):
        R.find_weights(tmp_path, R.HPSV2)
    (tmp_path / "HPS_v2_compressed.pt").write_bytes(b"")
    assert R.find_weights(tmp_path, R.HPSV2).endswith("HPS_v2_compressed.pt")
    hint = R.download_hint(R.PICKSCORE, str(tmp_path))
    assert "yuvalkirstain/PickScore_v1" in hint and str(tmp_path) in hint
    with pytest.raises(R.RewardModelFileError, match="No Hugging Face Hub repo"):
        R.download(R.AESTHETIC_HEAD, str(tmp_path))  # never reaches the network


def test_wrong_architecture_errors_name_architecture_and_keys(tmp_path):
    clip = tiny_open_clip()
    save_file(clip.state_dict(), str(tmp_path / "clip.safetensors"))
    with pytest.raises(R.WrongArchitectureError) as err:
        R.load_aesthetic_head(tmp_path / "clip.safetensors")
    assert "LAION aesthetic head" in str(err.value) and "layers.0.weight" in str(err.value)

    wider = {**TINY_OPEN_CLIP, "vision_cfg": {**TINY_OPEN_CLIP["vision_cfg"], "width": 48}}
    write_hps_checkpoint(str(tmp_path / "HPS_v2_compressed.pt"), clip)
    with pytest.raises(R.WrongArchitectureError) as err:
        R.load_hpsv2(tmp_path / "HPS_v2_compressed.pt", wider)
    assert "width=48" in str(err.value) and "visual.conv1.weight" in str(err.value) and "wrong shape" in str(err.value)

    with pytest.raises(R.WrongArchitectureError, match="ViT-H-14"):  # tiny file, published architecture
        R.load_hpsv2(tmp_path / "HPS_v2_compressed.pt")


def test_no_silent_partial_load(tmp_path):
    head_sd = write_aesthetic_head(str(tmp_path / "full.pth")).state_dict()
    partial = {k: v for k, v in head_sd.items() if k != "layers.7.bias"}
    torch.save(partial, tmp_path / HEAD_NAME)
    with pytest.raises(R.WrongArchitectureError, match="1 missing keys.*layers.7.bias"):
        R.load_aesthetic_head(tmp_path / HEAD_NAME)
    extra = {**head_sd, "layers.8.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / HEAD_NAME)
    with pytest.raises(R.WrongArchitectureError, match="unexpected keys.*layers.8.weight"):
        R.load_aesthetic_head(tmp_path / HEAD_NAME)
    check_state_dict(head_sd, head_sd, "same")  # identical: no error


def test_aesthetic_backbone_of_wrong_embedding_width(tmp_path):
    write_aesthetic_head(str(tmp_path / HEAD_NAME))
    save_file(tiny_open_clip().state_dict(), str(tmp_path / "open_clip_model.safetensors"))  # 16-d embeds
    with pytest.raises(R.WrongArchitectureError, match="16-d image embeddings but the aesthetic head expects 768-d"):
        R.load_aesthetic(tmp_path / HEAD_NAME, tmp_path / "open_clip_model.safetensors", architecture=TINY_OPEN_CLIP)


def test_reward_models_never_import_comfy():
    import pathlib
    import re

    root = pathlib.Path(R.__file__).parent
    for path in root.glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+comfy", path.read_text(), re.M), path
