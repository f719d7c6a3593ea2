"""Thresholded (binary) form of any reward: 1 above the threshold, else 0, NaN kept.

The same rule as a config entry's `threshold:` (RewardEntry.threshold, applied by RewardSet);
this wrapper exists so the paper's binary rewards have names of their own (`hps_binary`,
`clip_score_binary`) with the paper's thresholds as defaults.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..grpo import binary_reward
from .protocol import RewardOutput, unpack_reward_output

#: Thresholds the DanceGRPO paper uses for its binary-reward experiments.
PAPER_THRESHOLDS = {"hps": 0.28, "clip_score": 0.39}


class BinaryReward:
    """Wraps `reward`; scores are `binary_reward(reward(images, prompts), threshold)`, its
    metadata (when it returns a RewardOutput) passed on unchanged."""

    def __init__(self, reward, threshold: float):
        self.reward = reward
        self.threshold = float(threshold)

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor | RewardOutput:
        scores, metadata = unpack_reward_output(self.reward(images, prompts))
        binary = binary_reward(torch.as_tensor(scores), self.threshold)
        return RewardOutput(binary, metadata) if metadata else binary
