"""Reward models behind one protocol: `reward(images, prompts) -> Tensor (B,)`.

Images are pixel tensors in [0, 1] on the generator's device, never files. Rewards are
built by name from a registry or from `package.module:callable`, and a user can pass
their own callables to the trainer directly.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..grpo import binary_reward

log = logging.getLogger(__name__)

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


def _toy_geneval(**options):
    from ..toy.scenes import ToyGenEvalReward
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


@dataclass
class RewardEntry:
    name: str
    fn: RewardFn
    weight: float = 1.0
    threshold: float | None = None


@dataclass
class RewardScores:
    values: dict[str, torch.Tensor]  # per reward, (N,), after thresholding; NaN where invalid
    valid: torch.Tensor              # (N,) bool: every reward finite for this sample
    faults: dict[str, int] = field(default_factory=dict)  # per reward: samples dropped


class RewardSet:
    """Scores a batch with every reward; faults are counted, never papered over."""

    def __init__(self, entries: list[RewardEntry]):
        if not entries:
            raise ValueError("at least one reward is needed")
        self.entries = entries

    @property
    def weights(self) -> dict[str, float]:
        return {e.name: e.weight for e in self.entries}

    def score(self, images: torch.Tensor, prompts: list[str]) -> RewardScores:
        n = images.shape[0]
        values, faults = {}, {}
        valid = torch.ones(n, dtype=torch.bool, device=images.device)
        for entry in self.entries:
            try:
                raw = torch.as_tensor(entry.fn(images, prompts), device=images.device).float().reshape(-1)
                if raw.shape[0] != n:
                    raise ValueError(f"returned {raw.shape[0]} scores for {n} samples")
            except Exception as err:  # a broken scorer drops the batch, loudly, instead of killing a long run
                log.error("reward %r failed on a batch of %d: %s", entry.name, n, err)
                raw = torch.full((n,), float("nan"), device=images.device)
            bad = ~torch.isfinite(raw)
            if bad.any():
                log.warning("reward %r: %d of %d samples non-finite; they leave this update",
                            entry.name, int(bad.sum()), n)
            faults[entry.name] = int(bad.sum())
            valid &= ~bad
            values[entry.name] = binary_reward(raw, entry.threshold) if entry.threshold is not None else raw
        return RewardScores(values=values, valid=valid, faults=faults)

    def accuracy(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-sample correctness from rewards that define one (rule-based checkers)."""
        return {e.name: e.fn.accuracy(images, prompts) for e in self.entries if hasattr(e.fn, "accuracy")}
