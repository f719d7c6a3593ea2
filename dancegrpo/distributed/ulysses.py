"""Ulysses sequence parallelism: all-to-all between sequence-sharded and head-sharded layouts.

Each rank of a sequence-parallel (SP) group holds N/sp tokens with all H heads; attention needs
all N tokens, so an all-to-all trades the sequence shard for a head shard, (B, N/sp, H, D) ->
(B, N, H/sp, D), attention runs on H/sp heads, and the inverse all-to-all restores the layout.

Gradient convention (what makes the backward passes below right): every rank of the group
computes the same loss from the gathered output, and after backward each rank holds a *share*
of every gradient; the shares summed over the group (an all-reduce, as data parallelism does
anyway) are the single-process gradients. Tokens a rank owns get their whole gradient there;
replicated values (text tokens, timestep embedding) get one share per rank.

Nothing here reads a tensor's value on the host: splits are equal and known from shapes, so
the collectives are queued without a device synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return dist.get_rank(group)


def check_heads_divisible(num_heads: int, sp_size: int) -> None:
    """Ulysses gives each rank num_heads / sp_size heads: refuse sizes that do not divide."""
    if num_heads % sp_size:
        raise ValueError(f"sequence-parallel size {sp_size} does not divide the attention head count {num_heads}: "
                         f"choose an sp_size among the divisors of {num_heads}")


def _check_divisible(x: torch.Tensor, dim: int, parts: int, what: str) -> None:
    if x.shape[dim] % parts:
        raise ValueError(f"{what}: dimension {dim} of shape {tuple(x.shape)} has {x.shape[dim]} entries, "
                         f"not divisible by the sequence-parallel size {parts}")


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """Chunk j of `x` along scatter_dim goes to rank j; received chunks are joined along gather_dim."""
    parts = group_size(group)
    send = torch.stack(x.chunk(parts, scatter_dim), 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        # The inverse all-to-all: the tokens a rank holds are its own, so their gradients go straight back.
        return _all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """Differentiable all-to-all over `group`; the backward is the inverse all-to-all."""
    if group_size(group) == 1:
        return x
    _check_divisible(x, scatter_dim, group_size(group), "all_to_all scatter dimension")
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


# Adapted from DanceGRPO fastvideo/utils/communications.py::all_to_all_4D (Apache-2.0)
def sequence_to_heads(x: torch.Tensor, group: ProcessGroup | None, seq_dim: int = 1,
                      head_dim: int = 2) -> torch.Tensor:
    """(B, N/sp, H, D) on each rank -> (B, N, H/sp, D): all tokens, this rank's heads."""
    return all_to_all(x, head_dim, seq_dim, group)


def heads_to_sequence(x: torch.Tensor, group: ProcessGroup | None, seq_dim: int = 1,
                      head_dim: int = 2) -> torch.Tensor:
    """(B, N, H/sp, D) -> (B, N/sp, H, D): the inverse of `sequence_to_heads`."""
    return all_to_all(x, seq_dim, head_dim, group)


def _all_gather(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


class _GatherShares(torch.autograd.Function):
    """All-gather whose consumers are replicated: their gradient shares are summed (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, dim: int, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        # Reduce-scatter as all-to-all + local sum: gloo and NCCL both have all_to_all_single.
        send = torch.stack(grad.chunk(group_size(ctx.group), ctx.dim), 0).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=ctx.group)
        return recv.sum(0), None, None


class _GatherReplicatedLoss(_GatherShares):
    """All-gather of the model output: every rank computes the same loss, so each keeps its own slice
    (same forward as _GatherShares; only the gradient rule differs)."""

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(group_size(ctx.group), ctx.dim)[group_rank(ctx.group)].contiguous(), None, None


def gather_heads(x: torch.Tensor, group: ProcessGroup | None, head_dim: int = 2) -> torch.Tensor:
    """This rank's head shard -> all heads, for values that are then processed on every rank (text tokens)."""
    if group_size(group) == 1:
        return x
    return _GatherShares.apply(x, head_dim, group)


def shard_sequence(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous 1/sp of `x` along `dim` (a view; its gradient is zero elsewhere)."""
    parts = group_size(group)
    if parts == 1:
        return x
    _check_divisible(x, dim, parts, "shard_sequence (the video token count must be a multiple of sp_size)")
    return x.chunk(parts, dim)[group_rank(group)]


def gather_sequence(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """The inverse of `shard_sequence` for the model output (every rank then computes the same loss)."""
    if group_size(group) == 1:
        return x
    return _GatherReplicatedLoss.apply(x, dim, group)


@dataclass
class TokenPadding:
    """Video tokens of the current call: the real count and the padding up to a multiple of sp."""

    video_len: int = 0
    pad: int = 0

    def plan(self, video_len: int, sp: int) -> int:
        self.video_len, self.pad = video_len, (-video_len) % sp
        return self.pad


def pad_rows(x: torch.Tensor, dim: int, pad: int, value: float = 0.0) -> torch.Tensor:
    """`x` with `pad` entries of `value` appended along `dim` (x itself when pad is 0)."""
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_full(shape, value)], dim)


@dataclass
class UlyssesHandle:
    """What an `install_ulysses` changed; `remove()` restores the single-process transformer."""

    transformer: nn.Module
    previous_processors: dict = field(default_factory=dict)
    hooks: list = field(default_factory=list)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.transformer.set_attn_processor(self.previous_processors)
        self.hooks.clear()
        self.transformer._ulysses_installed = False
