"""kohya's own code reads our DiT LoRA files (markers ``kohya``, ``musubi``; needs ComfyUI too).

The LoRA files are written by DRaFT Save LoRA's path (``nodes.lora_files.save_final`` with
``lora_keys.lora_file_facts``) for the tiny ComfyUI models of ``tests/dit_fixtures.py``, on the
broadest target set ("kohya default"), with random non-zero factors and two ranks / alphas
(so per-module dims are read, not a global one). Then, with kohya's code imported from the
checkouts named by ``KOHYA_SD_SCRIPTS_PATH`` (kohya-ss/sd-scripts) and ``MUSUBI_TUNER_PATH``
(kohya-ss/musubi-tuner):

* the kohya model is built from kohya's own classes and parameter dataclasses at the fixture's
  reduced width (``library.flux_models.Flux(FluxParams)``, ``library.chroma_models.Chroma
  (ChromaParams)``, ``library.sd3_models.create_sd3_mmdit(sd3_utils.analyze_state_dict_state(...))``,
  musubi's ``QwenImageTransformer2DModel`` and Wan ``WanModel``), and the ComfyUI model's weights load into it with
  ``strict=True`` (same module tree, same shapes); kohya's own full-size loaders
  (``flux_utils.load_flow_model``) cannot build a small model, they use the full-size configs;
* kohya's inference path (``flux_minimal_inference.py`` / ``sd3_minimal_inference.py``:
  ``create_network_from_weights(..., for_inference=True)``, then ``apply_to`` +
  ``load_state_dict(strict=True)``, or ``merge_to``) creates exactly one LoRA module per module in
  our file (none unmatched either way), with our rank and alpha, and each patched layer computes
  ``W x + alpha/rank * up(down(x))`` with our factors; the merged weights are ``W + delta``;
* FLUX: sd-scripts' merge script (``networks/flux_merge_lora.merge_to_flux_model``) merges our
  file into the model's safetensors with every LoRA key consumed; Qwen-Image and Wan 2.1: musubi's
  loader (``utils.lora_utils.load_safetensors_with_lora_and_fp8``, what ``qwen_image_generate_image.py``
  and ``wan.modules.model.load_wan_model`` use) merges it with every key used;
* Lumina 2: sd-scripts' ``library.lumina_models.NextDiT`` at the fixture's width (the ComfyUI
  weights load strictly: same names); ``networks.lora_lumina``'s ``create_network_from_weights``,
  ``apply_to`` and ``merge_to`` (sd-scripts has no Lumina merge script);
* HunyuanImage 2.1: sd-scripts' ``HYImageDiffusionTransformer`` fixes the full width (3584, 60
  blocks, 17 B parameters), so its own block classes (``MMDoubleStreamBlock``,
  ``MMSingleStreamBlock``, which ``networks.lora_hunyuan_image`` looks for by class name) are built
  at the fixture's width in ``double_blocks`` / ``single_blocks`` lists; ComfyUI's weights are
  renamed to Tencent's names with ComfyUI's own loader conversion
  (``HunyuanImage21.process_unet_state_dict``, run on the kohya names) and load strictly. Our file
  has ComfyUI's names; those of the attention set are sd-scripts' too and load as they are; the
  double blocks' MLPs (``img_mlp_0`` / ``_2``) are renamed to sd-scripts' (``img_mlp_fc1`` /
  ``_fc2``) by the table of sd-scripts' own ``networks/convert_hunyuan_image_lora_to_comfy.py``
  (``--reverse``; read from the script, whose import needs ``library.train_util`` and with it
  ``toml``, absent here), then every key is used;
* metadata: ``ss_base_model_version``, ``ss_network_module`` and ``modelspec.architecture`` /
  ``implementation`` are what kohya's trainers write (values from kohya's own code where it has a
  function for them: ``sai_model_spec.build_metadata``, ``sd3_utils`` model types,
  ``flux_utils.MODEL_VERSION_*``, musubi's ``dataset.architectures`` names).

* our "kohya default" target set is kohya's training-time default (``create_network`` with default
  arguments) less the modulation layers, exactly.

Text conditioning plays no part here (no forward pass through a text encoder).
"""
import importlib
import importlib.util
import logging
import os
import sys
import time
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dit_fixtures as D
import lora_fixtures as F
from conftest import kohya_sd_scripts_path, musubi_tuner_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pack():
    F.import_comfy()
    return {name: F.import_pack_module(f"nodes.{name}") for name in
            ("comfy_glue", "lora_files", "lora_keys")}


# -- importing kohya's code -----------------------------------------------------------------------
def _import_from(root: str, names):
    """Import ``names`` with ``root`` on sys.path (appended: sd-scripts' top-level ``tools``,
    ``tests``, ... never shadow this project's). sd-scripts' ``library/utils.py`` imports ``cv2``
    (image resizing only, unused here): a placeholder stands in when OpenCV is absent."""
    if root not in sys.path:
        sys.path.append(root)
    placeholder = None
    if importlib.util.find_spec("cv2") is None:
        placeholder = sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        if placeholder is not None and sys.modules.get("cv2") is placeholder:
            del sys.modules["cv2"]


@pytest.fixture(scope="module")
def kohya():
    root = kohya_sd_scripts_path()
    names = ("networks.lora_flux", "networks.lora_sd3", "library.flux_models", "library.chroma_models",
             "library.flux_utils", "library.sd3_models", "library.sd3_utils", "library.sai_model_spec")
    return dict(zip((n.split(".")[-1] for n in names), _import_from(root, names)))


@pytest.fixture(scope="module")
def musubi():
    root = musubi_tuner_path()
    names = ("musubi_tuner.networks.lora_qwen_image", "musubi_tuner.qwen_image.qwen_image_model",
             "musubi_tuner.utils.lora_utils", "musubi_tuner.utils.sai_model_spec",
             "musubi_tuner.dataset.architectures", "musubi_tuner.networks.lora_wan")
    return dict(zip((n.split(".")[-1] for n in names), _import_from(root, names)))


def _flux_merge_script(kohya_root: str):
    """sd-scripts' ``networks/flux_merge_lora.py`` as a module. It imports ``library.train_util``
    only to read the LoRA file's metadata; train_util pulls in every trainer dependency (sd-scripts
    pins transformers 4.x; ``library/lpw_stable_diffusion.py`` needs ``CLIPFeatureExtractor``,
    gone in transformers 5). When that import fails, a stand-in module with that one function
    (safetensors' metadata, as train_util's does) is used; the merging code is kohya's."""
    networks = os.path.join(kohya_root, "networks")
    if networks not in sys.path:
        sys.path.append(networks)  # the script does `import lora_flux`
    try:
        return importlib.import_module("flux_merge_lora"), "library.train_util"
    except ImportError:
        pass
    saved = sys.modules.get("library.train_util")
    stand_in = types.ModuleType("library.train_util")

    def load_metadata_from_safetensors(path):
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    stand_in.load_metadata_from_safetensors = load_metadata_from_safetensors
    sys.modules["library.train_util"] = stand_in
    import library
    had = getattr(library, "train_util", None)
    library.train_util = stand_in
    try:
        sys.modules.pop("flux_merge_lora", None)
        return importlib.import_module("flux_merge_lora"), "a stand-in for library.train_util"
    finally:
        if saved is None:
            sys.modules.pop("library.train_util", None)
        else:
            sys.modules["library.train_util"] = saved
        if had is None:
            del library.train_util
        else:
            library.train_util = had


# -- our file ---------------------------------------------------------------------------------------
def _lora_for(patcher, pack, seed=5):
    """A LoRASet on the family's "kohya default" targets: random non-zero factors, rank 4 /
    alpha 2 and rank 2 / alpha 8 alternating (per-module dims and scales)."""
    from training.lora import LoRADelta, LoRASet
    names = pack["comfy_glue"].target_module_names(patcher, "kohya default")
    modules = dict(patcher.model.diffusion_model.named_modules())
    g = torch.Generator().manual_seed(seed)
    lora = LoRASet()
    for i, name in enumerate(names):
        rank, alpha = (4, 2.0) if i % 2 == 0 else (2, 8.0)
        delta = LoRADelta(modules[name].weight.shape, rank, alpha, generator=g)
        with torch.no_grad():
            delta.up.normal_(0, 0.2, generator=g)
        lora.add(name, delta)
    return lora


def _save_ours(kind, patcher, pack, loras_dir):
    """Our file for ``patcher`` through DRaFT Save LoRA's path; ``(path, lora, tensors, metadata)``."""
    import folder_paths
    lf = pack["lora_files"]
    lora = _lora_for(patcher, pack)
    out = lf.DraftLoRA({}, lora_set=lora, facts=pack["lora_keys"].lora_file_facts(patcher), metadata={})
    name = lf.save_final(out, f"kohya/{kind}", "fp32", False, model=patcher)
    path = folder_paths.get_full_path("loras", name)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return path, lora, load_file(path), meta


def _comfy_state_dict(patcher):
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def _load_strict(model, sd):
    """Load ComfyUI's weights into the kohya model: the same module tree and shapes, or fail."""
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def _file_modules(tensors):
    return {k.split(".")[0] for k in tensors}


def kohya_name(name):
    return "lora_unet_" + name.replace(".", "_")


def _check_created_modules(network, tensors, lora):
    """One kohya LoRA module per module of the file (none unmatched either way), each with our
    rank, alpha and factor shapes."""
    created = {m.lora_name: m for m in network.unet_loras}
    assert not network.text_encoder_loras
    in_file = _file_modules(tensors)
    assert sorted(in_file - set(created)) == [], "modules of our file kohya created no LoRA for"
    assert sorted(set(created) - in_file) == []
    assert len(created) == len(lora)
    for name, delta in lora.items():
        module = created[kohya_name(name)]
        assert module.lora_dim == delta.rank
        assert float(module.alpha) == delta.alpha and module.scale == pytest.approx(delta.scale)
        stem = kohya_name(name)
        assert tuple(module.lora_down.weight.shape) == tuple(tensors[f"{stem}.lora_down.weight"].shape)
        assert tuple(module.lora_up.weight.shape) == tuple(tensors[f"{stem}.lora_up.weight"].shape)
    return created


def _check_applied(model, base_sd, lora, seed=7):
    """After kohya's ``apply_to`` + ``load_state_dict(strict=True)``: each patched layer of the
    kohya model computes ``x W^T + b + x delta^T``."""
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    for name, delta in lora.items():
        layer = modules[name]
        x = torch.randn(3, layer.in_features, generator=g)
        weight = base_sd[f"{name}.weight"]
        bias = base_sd.get(f"{name}.bias")
        with torch.no_grad():
            want = torch.nn.functional.linear(x, weight + delta.delta(), bias)
            got = layer(x)
        assert torch.allclose(got, want, atol=1e-5), (name, float((got - want).abs().max()))


def _check_merged(merged_sd, base_sd, lora, what):
    """Merged weights are ``W + delta`` for every LoRA layer, everything else untouched."""
    deltas = {f"{n}.weight": d.delta().detach() for n, d in lora.items()}
    assert set(merged_sd) == set(base_sd)
    for key, base in base_sd.items():
        want = base + deltas[key] if key in deltas else base
        assert torch.allclose(merged_sd[key].float(), want, atol=1e-5), (what, key)


def _kohya_inference_paths(create, text_encoders, build_model, base_sd, tensors, lora):
    """sd-scripts' ``*_minimal_inference.py`` LoRA handling, both ways (apply, merge)."""
    model = build_model()
    network, _ = create(1.0, None, None, text_encoders, model, tensors, True)
    _check_created_modules(network, tensors, lora)
    network.apply_to(text_encoders, model)
    info = network.load_state_dict(dict(tensors), strict=True)
    assert not info.missing_keys and not info.unexpected_keys
    _check_applied(model, base_sd, lora)

    model = build_model()
    network, _ = create(1.0, None, None, text_encoders, model, tensors, True)
    network.merge_to(text_encoders, model, dict(tensors))
    _check_merged(model.state_dict(), base_sd, lora, "kohya merge_to")


# -- sd-scripts: FLUX.1 dev / schnell, Chroma -------------------------------------------------------
def _kohya_flux(kohya, kind):
    cfg = D.FAMILIES[kind][1]
    # ComfyUI's Flux takes latent channels (patchified 2x2 inside), kohya's Flux the packed width;
    # ComfyUI's Chroma config already gives the packed width
    packed = cfg["in_channels"] if kind == "chroma" else cfg["in_channels"] * cfg["patch_size"] ** 2
    common = dict(in_channels=packed,
                  context_in_dim=cfg["context_in_dim"], hidden_size=cfg["hidden_size"],
                  mlp_ratio=cfg["mlp_ratio"], num_heads=cfg["num_heads"], depth=cfg["depth"],
                  depth_single_blocks=cfg["depth_single_blocks"], axes_dim=list(cfg["axes_dim"]),
                  theta=cfg["theta"], qkv_bias=cfg["qkv_bias"])
    if kind == "chroma":
        cm = kohya["chroma_models"]
        params = cm.ChromaParams(**common, guidance_embed=True, approximator_in_dim=cfg["in_dim"],
                                 approximator_depth=cfg["n_layers"],
                                 approximator_hidden_size=cfg["hidden_dim"], _use_compiled=False)
        return lambda: cm.Chroma(params)
    fm = kohya["flux_models"]
    params = fm.FluxParams(**common, vec_in_dim=cfg["vec_in_dim"], guidance_embed=cfg["guidance_embed"])
    return lambda: fm.Flux(params)


@pytest.mark.comfyui
@pytest.mark.kohya
@pytest.mark.parametrize("kind", ["flux_dev", "flux_schnell", "chroma"])
def test_sd_scripts_reads_our_flux_and_chroma_lora(kind, kohya, pack, loras_dir, tmp_path, caplog):
    patcher = D.tiny_model(kind)
    path, lora, tensors, meta = _save_ours(kind, patcher, pack, loras_dir)
    base_sd = _comfy_state_dict(patcher)
    new_model = _kohya_flux(kohya, kind)
    build = lambda: _load_strict(new_model(), base_sd)  # noqa: E731
    _kohya_inference_paths(kohya["lora_flux"].create_network_from_weights, [None, None], build,
                           base_sd, tensors, lora)

    # kohya's checkpoint analysis of the model file (dev vs schnell, block counts) and its metadata
    model_file = str(tmp_path / f"{kind}.safetensors")
    save_file(base_sd, model_file)
    fu = kohya["flux_utils"]
    if kind != "chroma":  # load_flow_model analyses FLUX files only (Chroma: fixed chroma_params)
        is_diffusers, is_schnell, blocks, _ = fu.analyze_checkpoint_state(model_file)
        assert not is_diffusers and blocks == (2, 2) and is_schnell == (kind == "flux_schnell")
    version = fu.MODEL_VERSION_CHROMA if kind == "chroma" else fu.MODEL_VERSION_FLUX_V1
    flux_type = {"flux_dev": "dev", "flux_schnell": "schnell", "chroma": "chroma"}[kind]
    spec = kohya["sai_model_spec"].build_metadata(None, False, False, False, True, False, time.time(),
                                                 model_config={"flux": flux_type})
    assert meta["ss_base_model_version"] == version
    # --network_module (what train_network.py imports and writes as ss_network_module)
    assert meta["ss_network_module"] == kohya["lora_flux"].__name__ == "networks.lora_flux"
    assert meta["modelspec.architecture"] == spec["modelspec.architecture"]
    assert meta["modelspec.implementation"] == spec["modelspec.implementation"]

    # sd-scripts' merge script, on the model file: every LoRA key consumed, W + delta
    script, train_util = _flux_merge_script(kohya_sd_scripts_path())
    with caplog.at_level(logging.WARNING):
        merged, clip_sd, t5_sd = script.merge_to_flux_model("cpu", "cpu", model_file, None, None, [path],
                                                            [1.0], torch.float32, torch.float32)
    assert "no module found" not in caplog.text and "Unused keys" not in caplog.text, caplog.text
    assert not clip_sd and not t5_sd
    _check_merged(merged, base_sd, lora, f"flux_merge_lora.py (with {train_util})")


# -- sd-scripts: SD3 / SD3.5 ------------------------------------------------------------------------
@pytest.mark.comfyui
@pytest.mark.kohya
@pytest.mark.parametrize("kind", ["sd3_medium", "sd3_5_medium", "sd3_5_large"])
def test_sd_scripts_reads_our_sd3_lora(kind, kohya, pack, loras_dir):
    patcher = D.tiny_model(kind)
    path, lora, tensors, meta = _save_ours(kind, patcher, pack, loras_dir)
    base_sd = _comfy_state_dict(patcher)
    # kohya's own analysis of the checkpoint gives the MMDiT parameters and the model type
    params = kohya["sd3_utils"].analyze_state_dict_state(base_sd)
    build = lambda: _load_strict(kohya["sd3_models"].create_sd3_mmdit(params), base_sd)  # noqa: E731
    _kohya_inference_paths(kohya["lora_sd3"].create_network_from_weights, [], build,
                           base_sd, tensors, lora)

    spec = kohya["sai_model_spec"].build_metadata(None, False, False, False, True, False, time.time(),
                                                 model_config={"sd3": params.model_type})
    assert meta["ss_base_model_version"] == params.model_type  # sd3_train_network.py: mmdit.model_type
    # networks.lora_sd3, not networks.lora (sd-scripts' SD3 doc example): networks/lora.py finds
    # no layer in an MMDiT, sd3_minimal_inference.py "only supports networks.lora_sd3"
    assert meta["ss_network_module"] == kohya["lora_sd3"].__name__ == "networks.lora_sd3"
    assert meta["modelspec.architecture"] == spec["modelspec.architecture"]
    assert meta["modelspec.implementation"] == spec["modelspec.implementation"]


# -- musubi-tuner: Qwen-Image -----------------------------------------------------------------------
def _musubi_qwen(musubi):
    cfg = D.FAMILIES["qwen_image"][1]
    return musubi["qwen_image_model"].QwenImageTransformer2DModel(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], num_layers=cfg["num_layers"],
        attention_head_dim=cfg["attention_head_dim"], num_attention_heads=cfg["num_attention_heads"],
        joint_attention_dim=cfg["joint_attention_dim"], axes_dims_rope=tuple(cfg["axes_dims_rope"]))


@pytest.mark.comfyui
@pytest.mark.musubi
def _musubi_reads(musubi, network_module: str, build_model, patcher, path, lora, tensors,
                  tmp_path, caplog) -> None:
    """musubi's network from our weights (its training resume / inference path:
    ``create_arch_network_from_weights``), applied with a strict load and merged, and its DiT
    loader's merge while loading (``lora_utils.load_safetensors_with_lora_and_fp8``): every module
    and key of our file used, the weights ``W + delta``. ``build_model(musubi)``: musubi's own
    model of the family, empty; ComfyUI's weights of ``patcher`` are loaded into it strictly."""
    base_sd = _comfy_state_dict(patcher)
    create = musubi[network_module].create_arch_network_from_weights

    model = _load_strict(build_model(musubi), base_sd)
    network = create(1.0, dict(tensors), unet=model, for_inference=True)
    _check_created_modules(network, tensors, lora)
    network.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    info = network.load_state_dict(dict(tensors), strict=True)
    assert not info.missing_keys and not info.unexpected_keys
    _check_applied(model, base_sd, lora)
    model = _load_strict(build_model(musubi), base_sd)
    network = create(1.0, dict(tensors), unet=model, for_inference=True)
    network.merge_to(None, model, dict(tensors), device=torch.device("cpu"))
    _check_merged(model.state_dict(), base_sd, lora, "musubi merge_to")

    model_file = str(tmp_path / "base.safetensors")
    save_file(base_sd, model_file)
    with caplog.at_level(logging.WARNING):
        merged = musubi["lora_utils"].load_safetensors_with_lora_and_fp8(
            model_file, [load_file(path)], [1.0], False, torch.device("cpu"))
    assert "not all LoRA keys are used" not in caplog.text, caplog.text
    _check_merged(merged, base_sd, lora, "musubi load_safetensors_with_lora_and_fp8")


def test_musubi_tuner_reads_our_qwen_image_lora(musubi, pack, loras_dir, tmp_path, caplog):
    patcher = D.tiny_model("qwen_image")
    path, lora, tensors, meta = _save_ours("qwen_image", patcher, pack, loras_dir)
    # musubi's DiT loader with LoRA: qwen_image_model.load_qwen_image_model's merge while loading
    _musubi_reads(musubi, "lora_qwen_image", _musubi_qwen, patcher, path, lora, tensors,
                  tmp_path, caplog)

    # what musubi's trainer writes: ss_base_model_version = architecture_full_name, the network
    # module given on its command line, modelspec from its sai_model_spec
    arch = musubi["architectures"]
    spec = musubi["sai_model_spec"].build_metadata(None, arch.ARCHITECTURE_QWEN_IMAGE, time.time())
    assert meta["ss_base_model_version"] == arch.ARCHITECTURE_QWEN_IMAGE_FULL
    assert meta["ss_network_module"] == "networks.lora_qwen_image"  # musubi's docs/qwen_image.md
    assert meta["modelspec.architecture"] == spec["modelspec.architecture"]
    assert meta["modelspec.implementation"] == spec["modelspec.implementation"]


# -- musubi-tuner: Wan 2.1 --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def musubi_wan(musubi):
    """musubi's ``wan.modules.model``. Its package's ``__init__`` imports ``wan.modules.t5``, whose
    ``T5EncoderModel`` has ``device=torch.cuda.current_device()`` as a default argument, evaluated
    at import: on a machine without CUDA it raises, so the import sees device 0 (the text encoder
    is never built here)."""
    from unittest import mock
    with mock.patch.object(torch.cuda, "current_device", lambda: 0):
        (model,) = _import_from(musubi_tuner_path(), ["musubi_tuner.wan.modules.model"])
    return dict(musubi, model=model)


def _musubi_wan(musubi, kind="wan21_t2v"):
    """musubi's WanModel in the tiny fixture's configuration: Wan 2.1 T2V, or Wan 2.2 TI2V-5B
    (model_version 2.2, 48 latent channels in and out; musubi has no 5B task, its WanModel
    takes the configuration)."""
    cfg = D.FAMILIES[kind][1]
    return musubi["model"].WanModel(
        model_type="t2v", model_version="2.1" if kind == "wan21_t2v" else "2.2",
        in_dim=cfg["in_dim"], dim=cfg["dim"],
        ffn_dim=cfg["ffn_dim"], freq_dim=cfg["freq_dim"], text_dim=cfg["text_dim"],
        out_dim=cfg["out_dim"], num_heads=cfg["num_heads"], num_layers=cfg["num_layers"],
        eps=cfg["eps"])


@pytest.mark.comfyui
@pytest.mark.musubi
def test_musubi_tuner_reads_our_wan_lora(musubi_wan, pack, loras_dir, tmp_path, caplog):
    """musubi-tuner's own networks.lora_wan (create_arch_network_from_weights: apply + strict load,
    merge_to) and its Wan loader's LoRA merge (load_safetensors_with_lora_and_fp8, what
    wan.modules.model.load_wan_model calls) use every module and key of our file; its metadata is
    what musubi's wan_train_network.py writes."""
    musubi = musubi_wan
    patcher = D.tiny_model("wan21_t2v")
    path, lora, tensors, meta = _save_ours("wan21_t2v", patcher, pack, loras_dir)
    assert any(".ffn." in n for n in lora.names())  # the broad set: attention and feed-forward
    _musubi_reads(musubi, "lora_wan", _musubi_wan, patcher, path, lora, tensors, tmp_path, caplog)

    arch = musubi["architectures"]
    spec = musubi["sai_model_spec"].build_metadata(None, arch.ARCHITECTURE_WAN, time.time())
    assert meta["ss_base_model_version"] == arch.ARCHITECTURE_WAN_FULL  # wan_train_network.py
    assert meta["ss_network_module"] == musubi["lora_wan"].__name__.removeprefix("musubi_tuner.")
    assert meta["modelspec.architecture"] == spec["modelspec.architecture"] == "wan2.1/lora"
    assert meta["modelspec.implementation"] == spec["modelspec.implementation"]


@pytest.mark.comfyui
@pytest.mark.musubi
def test_musubi_tuner_reads_our_wan22_ti2v_5b_lora(musubi_wan, pack, loras_dir, tmp_path, caplog):
    """The same for Wan 2.2 TI2V-5B (ComfyUI's WAN22_T2V) against musubi's WanModel at the 5B's
    48 channels and model version 2.2: every module and key of our file used by its network and
    its loader's merge; metadata: musubi's Wan trainer's, with its custom architecture
    (--metadata_arch wan2.2-ti2v-5b), built by musubi's own build_metadata."""
    musubi = musubi_wan
    patcher = D.tiny_model("wan22_ti2v_5b")
    path, lora, tensors, meta = _save_ours("wan22_ti2v_5b", patcher, pack, loras_dir)
    assert any(".ffn." in n for n in lora.names())
    _musubi_reads(musubi, "lora_wan", lambda m: _musubi_wan(m, "wan22_ti2v_5b"), patcher, path,
                  lora, tensors, tmp_path, caplog)

    arch = musubi["architectures"]
    spec = musubi["sai_model_spec"].build_metadata(None, arch.ARCHITECTURE_WAN, time.time(),
                                                   custom_arch="wan2.2-ti2v-5b")
    assert meta["ss_base_model_version"] == arch.ARCHITECTURE_WAN_FULL
    assert meta["ss_network_module"] == musubi["lora_wan"].__name__.removeprefix("musubi_tuner.")
    assert meta["modelspec.architecture"] == spec["modelspec.architecture"] == "wan2.2-ti2v-5b/lora"
    assert meta["modelspec.implementation"] == spec["modelspec.implementation"]


# -- sd-scripts: Lumina 2 --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kohya_lumina_hunyuan():
    root = kohya_sd_scripts_path()
    names = ("networks.lora_lumina", "library.lumina_models", "library.lumina_util",
             "networks.lora_hunyuan_image", "library.hunyuan_image_modules",
             "library.hunyuan_image_utils", "library.sai_model_spec")
    return dict(zip((n.split(".")[-1] for n in names), _import_from(root, names)))


def _kohya_lumina(kohya):
    cfg = D.FAMILIES["lumina2"][1]
    keys = ("patch_size", "in_channels", "dim", "n_layers", "n_refiner_layers", "n_heads",
            "n_kv_heads", "multiple_of", "qk_norm", "cap_feat_dim", "axes_dims", "axes_lens")
    return kohya["lumina_models"].NextDiT(**{k: cfg[k] for k in keys})


_NO_GEMMA = [torch.nn.Module()]  # lora_lumina walks text_encoders[0]: no text encoder LoRA here


def _check_metadata(meta, kohya, module, version, model_config):
    spec = kohya["sai_model_spec"].build_metadata(None, False, False, False, True, False, time.time(),
                                                 model_config=model_config)
    assert meta["ss_base_model_version"] == version
    assert meta["ss_network_module"] == module.__name__
    assert meta["modelspec.architecture"] == spec["modelspec.architecture"]
    assert meta["modelspec.implementation"] == spec["modelspec.implementation"]


@pytest.mark.comfyui
@pytest.mark.kohya
def test_sd_scripts_reads_our_lumina2_lora(kohya_lumina_hunyuan, pack, loras_dir):
    kohya = kohya_lumina_hunyuan
    patcher = D.tiny_model("lumina2")
    path, lora, tensors, meta = _save_ours("lumina2", patcher, pack, loras_dir)
    base_sd = _comfy_state_dict(patcher)
    build = lambda: _load_strict(_kohya_lumina(kohya), base_sd)  # noqa: E731
    _kohya_inference_paths(kohya["lora_lumina"].create_network_from_weights, _NO_GEMMA, build,
                           base_sd, tensors, lora)
    # lumina_train_network.py: model version lumina_util.MODEL_VERSION_LUMINA_V2, sai model spec
    # with lumina="lumina2"
    _check_metadata(meta, kohya, kohya["lora_lumina"], kohya["lumina_util"].MODEL_VERSION_LUMINA_V2,
                    {"lumina": "lumina2"})


# -- sd-scripts: HunyuanImage 2.1 -----------------------------------------------------------------
def _kohya_hunyuan_blocks(kohya):
    """sd-scripts' own HunyuanImage blocks at the fixture's width, under the model's list names."""
    cfg = D.FAMILIES["hunyuan_image_2_1"][1]
    hm = kohya["hunyuan_image_modules"]
    model = torch.nn.Module()
    model.double_blocks = torch.nn.ModuleList([
        hm.MMDoubleStreamBlock(cfg["hidden_size"], cfg["num_heads"], cfg["mlp_ratio"],
                               qkv_bias=cfg["qkv_bias"]) for _ in range(cfg["depth"])])
    model.single_blocks = torch.nn.ModuleList([
        hm.MMSingleStreamBlock(cfg["hidden_size"], cfg["num_heads"], cfg["mlp_ratio"])
        for _ in range(cfg["depth_single_blocks"])])
    return model


def _hunyuan_names(patcher, kohya_model):
    """Tencent's (sd-scripts') parameter name -> ComfyUI's, by ComfyUI's own loader conversion."""
    config = patcher.model.model_config
    return {k: next(iter(config.process_unet_state_dict({k: None})))
            for k in kohya_model.state_dict()}


def _convert_script_table(kohya_root):
    """The (sd-scripts, ComfyUI) module-name pairs of sd-scripts'
    networks/convert_hunyuan_image_lora_to_comfy.py, read from its source."""
    import ast
    with open(os.path.join(kohya_root, "networks", "convert_hunyuan_image_lora_to_comfy.py")) as f:
        tree = ast.parse(f.read())
    tables = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.walk(tree)
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id.endswith("_mappings")}
    return tables["double_blocks_mappings"], tables["single_blocks_mappings"]


def _to_sd_scripts_names(tensors, kohya_root):
    """The script's --reverse (ComfyUI -> sd-scripts) on our file's keys."""
    double, single = _convert_script_table(kohya_root)
    out = {}
    for k, v in tensors.items():
        mappings = double if "double_blocks" in k else single if "single_blocks" in k else []
        for src, dst in mappings:
            k = k.replace(dst, src)
        out[k] = v
    return out


@pytest.mark.comfyui
@pytest.mark.kohya
def test_sd_scripts_reads_our_hunyuan_image_lora(kohya_lumina_hunyuan, pack, loras_dir):
    kohya = kohya_lumina_hunyuan
    patcher = D.tiny_model("hunyuan_image_2_1")
    path, lora, tensors, meta = _save_ours("hunyuan_image_2_1", patcher, pack, loras_dir)
    comfy_sd = _comfy_state_dict(patcher)
    names = _hunyuan_names(patcher, _kohya_hunyuan_blocks(kohya))
    base_sd = {k: comfy_sd[c] for k, c in names.items()}  # every block weight, Tencent's names
    build = lambda: _load_strict(_kohya_hunyuan_blocks(kohya), base_sd)  # noqa: E731
    create = kohya["lora_hunyuan_image"].create_network_from_weights

    # as written: sd-scripts finds the attention / linear1 / linear2 modules under our names, not
    # the double blocks' MLPs (its img_mlp.fc1 / fc2 are ComfyUI's img_mlp.0 / 2)
    network, _ = create(1.0, None, None, [], build(), dict(tensors), True)
    unmatched = _file_modules(tensors) - {m.lora_name for m in network.unet_loras}
    assert sorted(unmatched) == sorted(kohya_name(f"double_blocks.{i}.{m}_mlp.{n}")
                                       for i in (0, 1) for m in ("img", "txt") for n in (0, 2))

    # after sd-scripts' own converter (--reverse): every key used, apply and merge give W + delta
    renamed = _to_sd_scripts_names(tensors, kohya_sd_scripts_path())
    to_kohya = {c[:-len(".weight")]: k[:-len(".weight")] for k, c in names.items() if k.endswith(".weight")}
    kohya_lora = {to_kohya[n]: d for n, d in lora.items()}
    _kohya_inference_paths(create, [], build, base_sd, renamed, kohya_lora)
    # hunyuan_image_train_network.py: hunyuan_image_utils.MODEL_VERSION_2_1, sai model spec with
    # hunyuan_image="2.1"
    _check_metadata(meta, kohya, kohya["lora_hunyuan_image"], kohya["hunyuan_image_utils"].MODEL_VERSION_2_1,
                    {"hunyuan_image": "2.1"})


# -- our "kohya default" set against kohya's trainers' own default ----------------------------------
_MODULATION = {  # what kohya's default trains beyond ours: the blocks' modulation (adaLN) layers
    "flux_dev": [f"double_blocks.{i}.{m}_mod.lin" for i in (0, 1) for m in ("img", "txt")]
    + [f"single_blocks.{i}.modulation.lin" for i in (0, 1)],
    "chroma": [],  # Chroma's blocks have no modulation layers (its approximator feeds them)
    "sd3_5_medium": [f"joint_blocks.{i}.{b}.adaLN_modulation.1" for i in (0, 1)
                     for b in ("context_block", "x_block")],
    # musubi's lora_qwen_image adds the exclude pattern r".*(_mod_).*", but it is matched against
    # the dotted module name ("transformer_blocks.0.img_mod.1"), so img_mod / txt_mod are trained
    "qwen_image": [f"transformer_blocks.{i}.{m}_mod.1" for i in (0, 1) for m in ("img", "txt")],
    "wan21_t2v": [],  # Wan's modulation is a bare parameter, no layer: musubi's default is ours
    "wan22_ti2v_5b": [],
    # lora_lumina: every Linear of every JointTransformerBlock (the text refiner has no
    # modulation) and of the FinalLayer, a top-level layer
    "lumina2": [f"{b}.adaLN_modulation.1" for b in ("noise_refiner.0", "layers.0", "layers.1")]
    + ["final_layer.linear", "final_layer.adaLN_modulation.1"],
    # lora_hunyuan_image (in ComfyUI's names: its img_mod.linear is ComfyUI's img_mod.lin)
    "hunyuan_image_2_1": [f"double_blocks.{i}.{m}_mod.lin" for i in (0, 1) for m in ("img", "txt")]
    + [f"single_blocks.{i}.modulation.lin" for i in (0, 1)],
}


@pytest.mark.comfyui
@pytest.mark.parametrize("kind", [
    pytest.param("flux_dev", marks=pytest.mark.kohya), pytest.param("chroma", marks=pytest.mark.kohya),
    pytest.param("sd3_5_medium", marks=pytest.mark.kohya),
    pytest.param("qwen_image", marks=pytest.mark.musubi),
    pytest.param("wan21_t2v", marks=pytest.mark.musubi),
    pytest.param("wan22_ti2v_5b", marks=pytest.mark.musubi),
    pytest.param("lumina2", marks=pytest.mark.kohya),
    pytest.param("hunyuan_image_2_1", marks=pytest.mark.kohya)])
def test_kohya_default_set_is_the_kohya_trainers_default_less_modulation(kind, pack, request):
    """kohya's training-time ``create_network`` with default arguments (every Linear inside the
    family's blocks) selects our "kohya default" layers plus exactly the modulation layers (which
    DRaFT keeps frozen); nothing of ours is outside kohya's default."""
    patcher = D.tiny_model(kind)
    ours = {kohya_name(n) for n in pack["comfy_glue"].target_module_names(patcher, "kohya default")}
    base_sd = _comfy_state_dict(patcher)
    if kind in ("lumina2", "hunyuan_image_2_1"):
        kohya = request.getfixturevalue("kohya_lumina_hunyuan")
        if kind == "lumina2":
            model = _load_strict(_kohya_lumina(kohya), base_sd)
            network = kohya["lora_lumina"].create_network(1.0, 4, 1.0, None, _NO_GEMMA, model)
            theirs = {m.lora_name for m in network.unet_loras}
        else:
            model = _kohya_hunyuan_blocks(kohya)
            network = kohya["lora_hunyuan_image"].create_network(1.0, 4, 1.0, None, [], model)
            double, single = _convert_script_table(kohya_sd_scripts_path())
            theirs = set()
            for m in network.unet_loras:  # sd-scripts' names -> ComfyUI's, as its script does
                name = m.lora_name
                for src, dst in (double if "double_blocks" in name else single):
                    name = name.replace(src, dst)
                theirs.add(name)
        assert sorted(ours - theirs) == []
        assert sorted(theirs - ours) == sorted(kohya_name(n) for n in _MODULATION[kind])
        return
    if kind == "qwen_image":
        musubi = request.getfixturevalue("musubi")
        model = _load_strict(_musubi_qwen(musubi), base_sd)
        network = musubi["lora_qwen_image"].create_arch_network(1.0, 4, 1.0, None, [], model)
    elif kind in ("wan21_t2v", "wan22_ti2v_5b"):
        musubi = request.getfixturevalue("musubi_wan")
        model = _load_strict(_musubi_wan(musubi, kind), base_sd)
        network = musubi["lora_wan"].create_arch_network(1.0, 4, 1.0, None, [], model)
    else:
        kohya = request.getfixturevalue("kohya")
        if kind.startswith("sd3"):
            params = kohya["sd3_utils"].analyze_state_dict_state(base_sd)
            model = _load_strict(kohya["sd3_models"].create_sd3_mmdit(params), base_sd)
            network = kohya["lora_sd3"].create_network(1.0, 4, 1.0, None, [], model)
        else:
            model = _load_strict(_kohya_flux(kohya, kind)(), base_sd)
            network = kohya["lora_flux"].create_network(1.0, 4, 1.0, None, [None, None], model)
    theirs = {m.lora_name for m in network.unet_loras}
    assert sorted(ours - theirs) == []
    assert sorted(theirs - ours) == sorted(kohya_name(n) for n in _MODULATION[kind])
