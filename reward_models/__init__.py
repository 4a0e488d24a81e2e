"""Differentiable rewards for DRaFT, independent of ComfyUI.

Every reward is a ``RewardModel``: ``reward(images, prompts) -> (B,) float32`` with images
(B, 3, H, W) in [0, 1], higher is better, differentiable w.r.t. the images. Loaders take local
file paths and never download; ``files.download`` is the explicit, opt-in exception.

=============  ==============================  ==============================================
reward         loader                          score
=============  ==============================  ==============================================
aesthetic      ``load_aesthetic``              LAION v2 head on CLIP ViT-L/14, about 1..10
hpsv2          ``load_hpsv2``                  cosine, about 0.25..0.30
pickscore      ``load_pickscore``              logit_scale * cosine, about 20..23
clip_score     ``load_clip_score``             cosine in [-1, 1]
brightness...  ``ImageStatReward(statistic)``  image statistics, see ``image_stats``
combined       ``CombinedReward``              weighted sum, optional running standardisation
temporal       ``TemporalConsistencyReward``   videos only: consecutive frames' similarity,
                                               CLIP cosine in [-1, 1] or pixels in [0, 1]
=============  ==============================  ==============================================
"""
from .aesthetic import AestheticHead, AestheticReward, OutputSelectingEncoder, load_aesthetic, load_aesthetic_head
from .base import RewardModel, module_device_dtype
from .clip_score import ClipScoreReward, ClipSimilarityReward, load_clip_score
from .combine import CombinedReward
from .files import (AESTHETIC_HEAD, CLIP_VIT_H14_LAION, CLIP_VIT_L14_OPENAI, HPSV2, PICKSCORE, PUBLISHED,
                    MissingWeightsFileError, PublishedWeights, RewardModelFileError, UnsafeWeightsFileError,
                    WrongArchitectureError, download, download_hint, find_weights, load_weights)
from .hpsv2 import HPSv2Reward, load_hpsv2
from .image_stats import STATISTICS, ImageStatReward
from .pickscore import OpenClipPickScoreReward, PickScoreReward, load_pickscore
from .preprocess import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform, longest_side_pad,
                         shortest_side_crop)
from .temporal import TemporalConsistencyReward

__all__ = [
    "RewardModel", "module_device_dtype",
    "AestheticHead", "AestheticReward", "OutputSelectingEncoder", "load_aesthetic", "load_aesthetic_head",
    "HPSv2Reward", "load_hpsv2",
    "PickScoreReward", "OpenClipPickScoreReward", "load_pickscore",
    "ClipSimilarityReward", "ClipScoreReward", "load_clip_score",
    "ImageStatReward", "STATISTICS",
    "CombinedReward", "TemporalConsistencyReward",
    "ImageTransform", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "shortest_side_crop", "longest_side_pad",
    "RewardModelFileError", "MissingWeightsFileError", "UnsafeWeightsFileError", "WrongArchitectureError",
    "PublishedWeights", "AESTHETIC_HEAD", "CLIP_VIT_L14_OPENAI", "CLIP_VIT_H14_LAION", "HPSV2", "PICKSCORE",
    "PUBLISHED", "download", "download_hint", "find_weights", "load_weights",
]
