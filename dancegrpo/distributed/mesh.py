"""Process group and DeviceMesh setup: a data-parallel dimension and a sequence-parallel one.

Ranks of one sequence-parallel (SP) group are consecutive (the inner mesh dimension), so under
torchrun an SP group stays inside a node where its all-to-alls run over NVLink; the
data-parallel (DP) dimension crosses nodes. Works the same under torchrun (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK in the environment) and in tests that spawn gloo processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp", "sp")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ParallelLayout:
    """How `world_size` processes split into `dp_size` data-parallel replicas of `sp_size` ranks."""

    world_size: int
    sp_size: int

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size


def plan_layout(world_size: int, sp_size: int) -> ParallelLayout:
    """Validate the sizes; `sp_size` must be a positive divisor of `world_size`."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size {world_size!r} must be a positive integer")
    if not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sp_size = {sp_size!r} must be a positive integer (1 turns sequence parallelism off)")
    if world_size % sp_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(f"sp_size = {sp_size} does not divide the world size {world_size}: choose one of {divisors}")
    return ParallelLayout(world_size, sp_size)


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(backend: str | None = None) -> None:
    """Join the default process group from torchrun's environment (no-op if already joined).

    backend: None picks nccl with CUDA, else gloo. On CUDA each process takes the GPU LOCAL_RANK.
    """
    if dist.is_initialized():
        return
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise RuntimeError(f"environment variables {missing} are not set: launch with torchrun "
                           f"(e.g. `torchrun --nproc_per_node 8 -m dancegrpo.cli ...`) or set them yourself")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))


def build_mesh(sp_size: int, device_type: str | None = None) -> DeviceMesh:
    """A 2D DeviceMesh ("dp", "sp") over the default process group; call `init_distributed` first.

    mesh["sp"].get_group() is this rank's sequence-parallel group, mesh["dp"] its data-parallel one.
    """
    if not dist.is_initialized():
        raise RuntimeError("the default process group is not initialised: call init_distributed() first "
                           "(or dist.init_process_group in tests)")
    layout = plan_layout(dist.get_world_size(), sp_size)
    return init_device_mesh(device_type or default_device_type(), (layout.dp_size, layout.sp_size),
                            mesh_dim_names=MESH_DIMS)
