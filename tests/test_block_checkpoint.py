"""Block checkpointing (training/checkpointing.py) of blocks that write in place.

ComfyUI's FLUX and Chroma blocks add their residuals in place (``txt += ...``, ``x += ...``,
``img.addcmul_(...)``): into the block's own input, and into tensors a layer norm saved for its
backward. The small blocks here do the same, each with an out-of-place twin of the same weights
whose plain autograd gradient is the reference. Checkpointed, the in-place model must give that
gradient (torch's non-reentrant checkpoint, used before, computed from overwritten values or
refused), alone, nested in the sampler's step checkpoint, under ``backward`` and
``torch.autograd.grad``, and hold no more memory than its out-of-place twin.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training import DifferentiableSampler, SamplerSettings, karras_sigmas
from training.checkpointing import checkpoint_blocks, is_wrapped
from training.lora import wrap_module

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models
D = 16


def _norm(x):
    return F.layer_norm(x, x.shape[-1:])


class Double(nn.Module):
    """FLUX's double block in small: ``img`` out of place, ``txt`` in place (its own input, then a
    tensor the second norm saved); ``chroma``: both streams with ``addcmul_``, as Chroma's."""

    def __init__(self, in_place: bool, chroma: bool = False):
        super().__init__()
        self.in_place, self.chroma = in_place, chroma
        self.mod = nn.Linear(D, 2 * D)
        self.img_attn, self.txt_attn = nn.Linear(D, D), nn.Linear(D, D)
        self.img_mlp, self.txt_mlp = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, img, txt, vec, transformer_options=None):
        scale, gate = self.mod(F.silu(vec))[:, None].chunk(2, dim=-1)
        joint = torch.cat((txt, img), 1)
        mixed = torch.softmax(_norm(joint) @ _norm(joint).transpose(1, 2) / D ** 0.5, -1) @ joint
        txt_attn, img_attn = mixed[:, :txt.shape[1]], mixed[:, txt.shape[1]:]
        if not self.in_place:
            img = img + gate * self.img_attn(img_attn)
            img = img + gate * self.img_mlp(_norm(img) * (1 + scale))
            txt = txt + gate * self.txt_attn(txt_attn)
            return img, txt + gate * self.txt_mlp(_norm(txt) * (1 + scale))
        if self.chroma:
            img.addcmul_(gate, self.img_attn(img_attn))
            img.addcmul_(gate, self.img_mlp(_norm(img) * (1 + scale)))
        else:
            img = img + gate * self.img_attn(img_attn)
            img = img + gate * self.img_mlp(_norm(img) * (1 + scale))
        if self.chroma:
            txt.addcmul_(gate, self.txt_attn(txt_attn))
            txt.addcmul_(gate, self.txt_mlp(_norm(txt) * (1 + scale)))
        else:
            txt += gate * self.txt_attn(txt_attn)
            txt += gate * self.txt_mlp(_norm(txt) * (1 + scale))
        return img, txt


class Single(nn.Module):
    """FLUX's single block in small: writes its residual into its input and returns it."""

    def __init__(self, in_place: bool, chroma: bool = False):
        super().__init__()
        self.in_place, self.chroma = in_place, chroma
        self.mod = nn.Linear(D, 2 * D)
        self.linear1, self.linear2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x, vec, transformer_options=None):
        shift, gate = self.mod(F.silu(vec))[:, None].chunk(2, dim=-1)
        h = _norm(x) + shift
        v, mlp = self.linear1(h).chunk(2, dim=-1)
        attn = torch.softmax(h @ h.transpose(1, 2) / D ** 0.5, -1) @ v  # (the tokens mix)
        out = self.linear2(torch.cat((attn, F.gelu(mlp)), -1))
        if not self.in_place:
            return x + gate * out
        if self.chroma:
            x.addcmul_(gate, out)
        else:
            x += gate * out
        return x


class TinyDiT(nn.Module):
    """``(x (B, 4, 4, 4), sigma, prompt index) -> x0``, FLUX-like: two double blocks on the image
    and text tokens, the streams concatenated, two single blocks, the image tokens read back."""

    def __init__(self, in_place: bool, chroma: bool = False, seed: int = 0):
        super().__init__()
        self.img_in, self.txt_in, self.vec_in = nn.Linear(4, D), nn.Embedding(4, 3 * D), nn.Linear(1, D)
        self.doubles = nn.ModuleList([Double(in_place, chroma) for _ in range(2)])
        self.singles = nn.ModuleList([Single(in_place, chroma) for _ in range(2)])
        self.out = nn.Linear(D, 4)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g)).requires_grad_(False)

    def forward(self, x, sigma, index):
        b = x.shape[0]
        img = self.img_in(x.flatten(2).transpose(1, 2))
        txt = self.txt_in(index).reshape(b, 3, D)
        vec = self.vec_in(torch.log(sigma.reshape(b, 1)))
        options = {"step": 1}
        for block in self.doubles:
            img, txt = block(img=img, txt=txt, vec=vec, transformer_options=options)
        img = torch.cat((txt, img), 1)
        for block in self.singles:
            img = block(img, vec=vec, transformer_options=options)
        eps = self.out(img[:, txt.shape[1]:]).transpose(1, 2).reshape(x.shape)
        return x - sigma.reshape(b, 1, 1, 1) * eps


TARGETS = [f"{kind}.{i}.{name}" for i in (0, 1) for kind, names in
           (("doubles", ("img_attn", "txt_attn", "img_mlp", "txt_mlp")), ("singles", ("linear1", "linear2")))
           for name in names]


def _model(in_place: bool, chroma: bool = False):
    """The tiny DiT with a LoRA (non-zero factors, seeded) on every block's linears."""
    model = TinyDiT(in_place, chroma)
    lora = wrap_module(model, TARGETS, rank=2, alpha=2.0, seed=0)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model, lora.trainable_parameters()


def _units(model):
    return list(model.doubles) + list(model.singles)


def _loss(model, x_grad: bool = False):
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(x_grad)
    out = model(x, torch.tensor([0.7, 2.0]), torch.tensor([1, 3]))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    return (out * w).sum(), x


def _reference(chroma: bool, x_grad: bool = False):
    model, params = _model(False, chroma)
    loss, x = _loss(model, x_grad)
    return torch.autograd.grad(loss, params + ([x] if x_grad else []))


def _assert_exact(got, reference):
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    assert all(float(g.abs().max()) > 0 for g in reference)


@pytest.mark.parametrize("chroma", [False, True], ids=["flux", "chroma"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["latent_frozen", "latent_grad"])
def test_in_place_blocks_checkpointed_give_the_out_of_place_gradient(chroma, x_grad):
    with pytest.raises(RuntimeError, match="inplace"):  # plain autograd refuses the in-place model
        model, params = _model(True, chroma)
        torch.autograd.grad(_loss(model)[0], params)
    model, params = _model(True, chroma)
    with checkpoint_blocks(_units(model)) as n:
        assert n == 4 and all(is_wrapped(u) for u in _units(model))
        loss, x = _loss(model, x_grad)
        got = torch.autograd.grad(loss, params + ([x] if x_grad else []))
    assert not any(is_wrapped(u) for u in _units(model))
    _assert_exact(got, _reference(chroma, x_grad))


@pytest.mark.parametrize("chroma", [False, True], ids=["flux", "chroma"])
def test_in_place_blocks_under_backward_and_bf16_autocast(chroma):
    """In bf16 an in-place ``addcmul_`` rounds unlike its out-of-place twin: the reference here is
    the in-place model under plain autograd with every saved activation copied when saved (the
    step checkpoint's exact way)."""
    grads = {}
    for way in ("copies", "blocks"):
        model, params = _model(True, chroma)
        copies = torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
        with (checkpoint_blocks(_units(model)) if way == "blocks" else copies):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = _loss(model)
            loss.float().backward()
        grads[way] = [p.grad for p in params]
    _assert_exact(grads["blocks"], grads["copies"])
    fp32 = _reference(chroma)
    assert all(float((a - b).norm() / b.norm()) < 0.05 for a, b in zip(grads["blocks"], fp32))


@pytest.mark.parametrize("method,k", [("draft_k", 3), ("draft_k", 1), ("draft_lv", 1)])
def test_in_place_blocks_nested_in_the_step_checkpoint_give_the_out_of_place_gradient(method, k):
    """The trainer's leanest way: the blocks checkpointed inside the sampler's per-step
    checkpoint (K > 1), or alone (K = 1: the step is not checkpointed)."""
    grads = {}
    for in_place in (False, True):
        model, params = _model(in_place)
        sampler = DifferentiableSampler(model, karras_sigmas(5, sigma_max=8.0),
                                        SamplerSettings(method=method, k=k, lv_samples=2))
        noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
        with checkpoint_blocks(_units(model) if in_place else []):
            out = sampler.rollout(noise, torch.tensor([0, 2]), generator=torch.Generator().manual_seed(6),
                                  step_checkpoint=in_place and k > 1, params=params)
            loss = (out.latents ** 2).mean()
            grads[in_place] = torch.autograd.grad(loss, params)
    _assert_exact(grads[True], grads[False])


def test_only_blocks_that_write_into_their_arguments_leave_torchs_checkpoint_and_hold_no_more():
    """Which arguments each block writes into is learnt on its first call (and copied from then
    on); a block that writes none keeps torch's checkpoint. After the forward the in-place model
    holds exactly what its out-of-place twin holds (the blocks' inputs); its backward peaks a
    little higher (a Function's backward holds its output gradients); the first update, which
    learns what to copy (the recompute runs twice), peaks no higher than the next and leaves
    nothing behind."""
    from training.checkpointing import _NOTES
    from training.memory_trace import LiveBytes
    held, peak, left = {}, {}, {}
    for in_place in (False, True):
        model, params = _model(in_place)
        ways = [("blocks", 0), ("blocks", 1)] + ([] if in_place else [("plain", 0)])
        for way, update in ways:  # (plain autograd refuses the in-place model)
            counter = LiveBytes()
            with counter:
                with checkpoint_blocks(_units(model) if way == "blocks" else [], params=params):
                    loss, x = _loss(model)
                    held[in_place, way, update] = counter.live
                    grads = torch.autograd.grad(loss, params)
                del loss, x, grads
            peak[in_place, way, update], left[in_place, way, update] = counter.peak, counter.live
        written = {type(u).__name__: {name for layout, notes in _NOTES[u].items()
                                      for i, name in enumerate(layout) if i in notes.written}
                   for u in _units(model)}
        assert written == ({"Double": {"[1]['txt']"}, "Single": {"[0][0]"}} if in_place
                           else {"Double": set(), "Single": set()})
    blocks = (False, "blocks", 0)
    assert held[True, "blocks", 0] == held[blocks] < held[False, "plain", 0] / 4, held
    assert peak[True, "blocks", 0] == peak[True, "blocks", 1] < 1.1 * peak[blocks], peak
    assert peak[blocks] < 0.5 * peak[False, "plain", 0], peak
    assert not any(left.values()), left


@pytest.mark.parametrize("given", [True, False], ids=["params_given", "params_not_given"])
def test_tensors_inside_dataclass_arguments_and_closed_over_parameters_get_their_gradient(given):
    """Chroma hands its blocks their modulation as a dataclass of tensors; ComfyUI applies the LoRA
    as weight wrappers, outside the block's modules. Both reach the gradient (the factors when
    given as ``params``; not given, the first backward refuses rather than drop them)."""
    from dataclasses import dataclass

    @dataclass
    class Mod:
        shift: torch.Tensor
        gate: torch.Tensor

    class Block(nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.linear = nn.Linear(D, D).requires_grad_(False)
            self.wrappers = [factor]  # (not a submodule: as ComfyUI's weight_function list)

        def forward(self, x, mod):
            w = self.linear.weight + self.wrappers[0]
            x.addcmul_(mod.gate, F.linear(_norm(x) + mod.shift, w))
            return x

    torch.manual_seed(0)
    factor = nn.Parameter(0.1 * torch.randn(D, D))
    source = nn.Parameter(torch.randn(2, D))
    blocks = [Block(factor), Block(factor)]

    def loss():
        x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1)) * 1.0
        mod = Mod(shift=torch.tanh(source)[:, None], gate=torch.sigmoid(source)[:, None])
        for block in blocks:
            x = block(x, mod)
        return (x ** 2).sum()

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):  # exact
        reference = torch.autograd.grad(loss(), [factor, source])
    with checkpoint_blocks(blocks, params=[factor] if given else []):
        if not given:
            with pytest.raises(RuntimeError, match="not given to checkpoint_blocks"):
                torch.autograd.grad(loss(), [factor, source])
            return
        got = torch.autograd.grad(loss(), [factor, source])
    _assert_exact(got, reference)


def test_a_block_that_writes_into_an_argument_only_later_is_refused_not_miscomputed():
    class Sometimes(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.calls = nn.Linear(D, D), 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                x += self.linear(_norm(x))
                return x
            return x + self.linear(_norm(x))

    block = Sometimes()
    x = torch.randn(2, D, requires_grad=True)
    with checkpoint_blocks([block]):
        block(x * 1.0).sum().backward()
        with pytest.raises(RuntimeError, match=r"wrote into its argument\(s\) \['\[0\]\[0\]'\]"):
            block(x * 1.0)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_wan_decoder_recomputed_frame_by_frame_gives_the_plain_gradient(version, monkeypatch):
    """Wan's causal video decoder (diffusers' ``AutoencoderKLWan``, small; 2.2: the residual
    decoder of Wan 2.2 TI2V-5B, 48 latent channels, 16x, its up blocks one unit each):
    checkpointed as the trainer does (the decoder once per latent frame, its blocks nested), the
    blocks that get several frames (every latent frame after the first becomes 4) are recomputed
    one frame at a time in the backward pass (2.2: not on the first chunk, whose up blocks drop
    frames). In float64 the decoded frames are the plain decode's to the bit and the gradient its
    own to rounding (3 latent frames: 1 + 4 + 4 frames)."""
    import dit_fixtures
    import training.checkpointing as ckpt
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    if version == "2.1":
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        latent = torch.randn(1, 4, 3, 4, 6, dtype=torch.float64)
    else:
        vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2],
                               num_res_blocks=1, is_residual=True, in_channels=12,
                               out_channels=12, patch_size=2, scale_factor_spatial=16,
                               latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
        latent = torch.randn(1, 48, 3, 2, 3, dtype=torch.float64)
    vae = vae.double().eval()
    vae.requires_grad_(False)
    units = ckpt.diffusers_decoder_units(vae.decoder)
    assert units[0] is vae.decoder  # the outer unit, as ComfyUI's Wan decoder is
    if version == "2.2":  # the up blocks' resnets and upsamplers units of their own, nested in
        # the up blocks with a shortcut (the last has none and is no unit)
        ups = list(vae.decoder.up_blocks)
        assert [u in units for u in ups] == [True, True, True, False]
        assert all(m in units for u in ups for m in [*u.resnets, u.upsampler] if m is not None)
    weights = torch.rand(1, 3, 9, 32, 48, dtype=torch.float64)
    plain, got, chunked = dit_fixtures.decode_frame_by_frame(
        lambda z: vae.decode(z, return_dict=False)[0], units, latent, weights, monkeypatch)
    assert chunked and set(chunked) == {2, 4}  # (blocks after 1 and after 2 temporal upsamplings)
    assert torch.equal(plain[0], got[0])
    assert float(plain[1].abs().max()) > 0
    assert torch.allclose(plain[1], got[1], rtol=1e-10, atol=1e-12)
    assert not any(is_wrapped(u) for u in units)
