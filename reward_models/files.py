"""Safe, strict loading of reward-model weights, and where their authors publish them.

- ``.safetensors`` is read with safetensors; ``.pth``/``.pt``/``.bin``/``.ckpt`` with
  ``torch.load(map_location="cpu", weights_only=True)``. A pickle that carries code or custom
  objects is refused (``UnsafeWeightsFileError``): it is not a plain weights file.
- A missing file raises ``MissingWeightsFileError`` naming the file, the folder searched, the
  architecture it must be and where its authors publish it.
- A file of the wrong architecture raises ``WrongArchitectureError`` naming the architecture and a
  few mismatched keys; loading is always ``strict=True``, never a silent partial load.
- ``download`` fetches a published file from the Hugging Face Hub, only when called explicitly.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor

WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class RewardModelFileError(ValueError):
    """A reward model's file is missing, unsafe, unreadable or of the wrong architecture."""


class MissingWeightsFileError(RewardModelFileError):
    """The expected weights file (or folder) does not exist."""


class UnsafeWeightsFileError(RewardModelFileError):
    """The file is a pickle that carries code or custom objects; refused for safety."""


class WrongArchitectureError(RewardModelFileError):
    """The file's keys or shapes do not match the architecture it is loaded into."""


@dataclass(frozen=True)
class PublishedWeights:
    """Where a reward model's weights come from: ``filenames`` (first is preferred), the
    ``architecture`` they must fit, the authors' ``source`` page, and an optional Hugging Face Hub
    ``hf_repo`` from which ``download`` fetches ``hf_files`` (into ``subfolder`` when set)."""

    title: str
    filenames: tuple[str, ...]
    architecture: str
    source: str
    hf_repo: str | None = None
    hf_files: tuple[str, ...] = ()
    subfolder: str | None = None


AESTHETIC_HEAD = PublishedWeights(
    "LAION aesthetic predictor v2 head",
    ("sac+logos+ava1-l14-linearMSE.pth",),
    "linear MLP 768->1024->128->64->16->1 (state dict keys layers.0/2/4/6/7) on L2-normalised "
    "OpenAI CLIP ViT-L/14 image embeddings",
    "https://github.com/christophschuhmann/improved-aesthetic-predictor "
    "(file sac+logos+ava1-l14-linearMSE.pth in the repository root)",
)


def _open_clip_card(name: str, architecture: str, *, hf_repo: str, hf_file: str,
                    subfolder: str) -> PublishedWeights:
    """CLIP weights in open_clip format from a Hugging Face Hub model card: either of the card's
    file names is accepted; ``download`` fetches ``hf_file`` into ``subfolder``."""
    return PublishedWeights(f"{name} (open_clip format)",
                            ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
                            architecture, f"https://huggingface.co/{hf_repo} (open_clip model card)",
                            hf_repo=hf_repo, hf_files=(hf_file,), subfolder=subfolder)


CLIP_VIT_L14_OPENAI = _open_clip_card(
    "OpenAI CLIP ViT-L/14", "open_clip ViT-L-14-quickgelu with the 'openai' weights",
    hf_repo="timm/vit_large_patch14_clip_224.openai", hf_file="open_clip_model.safetensors",
    subfolder="clip_vit_l14_openai")
CLIP_VIT_H14_LAION = _open_clip_card(
    "LAION CLIP ViT-H-14 laion2B-s32B-b79K", "open_clip ViT-H-14",
    hf_repo="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", hf_file="open_clip_pytorch_model.bin",
    subfolder="clip_vit_h14_laion2b")
HPSV2 = PublishedWeights(
    "HPSv2 (Human Preference Score v2 / v2.1)",
    ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt"),
    "open_clip ViT-H-14 (laion2B-s32B-b79K architecture), weights under the key 'state_dict'",
    "https://huggingface.co/xswu/HPSv2",
    hf_repo="xswu/HPSv2",
    hf_files=("HPS_v2.1_compressed.pt",),
)
PICKSCORE = PublishedWeights(
    "PickScore_v1",
    ("PickScore_v1",),
    "transformers CLIPModel (CLIP-ViT-H-14): a folder with config.json and model.safetensors "
    "(or pytorch_model.bin)",
    "https://huggingface.co/yuvalkirstain/PickScore_v1",
    hf_repo="yuvalkirstain/PickScore_v1",
    hf_files=("config.json", "model.safetensors"),
    subfolder="PickScore_v1",
)
PUBLISHED = {w.title: w for w in (AESTHETIC_HEAD, CLIP_VIT_L14_OPENAI, CLIP_VIT_H14_LAION, HPSV2, PICKSCORE)}


def download_hint(spec: PublishedWeights, folder: str | None = None) -> str:
    """One paragraph telling a user which file to get, from where, and where to put it."""
    where = f" into '{folder}'" if folder else " into ComfyUI's models/reward_models folder"
    files = " or ".join(f"'{n}'" for n in spec.filenames)
    text = (f"{spec.title}: expected {files} ({spec.architecture}). Its authors publish it at "
            f"{spec.source}. Download it{where}")
    if spec.hf_repo:
        text += (f", or call reward_models.files.download(..., folder) to fetch "
                 f"{', '.join(spec.hf_files)} from the Hugging Face Hub repo '{spec.hf_repo}'")
    return text + "."


def download(spec: PublishedWeights, folder: str) -> str:
    """Fetch ``spec``'s files from the Hugging Face Hub into ``folder`` (opt-in; needs
    ``huggingface_hub``). Returns the local path of the first file, or of the subfolder for
    folder models (PickScore)."""
    if not spec.hf_repo:
        raise RewardModelFileError(f"No Hugging Face Hub repo is known for {spec.title}. "
                                   + download_hint(spec, folder))
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RewardModelFileError("Downloading needs the huggingface_hub package "
                                   "(pip install huggingface_hub). " + download_hint(spec, folder)) from exc
    target = os.path.join(folder, spec.subfolder) if spec.subfolder else folder
    os.makedirs(target, exist_ok=True)
    paths = [hf_hub_download(repo_id=spec.hf_repo, filename=name, local_dir=target) for name in spec.hf_files]
    return target if spec.subfolder and spec.subfolder == spec.filenames[0] else paths[0]


def require_path(path: str | os.PathLike, spec: PublishedWeights, *, folder: bool = False) -> str:
    """Return ``path`` as str if the file (or folder) exists, else raise ``MissingWeightsFileError``."""
    path = os.fspath(path)
    exists = os.path.isdir(path) if folder else os.path.isfile(path)
    if not exists:
        name, parent = os.path.basename(path.rstrip("/\\")), os.path.dirname(os.path.abspath(path))
        kind = "folder" if folder else "file"
        raise MissingWeightsFileError(f"{spec.title}: {kind} '{name}' not found in folder '{parent}'. "
                                      + download_hint(spec, parent))
    return path


def find_weights(folder: str | os.PathLike, spec: PublishedWeights) -> str:
    """The first of ``spec.filenames`` present in ``folder``; else ``MissingWeightsFileError``."""
    folder = os.fspath(folder)
    for name in spec.filenames:
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
    raise MissingWeightsFileError(f"{spec.title}: none of {list(spec.filenames)} found in folder "
                                  f"'{os.path.abspath(folder)}'. " + download_hint(spec, folder))


def load_weights(path: str | os.PathLike, spec: PublishedWeights | None = None) -> dict[str, Tensor]:
    """Read a plain tensor state dict from ``path`` on the CPU.

    Unwraps ``{"state_dict": ...}`` checkpoints. Raises ``MissingWeightsFileError``,
    ``UnsafeWeightsFileError`` (pickle with code/custom objects, TorchScript archive) or
    ``RewardModelFileError`` (unreadable, not a mapping of names to tensors).
    """
    path = os.fspath(path)
    if spec is not None:
        require_path(path, spec)
    elif not os.path.isfile(path):
        raise MissingWeightsFileError(f"Weights file '{os.path.basename(path)}' not found in folder "
                                      f"'{os.path.dirname(os.path.abspath(path))}'.")
    name = os.path.basename(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in WEIGHTS_SUFFIXES:
        raise RewardModelFileError(f"'{name}': unsupported weights file type '{suffix}' "
                                   f"(expected one of {', '.join(WEIGHTS_SUFFIXES)}).")
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            data = load_file(path, device="cpu")
        except Exception as exc:
            raise RewardModelFileError(f"'{name}' could not be read as safetensors: {exc}") from exc
    else:
        data = _torch_load_plain(path)
    return _as_state_dict(data, name)


def _torch_load_plain(path: str):
    name = os.path.basename(path)
    refused = (f"'{name}' is not a plain weights file and was refused for safety: its pickle "
               f"carries code or custom objects that torch.load(weights_only=True) will not run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeWeightsFileError(f"{refused} ({_unpickler_detail(exc)}). Use a .safetensors or plain "
                                     f"state-dict file from the model's authors.") from exc
    except RuntimeError as exc:
        if "TorchScript" in str(exc) or "torchscript" in str(exc):
            raise UnsafeWeightsFileError(f"'{name}' is a TorchScript archive (it carries code), not a "
                                         f"plain weights file; refused for safety. Use the open_clip / "
                                         f"safetensors release of the same weights.") from exc
        raise RewardModelFileError(f"'{name}' could not be read as a torch weights file: {exc}") from exc
    except Exception as exc:
        raise RewardModelFileError(f"'{name}' could not be read as a torch weights file: {exc}") from exc


def _unpickler_detail(exc: Exception) -> str:
    """The specific reason from torch's weights-only unpickler, without its advice to disable it."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    detail = " ".join(text.split())
    return detail[:200] or type(exc).__name__


def _as_state_dict(data, name: str) -> dict[str, Tensor]:
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not data:
        raise RewardModelFileError(f"'{name}' does not hold a state dict (a mapping of names to tensors).")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise RewardModelFileError(f"'{name}' is not a plain state dict: entries {bad[:5]} are not tensors.")
    return dict(data)


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Drop ``prefix`` (e.g. DataParallel's "module.") when every key carries it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def check_state_dict(expected: Mapping[str, Tensor | torch.Size | Iterable[int]],
                     found: Mapping[str, Tensor], architecture: str, source: str = "the file") -> None:
    """Raise ``WrongArchitectureError`` unless ``found`` has exactly ``expected``'s keys and shapes.

    ``expected`` maps keys to tensors (e.g. a model's state dict, meta tensors fine) or shapes.
    """
    def shape_of(v):
        return tuple(v.shape) if isinstance(v, Tensor) else tuple(v)

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: file {shape_of(found[k])} vs model {shape_of(expected[k])}"
             for k in expected if k in found and shape_of(found[k]) != shape_of(expected[k])]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
    if wrong:
        parts.append(f"{len(wrong)} keys of the wrong shape (e.g. {'; '.join(wrong[:4])})")
    raise WrongArchitectureError(f"{source} does not fit the architecture {architecture}: "
                                 + "; ".join(parts) + ". Is it the right file for this reward?")


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, Tensor], architecture: str,
                source: str = "the file", assign: bool = False, dtype: torch.dtype | None = None) -> None:
    """``check_state_dict`` against ``module`` then ``load_state_dict(strict=True)``.

    With ``assign=True`` (for modules built on the meta device) floating tensors are cast to
    ``dtype`` (default: the module's dtype for that key) and assigned, not copied.
    """
    expected = module.state_dict()
    check_state_dict(expected, state_dict, architecture, source)
    if assign:
        state_dict = {k: v.to(dtype or expected[k].dtype) if v.is_floating_point() else v
                      for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=assign)
