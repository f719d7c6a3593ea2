"""Reward models behind one protocol (`dancegrpo.rewards.protocol`): `reward(images, prompts)`
returns (B,) scores, or scores plus per-sample metadata.

Images are pixel tensors in [0, 1] on the generator's device, never files. Rewards are
built by name from a registry or from `package.module:callable`, and a user can pass
their own callables to the trainer directly.
"""
from __future__ import annotations

import importlib
from typing import Callable

from .protocol import (TAG, RewardEntry, RewardFn, RewardOutput, RewardScores, RewardSet, as_reward_output,
                       concat_outputs, metadata_metrics, unpack_reward_output)

__all__ = ["REWARD_REGISTRY", "TAG", "RewardEntry", "RewardFn", "RewardOutput", "RewardScores", "RewardSet",
           "as_reward_output", "build_reward", "concat_outputs", "metadata_metrics", "unpack_reward_output"]


def _toy_geneval(**options):
    from ..toy.checker import ToyGenEvalReward
    return ToyGenEvalReward(**options)


def _hps(**options):
    from .clip_rewards import hps_v21
    return hps_v21(**options)


def _clip_score(**options):
    from .clip_rewards import clip_score
    return clip_score(**options)


def _pickscore(**options):
    from .clip_rewards import pickscore
    return pickscore(**options)


def _videoalign(dimension: str):
    def factory(**options):
        from .videoalign import videoalign
        return videoalign(dimension=dimension, **options)
    return factory


def _binary(base: str):
    """Factory for `<base>_binary`: option `threshold` (default: the paper's), the rest to `base`."""
    def factory(threshold: float | None = None, **options):
        from .binary import PAPER_THRESHOLDS, BinaryReward
        return BinaryReward(REWARD_REGISTRY[base](**options),
                            PAPER_THRESHOLDS[base] if threshold is None else threshold)
    return factory


#: name -> factory(**options). Options come from the config entry's `options:` mapping;
#: each factory's docstring (dancegrpo.rewards.clip_rewards, ...) lists them.
REWARD_REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "toy_geneval": _toy_geneval,
    "hps": _hps,                      # HPS v2.1: checkpoint, tokenizer[, model_config, dtype, batch_size]
    "clip_score": _clip_score,        # open_clip ViT-H-14 laion2B: path[, model_config, dtype, batch_size]
    "pickscore": _pickscore,          # path, processor_path[, scale, dtype, batch_size]
    "hps_binary": _binary("hps"),     # threshold (default 0.28) + the hps options
    "clip_score_binary": _binary("clip_score"),  # threshold (default 0.39) + the clip_score options
    # VideoAlign: path, video_fps, prompt_template[, base_model, fps | num_frames, max_pixels, use_norm, dtype, ...];
    # the four names share one loaded model and one forward pass per batch.
    "videoalign": _videoalign("Overall"),
    "videoalign_vq": _videoalign("VQ"),
    "videoalign_mq": _videoalign("MQ"),
    "videoalign_ta": _videoalign("TA"),
}


def build_reward(name: str, options: dict | None = None) -> RewardFn:
    options = options or {}
    if ":" in name:
        module_name, attr = name.split(":", 1)
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward {name!r}: cannot import {attr!r} from {module_name!r} ({err})") from err
        return target(**options) if isinstance(target, type) else _bind(target, options)
    if name not in REWARD_REGISTRY:
        raise ValueError(f"unknown reward {name!r}: choose one of {sorted(REWARD_REGISTRY)} "
                         "or give 'package.module:callable'")
    return REWARD_REGISTRY[name](**options)


def _bind(fn, options):
    if not options:
        return fn
    return lambda images, prompts: fn(images, prompts, **options)
