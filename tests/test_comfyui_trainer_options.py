"""DRaFT Trainer's optional settings nodes in-process (marker ``comfyui``): a trainer with none of
DRaFT LoRA Settings, Optimizer, Save & Preview and Video Settings (ignored by image models) connected trains the same LoRA, bit for bit, as
with each of them connected at its defaults, and as a run with the same settings built the way
the trainer built them before they moved to those nodes (RunConfig/TrainingRun with the old
widgets' defaults written out); the nodes' non-default values reach the run."""
import pytest
import torch

from test_comfyui_inprocess import comfy_env  # noqa: F401  (fixture)

pytestmark = pytest.mark.comfyui

TRAINER = dict(prompt_set="custom", prompts="a cat\na dog", negative_prompt="", steps=4,
               scheduler="ddim_uniform", cfg=3.0, width=64, height=64, iterations=2, batch_size=1,
               learning_rate=1e-2, seed=5, lora_name="draft/options", resume_lora="none")


def _defaults(node_cls) -> dict:
    return {i.id: i.default for i in node_cls.define_schema().inputs}


def _output(node_cls, **widgets):
    """What ``node_cls`` outputs for its defaults updated with ``widgets`` (checked as when queued)."""
    values = dict(_defaults(node_cls), **widgets)
    assert node_cls.validate_inputs(**values) is True
    return node_cls.PREPARE_CLASS_CLONE({}).execute(**values).args[0]


def _sampler_and_reward():
    from comfyui_draft_pack.nodes.reward_types import RewardHandle
    from comfyui_draft_pack.nodes.sampler_node import DraftSamplerNode
    from comfyui_draft_pack.reward_models import ImageStatReward
    return _output(DraftSamplerNode), RewardHandle(ImageStatReward("saturation"), [], "saturation")


def _option_nodes():
    """The trainer's optional settings input -> the node class feeding it."""
    from comfyui_draft_pack.nodes.lora_settings_node import DraftLoRASettings
    from comfyui_draft_pack.nodes.optimizer_node import DraftOptimizer
    from comfyui_draft_pack.nodes.save_preview_node import DraftSavePreview
    from comfyui_draft_pack.nodes.trainer_options import OPTION_INPUTS
    from comfyui_draft_pack.nodes.video_settings_node import DraftVideoSettings
    nodes = {n.TRAINER_INPUT: n for n in (DraftLoRASettings, DraftOptimizer, DraftSavePreview,
                                          DraftVideoSettings)}
    assert set(nodes) == set(OPTION_INPUTS)
    return nodes


def _train_node(env, **optional) -> dict:
    from comfyui_draft_pack.nodes.trainer_node import DraftTrainerNode
    sampler, reward = _sampler_and_reward()
    node = DraftTrainerNode.PREPARE_CLASS_CLONE({})  # no queued prompt, no node id
    with torch.inference_mode():  # as ComfyUI runs every node
        out = node.execute(model=env["model"], vae=env["vae"], clip=env["clip"], reward=reward,
                           sampler=sampler, **TRAINER, **optional)
    return dict(out.args[1])  # the LORA_MODEL: ComfyUI's state dict of the trained LoRA


def _train_old_way(env) -> dict:
    """The run as DRaFT Trainer built it when every setting was one of its widgets, with those
    widgets' defaults of then written out (rank 8, alpha 8, attention, weight decay 0.1, clip 10,
    no accumulation, no KL, auto precision, no periodic saves, a preview every 10)."""
    from comfyui_draft_pack.nodes.training_run import RunConfig, TrainingRun, clip_encoder
    from comfyui_draft_pack.training import TrainSettings
    from comfyui_draft_pack.training.memory_plan import MemoryOptions
    sampler, reward = _sampler_and_reward()
    t = TRAINER
    config = RunConfig(
        prompts=["a cat", "a dog"], negative_prompt="", sampler=sampler.draft_settings,
        steps=t["steps"], scheduler=t["scheduler"], cfg=t["cfg"], width=t["width"], height=t["height"],
        train=TrainSettings(iterations=t["iterations"], batch_size=t["batch_size"], grad_accum=1,
                            learning_rate=t["learning_rate"], weight_decay=0.1, grad_clip=10.0,
                            kl_coeff=0.0, seed=t["seed"]),
        rank=8, alpha=8.0, target_set="attention", mixed_precision="auto", save_every=0,
        preview_every=10, lora_name=t["lora_name"], resume_lora=None, sigmas=None, node_id=None,
        reward_label=reward.label, memory=MemoryOptions(), guidance=None)
    with torch.inference_mode():
        with torch.inference_mode(False), torch.enable_grad():
            run = TrainingRun(env["model"], env["vae"], clip_encoder(env["clip"]), reward, config)
            run.run()
            _, sd = run.model_with_lora()
    return dict(sd)


def _assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} of {len(a)} tensors differ, e.g. {different[0]}"


def test_defaults_of_every_options_node_train_the_lora_of_the_trainer_alone_bit_for_bit(comfy_env):
    alone = _train_node(comfy_env)
    assert len(alone) > 0 and any(v.abs().max() > 0 for k, v in alone.items() if "lora_up" in k)
    nodes = _option_nodes()
    assert set(nodes) == {"lora_settings", "optimizer", "saving", "video"}
    for name, node_cls in nodes.items():  # each one connected at its defaults
        _assert_same(alone, _train_node(comfy_env, **{name: _output(node_cls)}), f"{name} at its defaults")
    everything = {name: _output(node_cls) for name, node_cls in nodes.items()}
    _assert_same(alone, _train_node(comfy_env, **everything), "all of them at their defaults")
    _assert_same(alone, _train_old_way(comfy_env), "the same settings built the old way")


def test_options_nodes_values_reach_the_run(comfy_env, monkeypatch):
    from comfyui_draft_pack.nodes import trainer_node
    captured = []

    class Stop(Exception):
        pass

    def capture(model, vae, encode, reward, config):
        captured.append(config)
        raise Stop

    monkeypatch.setattr(trainer_node, "TrainingRun", capture)
    nodes = _option_nodes()
    with pytest.raises(Stop):
        _train_node(comfy_env,
                    lora_settings=_output(nodes["lora_settings"], lora_rank=4, lora_alpha=2.0,
                                          target_modules="kohya default"),
                    optimizer=_output(nodes["optimizer"], weight_decay=0.0, grad_clip=0.5,
                                      grad_accumulation=3, kl_coeff=0.25, mixed_precision="bf16"),
                    saving=_output(nodes["saving"], save_every=7, preview_every=0),
                    video=_output(nodes["video"], length=17, decoded_latent_frames=2))
    c = captured[0]
    assert (c.rank, c.alpha, c.target_set) == (4, 2.0, "kohya default")
    assert (c.train.weight_decay, c.train.grad_clip, c.train.grad_accum, c.train.kl_coeff) == (0.0, 0.5, 3, 0.25)
    assert c.mixed_precision == "bf16" and (c.save_every, c.preview_every) == (7, 0)
    assert (c.video.length, c.video.decoded_latent_frames) == (17, 2)
    assert (c.train.iterations, c.train.batch_size, c.train.learning_rate, c.train.seed) == (2, 1, 1e-2, 5)

