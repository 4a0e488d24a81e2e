"""The differentiable preprocessing matches each reward model's published (PIL) eval transform."""
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from reward_models import preprocess as P
from reward_models.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from reward_fixtures import natural_image, to_tensor

# (H, W): square SD sizes, portrait/landscape, odd sizes, a crop offset of 1.5 px (round != floor),
# and upsampling from below 224.
SHAPES = [(512, 512), (512, 768), (768, 512), (224, 227), (333, 517), (96, 150), (1000, 601)]
TOLERANCE = 1e-2  # mean |ours - reference| in normalised units; uint8 rounding alone gives ~4e-3


def _cases():
    for i, (h, w) in enumerate(SHAPES):
        array = natural_image(h, w, seed=i)
        yield (h, w), Image.fromarray(array), to_tensor(array)


def _mad(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().mean().item()


def test_open_clip_eval_transform():
    import open_clip

    reference = open_clip.image_transform(224, is_train=False)  # Resize(224, bicubic) + CenterCrop
    for shape, pil, tensor in _cases():
        assert _mad(P.shortest_side_crop(tensor)[0], reference(pil)) < TOLERANCE, shape


def test_hpsv2_eval_transform():
    """HPSv2's ResizeMaxSize: long side to round(dim * 224 / max), pad black (fill 0) before
    Normalize; also open_clip's own 'longest' eval mode, which does the same."""
    import open_clip

    to_normalised = T.Compose([T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    open_clip_longest = open_clip.image_transform(224, is_train=False, resize_mode="longest")
    for shape, pil, tensor in _cases():
        w, h = pil.size
        scale = 224 / float(max(h, w))
        nh, nw = round(h * scale), round(w * scale)
        pad_h, pad_w = 224 - nh, 224 - nw
        resized = TF.resize(pil, [nh, nw], T.InterpolationMode.BICUBIC)
        padded = TF.pad(resized, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        ours = P.longest_side_pad(tensor)[0]
        assert _mad(ours, to_normalised(padded)) < TOLERANCE, shape
        assert _mad(ours, open_clip_longest(pil)) < TOLERANCE, shape


def test_pickscore_processor_transform():
    """The CLIP-ViT-H-14-laion2B-s32B-b79K processor settings PickScore uses (PIL backend, as the
    authors ran it, and transformers' torchvision backend)."""
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    settings = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                    do_center_crop=True, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    pil_processor, tv_processor = CLIPImageProcessorPil(**settings), CLIPImageProcessor(**settings)
    for shape, pil, tensor in _cases():
        ours = P.HF_CLIP_PROCESSOR(tensor)[0]
        ref_pil = torch.as_tensor(pil_processor(pil, return_tensors="np")["pixel_values"][0])
        ref_tv = tv_processor(pil, return_tensors="pt")["pixel_values"][0]
        assert _mad(ours, ref_pil) < TOLERANCE, shape
        assert _mad(ours, ref_tv) < TOLERANCE, shape


def test_crop_offset_convention_is_the_one_each_reference_uses():
    """At a 1.5 px offset torchvision rounds (to 2) and the HF processor floors (to 1)."""
    import open_clip
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    array = natural_image(224, 227, seed=3)
    pil, tensor = Image.fromarray(array), to_tensor(array)
    ref_open_clip = open_clip.image_transform(224, is_train=False)(pil)
    ref_hf = torch.as_tensor(CLIPImageProcessorPil()(pil, return_tensors="np")["pixel_values"][0])
    rounded, floored = P.shortest_side_crop(tensor, offset="round")[0], P.shortest_side_crop(tensor, offset="floor")[0]
    assert _mad(rounded, ref_open_clip) < 1e-3 < _mad(floored, ref_open_clip)
    assert _mad(floored, ref_hf) < 1e-3 < _mad(rounded, ref_hf)


@pytest.mark.parametrize("transform", [P.OPEN_CLIP_EVAL, P.HPSV2_EVAL, P.HF_CLIP_PROCESSOR])
def test_preprocessing_is_differentiable_and_unquantised(transform):
    images = to_tensor(natural_image(80, 120)).repeat(2, 1, 1, 1).requires_grad_(True)
    out = transform(images)
    assert out.shape == (2, 3, 224, 224)
    (out * torch.randn_like(out)).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # a change far below one uint8 step moves the output: no rounding on the way
    nudged = transform(images.detach() + 1e-4)
    assert 0 < (nudged - out.detach()).abs().max() < 1e-2


def test_resize_gradcheck():
    images = torch.rand(1, 3, 9, 13, dtype=torch.float64) * 0.5 + 0.25  # away from the clamp
    assert torch.autograd.gradcheck(lambda x: P.resize(x, (6, 8)), (images.requires_grad_(True),))


def test_resize_clamps_overshoot_like_pil_uint8():
    edges = torch.zeros(1, 3, 40, 40)
    edges[..., 10:30, 10:30] = 1.0
    for size in ((17, 17), (90, 90)):
        out = P.resize(edges, size)
        assert out.min() >= 0.0 and out.max() <= 1.0
        raw = torch.nn.functional.interpolate(edges, size=size, mode="bicubic", antialias=True, align_corners=False)
        assert raw.min() < 0.0 or raw.max() > 1.0  # bicubic does overshoot here


def test_output_sizes_follow_the_references():
    assert P.shortest_side_size(512, 768, 224) == (224, 336)
    assert P.shortest_side_size(1000, 601, 224) == (int(224 * 1000 / 601), 224)  # truncated
    assert P.longest_side_size(333, 517, 224) == (round(333 * (224 / 517)), 224)
    assert P.pad_to_square(torch.zeros(1, 3, 150, 224), 224).shape[-2:] == (224, 224)
