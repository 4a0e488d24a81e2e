"""make vram's Wan decoders (diffusers' ``AutoencoderKLWan``, Wan 2.1 and Wan 2.2 configurations, at
a tiny width): checkpointed through ``training.checkpointing.diffusers_decoder_units`` (Wan 2.2's
residual up blocks units, their resnets and upsampler nested units, their first-chunk flag passed
through) they give the decode's values and gradients unchanged (to float32 rounding: the blocks
given several frames are recomputed one frame at a time)."""
import pytest
import torch

from training.checkpointing import checkpoint_blocks, diffusers_decoder_units

pytestmark = pytest.mark.usefixtures("one_thread")


def _vae(wan22: bool):
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    if wan22:
        return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, is_residual=True,
                                in_channels=12, out_channels=12, patch_size=2,
                                scale_factor_spatial=16, latents_mean=[0.0] * 48,
                                latents_std=[1.0] * 48).eval()
    return AutoencoderKLWan(base_dim=8, z_dim=16).eval()


@pytest.mark.parametrize("wan22", [False, True])
def test_diffusers_wan_decoder_blocks_checkpointed_give_the_same_gradient(wan22):
    vae = _vae(wan22)
    vae.requires_grad_(False)
    units = diffusers_decoder_units(vae.decoder)
    if wan22:  # the residual up blocks with a shortcut are units, their resnets and upsampler
        # nested units; the last (no shortcut) is none, its resnets units (as ComfyUI's: comfy_glue)
        ups = list(vae.decoder.up_blocks)
        assert [u in units for u in ups] == [True, True, True, False]
        assert all(m in units for u in ups for m in [*u.resnets, u.upsampler] if m is not None)
    latent = torch.randn(1, 48 if wan22 else 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))

    def value_and_grad():
        z = latent.clone().requires_grad_(True)
        out = vae.decode(z, return_dict=False)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), z.grad
    plain = value_and_grad()
    with checkpoint_blocks(units) as wrapped:
        assert wrapped == len(units)
        checkpointed = value_and_grad()
    assert plain[0].shape[2] == 9  # 1 + 4 (3 - 1) frames
    assert torch.allclose(plain[0], checkpointed[0], atol=1e-6)
    scale = float(plain[1].abs().max())
    assert scale > 0
    # the blocks given 4 frames are recomputed one frame at a time, whose float32 sums round
    # otherwise (exact in float64: tests/test_block_checkpoint.py)
    assert torch.allclose(plain[1], checkpointed[1], atol=1e-6 * scale, rtol=1e-5)
