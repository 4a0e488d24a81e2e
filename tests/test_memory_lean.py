"""Lean memory modes change memory, never values: block checkpointing nested in step
checkpointing, rows one at a time, and running reward statistics updated once per update."""
import pytest
import torch

from reward_models.combine import CombinedReward
from reward_models.image_stats import ImageStatReward
from training import DifferentiableSampler, DraftTrainer, SamplerSettings, TrainSettings
from training.checkpointing import checkpoint_blocks, is_wrapped
from training.sampler import karras_sigmas
from training.toy_models import build_toy_model, colour_reward, toy_lora

PROMPTS = ["a", "b", "c"]


def trainer_for(method, *, blocks=False, row_by_row=False, eta=0.0, batch=3, k=3, reward=None,
                kl=0.0, channels_last=None, whole_step=False):
    torch.manual_seed(0)
    denoiser, decoder = build_toy_model(seed=0)
    lora = toy_lora(denoiser)
    ref = None
    if kl:
        def ref(x, s, i):
            with lora.disabled():
                return denoiser(x, s, i)
    sampler = DifferentiableSampler(denoiser, karras_sigmas(6),
                                    SamplerSettings(method=method, k=k, lv_samples=2, eta=eta),
                                    reference_denoise=ref)
    units, selective = [], []
    if blocks:  # True: the denoiser's and the decoder's blocks; "decoder": the decoder's only,
        eps = denoiser.eps_net  # selectively (convolution outputs kept)
        units = [decoder.conv1, decoder.conv2]
        if blocks is True:
            units = [eps.conv_in, eps.mid, eps.conv_out] + units
        else:
            units, selective = [], [decoder]
    trainer = DraftTrainer(sampler, decoder, reward or colour_reward, PROMPTS, lora, (4, 8, 8),
                           TrainSettings(batch_size=batch, seed=3, kl_coeff=kl), block_units=units,
                           row_by_row=row_by_row,
                           denoiser_blocks_checkpointed=blocks is True, selective_units=selective,
                           channels_last_decode=channels_last, whole_step_over_blocks=whole_step)
    captured = []
    trainer.optimizer.step = lambda *a, **kw: captured.append(
        [p.grad.detach().clone() for p in trainer.params])
    return trainer, captured, denoiser, decoder


def one_update_grads(method, **kw):
    trainer, captured, *_ = trainer_for(method, **kw)
    report = trainer.step()
    assert not report.skipped
    return captured[0], report


def assert_same(a, b, tol=1e-5):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=tol, rtol=tol), (x - y).abs().max()
    assert any(x.abs().max() > 0 for x in a)


@pytest.mark.parametrize("method,eta", [("draft_k", 0.0), ("draft_k", 0.7), ("draft_lv", 0.0),
                                        ("draft", 0.0)])
def test_block_checkpointing_and_row_by_row_give_the_batched_gradient(method, eta):
    plain, r0 = one_update_grads(method, eta=eta)
    nested, r1 = one_update_grads(method, eta=eta, blocks=True)
    rows, r2 = one_update_grads(method, eta=eta, row_by_row=True)
    both, r3 = one_update_grads(method, eta=eta, blocks=True, row_by_row=True)
    decoder_only, r4 = one_update_grads(method, eta=eta, blocks="decoder", row_by_row=True)
    for other in (nested, rows, both, decoder_only):
        assert_same(plain, other)
    # the same per-sample rewards, in the same order
    for r in (r1, r2, r3, r4):
        assert r.rewards == pytest.approx(r0.rewards, abs=1e-6)


@pytest.mark.parametrize("method", ["draft_k", "draft_lv"])
def test_a_single_step_checkpointed_whole_over_its_blocks_gives_the_plain_gradient(method):
    """A video decoder's way (``whole_step_over_blocks``): the single differentiated step is
    checkpointed whole on top of its checkpointed blocks (so their saved inputs do not sit beside
    the decoder's backward): the same gradient and rewards, for one more denoiser forward."""
    plain, r0 = one_update_grads(method, k=1)
    calls = {}
    for whole in (False, True):
        trainer, captured, denoiser, _ = trainer_for(method, k=1, blocks=True, row_by_row=True,
                                                     whole_step=whole)
        count = [0]
        hook = denoiser.eps_net.mid.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
        report = trainer.step()
        hook.remove()
        calls[whole] = count[0]
        assert_same(plain, captured[0])
        assert report.rewards == pytest.approx(r0.rewards, abs=1e-6)
    rows = 3 * (2 if method == "draft_lv" else 1)  # (batch 3; DRaFT-LV: 2 copies a row)
    assert calls[True] == calls[False] + rows


def test_row_by_row_with_kl_penalty_gives_the_batched_gradient():
    plain, _ = one_update_grads("draft_k", kl=0.5, k=2)
    rows, _ = one_update_grads("draft_k", kl=0.5, k=2, row_by_row=True, blocks=True)
    assert_same(plain, rows)


def test_every_module_has_its_own_forward_back_after_an_update_and_after_an_error():
    trainer, _, denoiser, decoder = trainer_for("draft_k", blocks=True, row_by_row=True)
    modules = list(denoiser.modules()) + list(decoder.modules())
    calls = {"n": 0}

    def inspect_then_fail(images, prompts):
        calls["n"] += 1
        assert is_wrapped(denoiser.eps_net.mid) and is_wrapped(decoder.conv1)
        if calls["n"] == 2:
            raise KeyboardInterrupt("cancel in the middle of an update")
        return colour_reward(images)

    trainer.step()
    assert not any("forward" in m.__dict__ for m in modules)
    trainer.reward = inspect_then_fail
    with pytest.raises(KeyboardInterrupt):
        trainer.step()
    assert calls["n"] == 2
    assert not any("forward" in m.__dict__ for m in modules)


def test_checkpoint_blocks_restores_an_instance_forward_it_found():
    layer = torch.nn.Linear(2, 2)
    own = layer.forward
    layer.forward = own  # an instance attribute someone else set
    with checkpoint_blocks([layer]):
        assert is_wrapped(layer)
    assert layer.__dict__["forward"] is own


def test_block_checkpointing_keeps_fewer_activations():
    """Peak live bytes of one update (the project's counter on real tensors): block checkpointing
    nested in step checkpointing holds less than step checkpointing alone (K = 3)."""
    from training.memory_trace import LiveBytes

    def peak(blocks):
        trainer, *_ = trainer_for("draft_k", blocks=blocks, batch=1)
        trainer.latent_shape = (4, 32, 32)
        counter = LiveBytes()
        with counter:
            trainer.step()
        return counter.peak
    lean, plain = peak(True), peak(False)
    assert lean < 0.95 * plain, (lean, plain)


def test_running_statistics_update_once_per_update_when_rows_go_one_at_a_time():
    def combined():
        return CombinedReward([ImageStatReward("brightness"), ImageStatReward("saturation")],
                              [1.0, 0.5], standardize=True)
    counts = []
    for row_by_row in (False, True):
        reward = combined()
        trainer, *_ = trainer_for("draft_lv", row_by_row=row_by_row, reward=reward, batch=2)
        trainer.step()
        trainer.step()
        counts.append(int(reward.num_batches))
    assert counts == [2, 2]  # one fold per update, whether 1 call or 2 x 2 LV rows per update


def test_memory_plan_is_fast_when_it_fits_lean_when_only_that_fits_and_refuses_otherwise():
    from training.memory_plan import (GIB, WAYS, DoesNotFit, MemoryOptions, choose_plan,
                                      estimate_update_bytes)
    # a model whose decoder backward (2.9 GiB) outweighs its denoiser step (2.3 GiB), per row
    kw = dict(rows=2, cfg_branches=2, decode_bytes=1 * GIB, denoiser_row_bytes=0.1 * GIB)
    roomy = choose_plan(MemoryOptions(), available_bytes=100 * GIB, **kw)
    assert not roomy.block_checkpointing and not roomy.row_by_row
    tight = choose_plan(MemoryOptions(), available_bytes=int(1.5 * GIB), **kw)
    assert tight.block_checkpointing and tight.denoiser_blocks and tight.row_by_row
    assert tight.lean_bytes < 1.5 * GIB < tight.fast_bytes
    assert "the fast way needs" in tight.describe()
    # In between, the cheaper ways come first: rows one at a time, then the decoder's and reward's
    # blocks only (one extra decode per update), before the denoiser's blocks (one per step).
    est = {w: estimate_update_bytes(blocks=w[0], one_row=w[1], **kw) for w in WAYS}
    rows_only, decoder_only = ("off", True), ("decoder and reward", True)
    assert est[WAYS[0]] > est[rows_only] > est[decoder_only] > est[WAYS[-1]] == tight.lean_bytes
    rows_only = choose_plan(MemoryOptions(), available_bytes=est[rows_only], **kw)
    assert rows_only.row_by_row and not rows_only.block_checkpointing
    decoder = choose_plan(MemoryOptions(), available_bytes=est[decoder_only], **kw)
    assert decoder.row_by_row and decoder.block_checkpointing and not decoder.denoiser_blocks
    assert "block checkpointing decoder and reward" in decoder.describe()
    fixed = choose_plan(MemoryOptions("decoder and reward"), available_bytes=100 * GIB, **kw)
    assert fixed.block_checkpointing and not fixed.denoiser_blocks and not fixed.row_by_row
    with pytest.raises(DoesNotFit, match="Lower the resolution, the batch size or the LV samples"):
        choose_plan(MemoryOptions(), available_bytes=GIB // 2, **kw)
    forced = choose_plan(MemoryOptions("on", "all at once"), available_bytes=100 * GIB, **kw)
    assert forced.block_checkpointing and not forced.row_by_row
    big_step = dict(kw, denoiser_row_bytes=0.5 * GIB)  # a denoiser step that outweighs the decoder
    cond = choose_plan(MemoryOptions(cfg_gradient="conditional only"), available_bytes=100 * GIB,
                       **big_step)
    both = choose_plan(MemoryOptions(), available_bytes=100 * GIB, **big_step)
    assert cond.cond_only and cond.fast_bytes < both.fast_bytes
    with pytest.raises(ValueError, match="rows must be one of"):
        MemoryOptions(rows="sometimes")
    # a family's own decode factors (HunyuanImage 2.1's 32x VAE) replace the defaults, per way
    own = (7.0, 5.0, 3.0)
    for (blocks, one_row), factor in zip((("off", True), ("decoder and reward", True), ("on", True)), own):
        assert estimate_update_bytes(blocks=blocks, one_row=one_row, decode_factors=own, **kw) == \
            int(factor * GIB)
    assert choose_plan(MemoryOptions(), available_bytes=int(2.5 * GIB), **kw).block_checkpointing
    with pytest.raises(DoesNotFit):
        choose_plan(MemoryOptions(), available_bytes=int(2.5 * GIB), decode_factors=own, **kw)


def test_selective_checkpointing_recomputes_no_convolution_and_keeps_the_gradient():
    """The decoder's blocks in the middle memory way: convolution outputs are kept, norms and
    activations recomputed. The backward runs no convolution forward again (a full checkpoint
    reruns the ones whose outputs the backward needs) and the gradient is the plain one."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from training.checkpointing import KEEP_CONVOLUTIONS

    class CountConvolutions(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten.convolution.default
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.GroupNorm(2, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                                torch.nn.GroupNorm(2, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 8, 16, 16)
    grads, recomputed = [], []
    for keep in (False, None, KEEP_CONVOLUTIONS):  # plain, full checkpoint, selective
        xi = x.clone().requires_grad_(True)
        with checkpoint_blocks([block] if keep is not False else [], keep=keep or None):
            out = block(xi)
            counter = CountConvolutions()
            with counter:
                (out ** 2).sum().backward()
        grads.append(xi.grad)
        recomputed.append(counter.n)
    assert recomputed[1] >= 1 and recomputed[2] == 0, recomputed  # full: conv1 runs again
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)
    assert not is_wrapped(block)


@pytest.mark.parametrize("method", ["draft_k", "draft_lv"])
def test_channels_last_decode_gives_the_nchw_gradient(method):
    """On the CPU the trainer hands the decoder channels-last latents (oneDNN's faster layout):
    the decoder sees NHWC strides, the images come back contiguous, and the gradient is the NCHW
    one. A GPU keeps NCHW unless asked."""
    grads, layouts, images = {}, {}, {}
    for cl in (False, None):  # None: the device's choice, channels-last on the CPU
        trainer, captured, _, decoder = trainer_for(method, channels_last=cl, row_by_row=True)
        seen = layouts.setdefault(cl, [])
        decoder.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(
            a[0].is_contiguous(memory_format=torch.channels_last) and not a[0].is_contiguous()))
        assert not trainer.step().skipped
        grads[cl] = captured[0]
        images[cl] = trainer.generate([11, 12])
    assert layouts[False] and not any(layouts[False])
    assert layouts[None] and all(layouts[None])
    assert images[None].is_contiguous()
    assert torch.allclose(images[None], images[False], atol=1e-6)
    assert_same(grads[None], grads[False], tol=1e-5)
