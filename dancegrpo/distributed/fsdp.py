"""Wrapping the trainable denoiser for scale-out: checkpointing, then compile, then FSDP2 sharding.

The order matters: activation checkpointing is innermost so recomputation happens inside the
block the compiler sees and inside FSDP's per-block all-gather; sharding comes last so each
block is one all-gather / reduce-scatter unit.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from . import blocks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def apply_block_wrappers(model: nn.Module, activation_checkpointing: str = "none", every_n_blocks: int = 1,
                         compile_blocks: bool = False) -> None:
    """Activation checkpointing, then torch.compile, per transformer block (in place)."""
    if activation_checkpointing != "none":
        blocks.apply_activation_checkpointing(model, activation_checkpointing, every_n_blocks)
    if compile_blocks:
        blocks.compile_blocks(model)


def fsdp_mesh(device_type: str, world_size: int, shard_size: int | None = None) -> DeviceMesh:
    """The mesh FSDP2 shards over: 1D over every process, or 2D ("replicate", "shard") for HSDP.

    Ranks of one shard group are consecutive, so with shard_size = GPUs per node the per-block
    all-gathers and reduce-scatters stay inside a node; only the gradient all-reduce between
    replicas crosses the network.
    """
    if shard_size is None or shard_size == world_size:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    if shard_size < 1 or world_size % shard_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(f"parallel.fsdp.shard_size = {shard_size} does not divide the world size {world_size}: "
                         f"choose one of {divisors} (or null to shard over every process)")
    return init_device_mesh(device_type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


# Adapted from torchtitan torchtitan/models/flux/parallelize.py::apply_fsdp (BSD-3-Clause)
def shard_model(model: nn.Module, mesh: DeviceMesh, param_dtype: str = "fp32", reduce_dtype: str = "fp32",
                cpu_offload: bool = False) -> nn.Module:
    """FSDP2: `fully_shard` each transformer block, then the root (in place; returns `model`).

    A 2D `mesh` (from `fsdp_mesh` with a shard_size) gives HSDP: sharded along its second
    dimension, replicated along its first.

    param_dtype is the dtype blocks compute in after the all-gather, reduce_dtype that of the
    gradient reduce-scatter; the sharded master weights stay in their own dtype (fp32).
    "fp32" gathers every parameter in the dtype it is stored in: fp32 weights in fp32, and a
    frozen base kept in bf16 under LoRA (`frozen_dtype: bfloat16`) in bf16, as one process
    computes it, instead of upcast to fp32 (twice the all-gather traffic and memory).
    """
    for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if value not in DTYPES:
            raise ValueError(f"parallel.fsdp.{name} = {value!r}: must be one of {', '.join(DTYPES)}")
    units = blocks.transformer_blocks(model)
    if not units:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to shard one by one "
                         "(its ModelSpec.denoiser_blocks gives an empty list)")
    gathered = None if param_dtype == "fp32" else DTYPES[param_dtype]  # None: each parameter's own dtype
    options = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=gathered,
                                                             reduce_dtype=DTYPES[reduce_dtype]))
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for block in units:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def trainable_after_sharding(trainable: nn.Module) -> None:
    """Make `trainable` hold the sharded parameters after `shard_model` ran on the denoiser.

    The trainable module is the sharded denoiser itself (full fine-tune) or holds some of its
    parameters (LoRA's `LoraParameters`, which `rebind()`s to the new ones): `fully_shard`
    replaced every parameter by a DTensor Parameter, and the optimizer, EMA and checkpoints must
    see those. Raises RuntimeError naming a parameter that is still a plain tensor (it would
    be trained on this rank alone, never gathered nor reduced).
    """
    from torch.distributed.tensor import DTensor
    rebind = getattr(trainable, "rebind", None)
    if callable(rebind):
        rebind()
    plain = [name for name, param in trainable.named_parameters() if not isinstance(param, DTensor)]
    if plain:
        raise RuntimeError(f"{type(trainable).__name__}: {len(plain)} trainable parameter(s) are not sharded by FSDP "
                           f"(first: {plain[0]}); the trainable module must be the sharded denoiser or hold its "
                           f"parameters (with a rebind() method to pick up the sharded ones)")
