"""Block checkpointing of ComfyUI's FLUX and Chroma blocks, which write in place (marker ``comfyui``).

ComfyUI 0.3.64's FLUX and Chroma blocks add their residuals in place (``txt += ...``, ``x += ...``,
``img.addcmul_(...)``) into their own arguments and into tensors a layer norm saved. With every
double and single block checkpointed (training/checkpointing.py), the LoRA gradient of the tiny
models of tests/dit_fixtures.py must be the exact one: that of plain autograd with every saved
activation copied when saved (the step checkpoint's exact way; plain autograd alone refuses these
blocks), for one denoiser forward, and that of the trainer's fast way for a whole update. (torch's
non-reentrant checkpoint, used before, gave 25 % (FLUX) and 79 % (Chroma) off for DRaFT-K, K = 3,
and refused K = 1.)
"""
import pytest
import torch

import dit_fixtures as D
import lora_fixtures as F

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]
KINDS = ["flux_dev", "chroma"]


@pytest.fixture(scope="module")
def pack():
    F.import_comfy()
    return {name: F.import_pack_module(name) for name in
            ("nodes.comfy_glue", "nodes.training_run", "nodes.reward_types",
             "training.checkpointing", "training.memory_plan")}


def _lora_model(glue, kind):
    patcher = D.tiny_model(kind).clone()
    dm = patcher.model.diffusion_model
    lora = glue.build_lora(dm, glue.target_module_names(dm, "kohya default"), rank=2, alpha=2.0,
                           seed=1)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    glue.attach_lora(patcher, lora)
    patcher.load(torch.device("cpu"), full_load=True)
    glue.de_inference_(patcher.model)
    return patcher, lora


def _denoiser_loss(patcher, kind):
    """A fixed linear function of one denoiser prediction (conditioned as the family is)."""
    entry = D.conditioning(kind)("a cat")[0]
    extra = {"guidance": torch.tensor([3.5]) if kind == "flux_dev" else torch.zeros(1)}
    if entry[1].get("pooled_output") is not None:
        extra["y"] = entry[1]["pooled_output"]
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = patcher.model.apply_model(x, torch.tensor([0.7]), c_crossattn=entry[0], **extra)
    return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum()


def _relative(got, reference) -> float:
    got, reference = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in reference])
    assert float(reference.norm()) > 0
    return float((got - reference).norm() / reference.norm())


@pytest.mark.parametrize("kind", KINDS)
def test_flux_and_chroma_blocks_checkpointed_give_the_exact_lora_gradient(kind, pack):
    glue, ckpt = pack["nodes.comfy_glue"], pack["training.checkpointing"]
    grads, state = {}, {}
    for way in ("plain", "copies", "blocks"):
        patcher, lora = _lora_model(glue, kind)
        params = lora.trainable_parameters()
        dm = patcher.model.diffusion_model
        units = glue.denoiser_checkpoint_units(dm)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                if way == "plain":
                    with pytest.raises(RuntimeError, match="inplace"):  # plain autograd refuses
                        torch.autograd.grad(_denoiser_loss(patcher, kind), params)
                    continue
                if way == "copies":
                    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
                else:
                    hooks = ckpt.checkpoint_blocks(units, params=params, state=state)
                with hooks:
                    grads[way] = torch.autograd.grad(_denoiser_loss(patcher, kind), params)
        finally:
            glue.detach_lora(patcher.model)
    assert len(units) == 4  # two double and two single blocks
    error = _relative(grads["blocks"], grads["copies"])
    assert error < 1e-5, error
    # what the checkpoint found each block writes into (and copies before the block runs)
    written: dict = {}
    for unit in units:
        for layout, notes in state[unit].notes.items():
            written.setdefault(type(unit).__name__, set()).update(layout[i] for i in notes.written)
    assert written == {"DoubleStreamBlock": {"[1]['img']", "[1]['txt']"} if kind == "chroma"
                       else {"[1]['txt']"}, "SingleStreamBlock": {"[0][0]"}}, written


def _update_gradient(pack, kind, blocks, method, k, monkeypatch):
    """The LoRA gradient of one DRaFT update through ``TrainingRun`` (memory way forced)."""
    from reward_models import ImageStatReward
    from training import SamplerSettings, TrainSettings
    rc, rt, mp = pack["nodes.training_run"], pack["nodes.reward_types"], pack["training.memory_plan"]
    captured = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **kw: captured.append(
        [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]))
    config = rc.RunConfig(
        prompts=["a cat", "a dog"], negative_prompt="",
        sampler=SamplerSettings(method, k=k, lv_samples=2), steps=6, scheduler="simple",
        cfg=2.0 if kind == "chroma" else 1.0, width=64, height=64,
        train=TrainSettings(iterations=1, learning_rate=3e-2, seed=0, grad_clip=0.0, batch_size=2),
        rank=4, alpha=4.0, target_set="kohya default", mixed_precision="no", save_every=0,
        preview_every=0, lora_name=f"draft/{kind}", memory=mp.MemoryOptions(blocks, "all at once"))
    reward = rt.RewardHandle(ImageStatReward("brightness"), [], "brightness")
    with torch.inference_mode(False), torch.enable_grad():
        rc.TrainingRun(D.tiny_model(kind), D.tiny_vae(kind), D.conditioning(kind), reward,
                       config).run()
    return captured[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,k", [("draft_k", 3), ("draft_k", 1), ("draft_lv", 1)])
def test_flux_and_chroma_updates_with_every_block_checkpointed_give_the_fast_ways_gradient(
        kind, method, k, pack, monkeypatch):
    """The leanest way's blocks (nested in the step checkpoint when K > 1; CFG 2 for Chroma: both
    branches) against the fast way (each step checkpointed, its saved activations copied)."""
    fast = _update_gradient(pack, kind, "off", method, k, monkeypatch)
    lean = _update_gradient(pack, kind, "on", method, k, monkeypatch)
    error = _relative(lean, fast)
    assert error < 1e-5, error
