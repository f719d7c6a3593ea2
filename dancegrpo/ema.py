"""Exponential moving average of the trained weights, kept in fp32.

    w_ema <- decay * w_ema + (1 - decay) * w      after every optimizer update

Evaluation and the final export use the EMA weights (swapped in and back out); the checkpoint
holds them as `ema.safetensors` (see dancegrpo.checkpoint). Under FSDP the shadow tensors are
sharded like the parameters they follow.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Callable

import torch
from torch import nn


class EMA(Mapping):
    """fp32 shadow copies of `module`'s named parameters; a read-only mapping name -> tensor.

    The tensors themselves are updated in place (checkpoint loading copies into them).
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay = {decay!r} must be in (0, 1) (trainer.ema_decay; null for no EMA)")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.shadow[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shadow)

    def __len__(self) -> int:
        return len(self.shadow)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step toward `module`'s current parameters (call after each optimizer step)."""
        for name, p in module.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def reset_to(self, module: nn.Module) -> None:
        """Set the average to `module`'s current parameters (e.g. a checkpoint without EMA weights)."""
        for name, p in module.named_parameters():
            self.shadow[name].copy_(p.detach().float())

    @contextlib.contextmanager
    def swapped_in(self, module: nn.Module, reshard: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Run the block with the EMA weights in `module`, then put the live weights back.

        `reshard` returns FSDP parameters to their sharded form first (after a forward the root's
        stay gathered), so named_parameters() gives the sharded DTensors the shadow matches.
        """
        reshard()
        live = {n: p.detach().clone() for n, p in module.named_parameters()}
        with torch.no_grad():  # (not p.data: under FSDP both sides are sharded DTensors)
            for n, p in module.named_parameters():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            reshard()
            with torch.no_grad():
                for n, p in module.named_parameters():
                    p.copy_(live[n])
