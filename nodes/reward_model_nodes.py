"""Reward nodes backed by model files: LAION aesthetic, HPSv2, PickScore, CLIP score.

Files live in ``models/reward_models`` (registered here, merged with any path that
``extra_model_paths.yaml`` gives under ``reward_models``); the aesthetic predictor can also use
ComfyUI's CLIP_VISION (``models/clip_vision``) as its backbone. Dropdowns list what is there; when
nothing is, the dropdown shows what to put where, and running the node says where its authors
publish it. Open_clip architectures can be extended with config JSON files (open_clip's
``model_configs`` format) placed in ``models/reward_models``.
"""
from __future__ import annotations

import json
import os

import torch
from comfy_api.latest import io

import comfy.model_management
import folder_paths

from ..reward_models import (AESTHETIC_HEAD, CLIP_VIT_L14_OPENAI, HPSV2, PICKSCORE, PUBLISHED,
                             MissingWeightsFileError, OutputSelectingEncoder, download, download_hint,
                             load_aesthetic, load_clip_score, load_hpsv2, load_pickscore)
from . import validation
from .checked_node import CheckedNode
from .comfy_glue import reward_patcher
from .reward_types import DraftReward, InPlaceSafeEncoder, RewardHandle

FOLDER = "reward_models"
WEIGHT_EXTENSIONS = {".safetensors", ".pth", ".pt", ".bin", ".ckpt"}
MISSING = "(missing) "
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(choice: str) -> torch.dtype:
    """``auto``: bf16 where ComfyUI's device supports it, else fp16 on a GPU, fp32 on the CPU."""
    if DTYPES.get(choice) is not None:
        return DTYPES[choice]
    device = comfy.model_management.get_torch_device()
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float16


def register_folder() -> None:
    """``models/reward_models`` as a ComfyUI model folder (kept if extra_model_paths set it)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | WEIGHT_EXTENSIONS | {".json"})
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], WEIGHT_EXTENSIONS | {".json"})
    os.makedirs(default, exist_ok=True)


def _folder_hint() -> str:
    return folder_paths.get_folder_paths(FOLDER)[0]


def weight_files(spec=None) -> list:
    files = [f for f in folder_paths.get_filename_list(FOLDER)
             if os.path.splitext(f)[1].lower() in WEIGHT_EXTENSIONS]
    if spec is None:
        return files
    files.sort(key=lambda f: (os.path.basename(f) not in spec.filenames, f))  # published names first
    return files or [MISSING + spec.filenames[0]]


def model_folders(spec) -> list:
    """Sub-folders (any depth 1) of the reward folders that hold a transformers ``config.json``."""
    found = []
    for root in folder_paths.get_folder_paths(FOLDER):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            if os.path.isfile(os.path.join(root, name, "config.json")):
                found.append(name)
    return found or [MISSING + spec.filenames[0]]


def architectures(default: str) -> list:
    """open_clip architecture names, plus config JSONs found in the reward folder (first)."""
    import open_clip
    custom = [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(".json")
              and os.path.basename(f) != "config.json"]
    names = open_clip.list_models()
    return [default] + custom + [n for n in names if n != default]


def resolve_architecture(name: str):
    if name.endswith(".json"):
        with open(folder_paths.get_full_path_or_raise(FOLDER, name), encoding="utf-8") as f:
            return json.load(f)
    return name


def resolve_file(name: str, spec, folder: bool = False) -> str:
    if name.startswith(MISSING) or not name:
        raise MissingWeightsFileError(
            f"{spec.title}: no weights in {folder_paths.get_folder_paths(FOLDER)}. "
            + download_hint(spec, _folder_hint()))
    if folder:
        for root in folder_paths.get_folder_paths(FOLDER):
            if os.path.isdir(os.path.join(root, name)):
                return os.path.join(root, name)
        raise MissingWeightsFileError(f"{spec.title}: folder '{name}' not found in "
                                      f"{folder_paths.get_folder_paths(FOLDER)}. " + download_hint(spec, _folder_hint()))
    path = folder_paths.get_full_path(FOLDER, name)
    if not path:
        raise MissingWeightsFileError(f"{spec.title}: file '{name}' not found in "
                                      f"{folder_paths.get_folder_paths(FOLDER)}. " + download_hint(spec, _folder_hint()))
    return path


def _handle(model, label, extra_patchers=()):
    patcher = reward_patcher(model)
    return RewardHandle(model=model, patchers=[*extra_patchers, *([patcher] if patcher else [])],
                        label=label)


def _dtype_input():
    return io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                          tooltip="Precision of the reward model's weights: auto is bf16 where the GPU supports it, else fp16, and fp32 on the CPU (half precision halves its VRAM).")


def _chunk_input():
    return io.Int.Input("chunk_size", default=4, min=1, max=256,
                        tooltip="Images scored per forward pass; lower it if VRAM is short.")


def _reward_schema(node_id: str, display_name: str, description: str, files: list,
                   reward_tooltip: str, optional: tuple = ()) -> io.Schema:
    """The schema every model reward node shares: its ``files`` inputs, then dtype and
    chunk_size, then the ``optional`` ones; one ``DRAFT_REWARD`` output."""
    return io.Schema(
        node_id=node_id,
        display_name=display_name,
        category="DRaFT/rewards",
        description=description,
        inputs=[*files, _dtype_input(), _chunk_input(), *optional],
        outputs=[DraftReward.Output(display_name="reward", tooltip=reward_tooltip)],
    )


class DraftAestheticReward(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _reward_schema(
            "DRaFTAestheticReward", "DRaFT Aesthetic Reward (LAION v2)",
            ("LAION aesthetic predictor v2: a linear MLP on normalised OpenAI CLIP ViT-L/14 "
             "image embeddings; scores about 1-10. Used in the DRaFT paper."),
            [
                io.Combo.Input("head", options=weight_files(AESTHETIC_HEAD),
                               tooltip=f"The head file ({AESTHETIC_HEAD.filenames[0]}) in models/reward_models; from {AESTHETIC_HEAD.source}."),
                io.Combo.Input("clip_weights", options=["(use clip_vision input)", *weight_files()],
                               default="(use clip_vision input)",
                               tooltip="OpenAI CLIP ViT-L/14 in open_clip format (models/reward_models), when no CLIP_VISION is connected."),
                io.Combo.Input("architecture", options=architectures("ViT-L-14-quickgelu"),
                               default="ViT-L-14-quickgelu",
                               tooltip="open_clip architecture of clip_weights (ViT-L-14-quickgelu = OpenAI CLIP ViT-L/14, whose 768-d embeddings the head expects)."),
            ],
            "The aesthetic reward.",
            optional=(io.ClipVision.Input("clip_vision", optional=True,
                                          tooltip="ComfyUI's CLIP ViT-L/14 vision model (CLIPVisionLoader, e.g. clip-vit-large-patch14); preferred backbone."),),
        )

    @classmethod
    def execute(cls, head, clip_weights, architecture, dtype, chunk_size, clip_vision=None) -> io.NodeOutput:
        head_path = resolve_file(head, AESTHETIC_HEAD)
        if clip_vision is not None:
            # projected embeddings; ComfyUI's CLIP layers add residuals in place, which plain
            # autograd cannot differentiate: InPlaceSafeEncoder recomputes them under gradient
            encoder = InPlaceSafeEncoder(OutputSelectingEncoder(clip_vision.model, 2, input_dtype=torch.float32))
            model = load_aesthetic(head_path, image_encoder=encoder, image_size=clip_vision.image_size,
                                   chunk_size=chunk_size, dtype=resolve_dtype(dtype))
            head_patcher = reward_patcher(model.head)
            return io.NodeOutput(RewardHandle(model=model, patchers=[clip_vision.patcher, head_patcher],
                                              label="aesthetic"))
        if clip_weights.startswith("("):
            raise MissingWeightsFileError(
                "DRaFT Aesthetic Reward needs a CLIP ViT-L/14 backbone: connect a CLIP_VISION "
                "(CLIPVisionLoader with clip-vit-large-patch14) or pick open_clip weights. "
                + download_hint(CLIP_VIT_L14_OPENAI, _folder_hint()))
        model = load_aesthetic(head_path, resolve_file(clip_weights, CLIP_VIT_L14_OPENAI),
                               architecture=resolve_architecture(architecture),
                               chunk_size=chunk_size, dtype=resolve_dtype(dtype))
        return io.NodeOutput(_handle(model, "aesthetic"))


class DraftHPSv2Reward(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _reward_schema(
            "DRaFTHPSv2Reward", "DRaFT HPSv2 Reward",
            "Human Preference Score v2 / v2.1 (open_clip ViT-H-14): text-image preference, about 0.25-0.30.",
            [
                io.Combo.Input("checkpoint", options=weight_files(HPSV2),
                               tooltip=f"HPS_v2_compressed.pt or HPS_v2.1_compressed.pt in models/reward_models; from {HPSV2.source}."),
                io.Combo.Input("architecture", options=architectures("ViT-H-14"), default="ViT-H-14",
                               tooltip="The open_clip architecture of the checkpoint (ViT-H-14 for the published files)."),
            ],
            "The HPSv2 reward (needs prompts).",
        )

    @classmethod
    def execute(cls, checkpoint, architecture, dtype, chunk_size) -> io.NodeOutput:
        model = load_hpsv2(resolve_file(checkpoint, HPSV2), resolve_architecture(architecture),
                           chunk_size=chunk_size, dtype=resolve_dtype(dtype))
        return io.NodeOutput(_handle(model, "hpsv2"))


class DraftPickScoreReward(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _reward_schema(
            "DRaFTPickScoreReward", "DRaFT PickScore Reward",
            "PickScore_v1 (CLIP-H fine-tuned on Pick-a-Pic preferences): logit_scale x cosine, about 20-23.",
            [
                io.Combo.Input("model_folder", options=model_folders(PICKSCORE),
                               tooltip=f"The transformers folder PickScore_v1 (config.json + model.safetensors) in models/reward_models; from {PICKSCORE.source}."),
            ],
            "The PickScore reward (needs prompts).",
        )

    @classmethod
    def execute(cls, model_folder, dtype, chunk_size) -> io.NodeOutput:
        model = load_pickscore(resolve_file(model_folder, PICKSCORE, folder=True),
                               chunk_size=chunk_size, dtype=resolve_dtype(dtype))
        return io.NodeOutput(_handle(model, "pickscore"))


class DraftClipScoreReward(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _reward_schema(
            "DRaFTClipScoreReward", "DRaFT CLIP Score Reward",
            "Cosine similarity of CLIP image and prompt embeddings, with any open_clip architecture and weights file.",
            [
                io.Combo.Input("weights", options=weight_files(CLIP_VIT_L14_OPENAI),
                               tooltip="open_clip-format weights (e.g. open_clip_model.safetensors of a CLIP model card) in models/reward_models."),
                io.Combo.Input("architecture", options=architectures("ViT-L-14-quickgelu"),
                               default="ViT-L-14-quickgelu",
                               tooltip="open_clip architecture of the weights (ViT-L-14-quickgelu for OpenAI's, ViT-H-14 for LAION's), or a config JSON in models/reward_models."),
            ],
            "The CLIP score reward (needs prompts).",
        )

    @classmethod
    def execute(cls, weights, architecture, dtype, chunk_size) -> io.NodeOutput:
        model = load_clip_score(resolve_file(weights, CLIP_VIT_L14_OPENAI),
                                resolve_architecture(architecture), chunk_size=chunk_size,
                                dtype=resolve_dtype(dtype))
        return io.NodeOutput(_handle(model, "clip_score"))


class DraftDownloadRewardWeights(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRaFTDownloadRewardWeights",
            display_name="DRaFT Download Reward Weights",
            category="DRaFT/rewards",
            description=("Opt-in: fetches a reward model's published weights from the Hugging Face Hub "
                         "into models/reward_models (needs internet and huggingface_hub). Press R "
                         "afterwards so the reward nodes list the new files."),
            inputs=[
                io.Combo.Input("weights", options=[t for t, w in PUBLISHED.items() if w.hf_repo],
                               tooltip="Which published weights to download (the LAION aesthetic head is published on GitHub only: download it by hand)."),
                io.Boolean.Input("i_want_to_download", default=False,
                                 tooltip="Nothing is downloaded unless this is on."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the files were written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, weights, i_want_to_download) -> io.NodeOutput:
        spec = PUBLISHED[weights]
        folder = _folder_hint()
        if not i_want_to_download:
            raise ValueError("nothing downloaded: switch 'i_want_to_download' on. " + download_hint(spec, folder))
        return io.NodeOutput(download(spec, folder))


NODES = [DraftAestheticReward, DraftHPSv2Reward, DraftPickScoreReward, DraftClipScoreReward,
         DraftDownloadRewardWeights]


# -- checked when the prompt is queued (nodes/validation.py): missing files say what to put where --
def _file_rule(*inputs):
    """A queue-time rule: each ``(input, spec, is_folder)`` must name a file that is there."""
    def rule(values: dict) -> list:
        out = []
        for name, spec, is_folder in inputs:
            if isinstance(values.get(name), str):
                try:
                    resolve_file(values[name], spec, folder=is_folder)
                except MissingWeightsFileError as e:
                    out.append((name, str(e)))
        return out
    return rule


def _aesthetic_rule(values: dict) -> list:
    out = _file_rule(("head", AESTHETIC_HEAD, False))(values)
    clip = values.get("clip_weights")
    if isinstance(clip, str) and clip.startswith("(") and "clip_vision" not in values:
        out.append(("clip_weights", "no CLIP ViT-L/14 backbone: connect a CLIP_VISION "
                    "(CLIPVisionLoader with clip-vit-large-patch14) or pick open_clip weights. "
                    + download_hint(CLIP_VIT_L14_OPENAI, _folder_hint())))
    elif isinstance(clip, str) and not clip.startswith("(") and "clip_vision" not in values:
        out += _file_rule(("clip_weights", CLIP_VIT_L14_OPENAI, False))(values)
    return out


validation.NODE_RULES.update({
    "DRaFTAestheticReward": _aesthetic_rule,
    "DRaFTHPSv2Reward": _file_rule(("checkpoint", HPSV2, False)),
    "DRaFTPickScoreReward": _file_rule(("model_folder", PICKSCORE, True)),
    "DRaFTClipScoreReward": _file_rule(("weights", CLIP_VIT_L14_OPENAI, False)),
})
