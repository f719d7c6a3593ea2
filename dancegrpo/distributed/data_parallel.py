"""Data-parallel GRPO: which prompts and samples a rank owns, and the collectives that join ranks.

An iteration's prompts are one global draw (a pure function of (seed, iteration)), so a recipe
means the same on any number of processes and a resume needs no state. Two placements:

- "rank": rank r takes the r-th contiguous slice of the prompts, each with its whole group;
  advantages are computed locally and equal the single-process ones group by group.
- "spread": every rank takes every prompt and a 1/dp slice of each group's samples (all
  starting from the group's shared noise); rewards are all-gathered before advantages.

Sample order on a rank is group-major, as in the single-process trainer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

PLACEMENTS = ("rank", "spread")


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the data-parallel ranks (`size` 1: a single process).

    `group` is the data-parallel process group (None: the default group); `world` the
    number of processes in all (dp x sp).
    """

    rank: int = 0
    size: int = 1
    placement: str = "rank"
    group: ProcessGroup | None = None
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def check_sizes(self, prompts_per_iteration: int, group_size: int) -> None:
        """Refuse prompt and group counts that the ranks cannot share evenly (naming the fix)."""
        if self.placement not in PLACEMENTS:
            raise ValueError(f"parallel.group_placement = {self.placement!r}: must be one of {', '.join(PLACEMENTS)}")
        if self.placement == "rank" and prompts_per_iteration % self.size:
            raise ValueError(f"grpo.prompts_per_iteration = {prompts_per_iteration} is not divisible by the "
                             f"{self.size} data-parallel ranks (group_placement 'rank' gives each rank whole "
                             f"groups): use a multiple of {self.size}, or group_placement 'spread'")
        if self.placement == "spread" and group_size % self.size:
            raise ValueError(f"grpo.group_size = {group_size} is not divisible by the {self.size} data-parallel "
                             f"ranks (group_placement 'spread' splits each group over them): use a multiple of "
                             f"{self.size}, or group_placement 'rank'")

    def local_prompts(self, prompts: list[str]) -> list[str]:
        """This rank's prompts out of the iteration's global draw."""
        if self.placement == "spread":
            return list(prompts)
        per_rank = len(prompts) // self.size
        return prompts[self.rank * per_rank:(self.rank + 1) * per_rank]

    def local_group_size(self, group_size: int) -> int:
        return group_size // self.size if self.placement == "spread" else group_size

    def local_rows(self, num_prompts: int, group_size: int, device=None) -> torch.Tensor:
        """Indices, in the global group-major sample order, of this rank's samples."""
        if self.placement == "spread":
            local = group_size // self.size
            within = torch.arange(self.rank * local, (self.rank + 1) * local, device=device)
            return (torch.arange(num_prompts, device=device)[:, None] * group_size + within).reshape(-1)
        per_rank = num_prompts // self.size * group_size
        return torch.arange(self.rank * per_rank, (self.rank + 1) * per_rank, device=device)

    def gather_cat(self, local: torch.Tensor) -> torch.Tensor:
        """All ranks' rows (first dimension) concatenated in rank order; every rank the same count."""
        if self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts)

    def gather_rows(self, local: torch.Tensor, group_size: int) -> torch.Tensor:
        """All ranks' per-sample values (first dimension) in the global group-major order.

        Needs every rank to hold the same number of rows (the placements guarantee it).
        """
        if self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        if self.placement == "rank":
            return torch.cat(parts)
        per_group = group_size // self.size  # (rank, prompt, sample) -> (prompt, rank, sample)
        stacked = torch.stack([p.reshape(-1, per_group, *local.shape[1:]) for p in parts], dim=1)
        return stacked.reshape(-1, *local.shape[1:])


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """In-place sum over `group`; a no-op without an initialised process group."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def sum_gradients(params: list[torch.nn.Parameter], group: ProcessGroup | None = None) -> None:
    """Sum the gradients of replicated parameters over `group` in one flat all-reduce.

    A parameter without a gradient on this rank (no valid sample reached it) takes part as
    zeros, so every rank sends the same layout. Asynchronous on the device: no host sync.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, grad in enumerate(grads):
        by_dtype.setdefault(grad.dtype, []).append(i)
    for indices in by_dtype.values():
        flat = torch.cat([grads[i].reshape(-1) for i in indices])
        dist.all_reduce(flat, group=group)
        offset = 0
        for i in indices:
            n = grads[i].numel()
            params[i].grad = flat[offset:offset + n].view_as(params[i]).clone()
            offset += n


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank start from rank `src`'s weights (they should already agree; this makes sure)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src)


def agree_any(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a stop request seen by one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
