"""The one protocol every generator adapter implements.

The trainer never looks inside a model: it asks an adapter to encode prompts, to predict
for a batch of latents at given sampler positions, and to decode latents into pixels.
Conditioning is a dict of batch-first tensors so the trainer can index, repeat and
concatenate it without knowing what it holds.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

Conditioning = dict[str, torch.Tensor]


@runtime_checkable
class GeneratorAdapter(Protocol):
    #: "flow" (velocity prediction on a sigma schedule) or "ddim" (epsilon prediction).
    prediction: str
    #: The module whose parameters GRPO trains and checkpoints.
    trainable: nn.Module

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent, without the batch dimension."""

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Batch-first conditioning tensors for these prompts."""

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Model output (velocity or epsilon) for latents at positions t (shape (B,))."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1], (B, C, H, W) or (B, T, C, H, W)."""

    def save_pretrained(self, directory: str) -> None:
        """Write the model in its on-disk format, loadable by the adapter's loader."""


def index_cond(cond: Conditioning, index: torch.Tensor | slice) -> Conditioning:
    """Select rows of every conditioning tensor."""
    return {key: value[index] for key, value in cond.items()}


def repeat_cond(cond: Conditioning, repeats: int) -> Conditioning:
    """Repeat each row `repeats` times consecutively (prompt -> its group of samples)."""
    return {key: value.repeat_interleave(repeats, dim=0) for key, value in cond.items()}


class FrozenReference:
    """The frozen initial policy for the optional KL term, for fully fine-tuned adapters.

    Holds a copy of the trainable module taken at construction; `active()` swaps it into
    the adapter for the duration of a forward pass. (LoRA adapters get the same effect
    for free by disabling the adapter layers.)
    """

    def __init__(self, adapter: torch.nn.Module, attribute: str):
        import copy
        self.adapter, self.attribute = adapter, attribute
        self.module = copy.deepcopy(getattr(adapter, attribute)).requires_grad_(False).eval()

    def active(self):
        import contextlib

        @contextlib.contextmanager
        def swap():
            live = getattr(self.adapter, self.attribute)
            setattr(self.adapter, self.attribute, self.module)
            try:
                yield
            finally:
                setattr(self.adapter, self.attribute, live)
        return swap()
