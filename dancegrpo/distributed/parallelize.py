"""Apply a run's parallelism to the denoiser, always in one order (torchtitan's `parallelize_*`):

1. sequence parallelism (Ulysses; sliding-tile attention, if installed, keeps running inside),
2. activation checkpointing and torch.compile per block,
3. FSDP2 sharding (or HSDP groups) over every process.

The wrappers go on the denoiser the adapter runs (`adapter.denoiser`, else the trainable
module), unwrapped from peft: for a full fine-tune that is the trainable module itself; under
LoRA it is the base model with its LoRA layers inside the blocks, while the trainer keeps
training, checkpointing and averaging `adapter.trainable` (the LoRA weights alone).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ParallelConfig
from .blocks import unwrap_denoiser


@dataclass
class Parallelized:
    """What `parallelize_denoiser` installed: the FSDP2 root (None when not sharded) and the
    Ulysses handle (None without sequence parallelism)."""

    sharded_module: nn.Module | None = None
    ulysses: object | None = None

    @property
    def sharded(self) -> bool:
        return self.sharded_module is not None

    def reshard(self) -> None:
        """Under FSDP, return every parameter to its sharded form (after a forward the root's
        parameters stay gathered), so named_parameters() gives the sharded DTensors again."""
        if self.sharded_module is not None:
            for module in self.sharded_module.modules():
                if hasattr(module, "reshard"):
                    module.reshard()


def parallelize_denoiser(adapter, trainable: nn.Module, par: ParallelConfig, mesh, device: torch.device) -> Parallelized:
    """Install sequence parallelism, then block checkpointing/compile, then FSDP2 (each only if configured).

    `mesh`: the run's DeviceMesh (dims "dp", "sp"), None in a single process. Raises what the
    installers raise (heads not divisible by sp_size, ...).
    """
    denoiser = getattr(adapter, "denoiser", None)
    denoiser = unwrap_denoiser(trainable if denoiser is None else denoiser)
    result = Parallelized()
    if par.sp_size > 1:
        result.ulysses = _install_sequence_parallel(adapter, denoiser, mesh["sp"].get_group())
    if par.activation_checkpointing != "none" or par.compile_blocks:
        from .fsdp import apply_block_wrappers
        apply_block_wrappers(denoiser, par.activation_checkpointing, par.checkpoint_every_n_blocks, par.compile_blocks)
    if not par.fsdp.enabled:
        return result
    from .fsdp import fsdp_mesh, shard_model, trainable_after_sharding
    # Over every process (or HSDP groups of them): sequence-parallel ranks hold partial
    # gradients of the same replica, so FSDP reduces over all of them.
    fmesh = fsdp_mesh(device.type, dist.get_world_size(), par.fsdp.shard_size)
    result.sharded_module = shard_model(denoiser, fmesh, par.fsdp.param_dtype, par.fsdp.reduce_dtype,
                                        par.fsdp.cpu_offload)
    trainable_after_sharding(trainable)
    return result


def _hunyuan_ulysses(denoiser: nn.Module, group, sta):
    if sta is None:
        from .hunyuan_ulysses import install_ulysses
        return install_ulysses(denoiser, group)
    from .ulysses_sta import install_ulysses_around_sta
    return install_ulysses_around_sta(denoiser, group, sta)


def _wan_ulysses(denoiser: nn.Module, group, sta):
    if sta is not None:
        raise ValueError("sliding-tile attention inside Ulysses exists for HunyuanVideo's transformer only: "
                         "turn model.options.sta off or use sp_size 1 for this Wan model")
    from .wan_ulysses import install_ulysses
    return install_ulysses(denoiser, group)


#: The Ulysses installer of each denoiser class: installer(denoiser, group, sta controller or None) -> handle.
SEQUENCE_PARALLEL_INSTALLERS = {
    "HunyuanVideoTransformer3DModel": _hunyuan_ulysses,
    "HunyuanSkyreelsImageToVideoTransformer3DModel": _hunyuan_ulysses,
    "WanTransformer3DModel": _wan_ulysses,
}


def _install_sequence_parallel(adapter, denoiser: nn.Module, group):
    """Ulysses on the denoiser, by its class (`SEQUENCE_PARALLEL_INSTALLERS`, looked up through the
    class's bases); sliding-tile attention, if the adapter has it, keeps running inside (HunyuanVideo:
    per-head windows cut to this rank's heads; its controller keeps the trainer's step schedule)."""
    for cls in type(denoiser).__mro__:
        installer = SEQUENCE_PARALLEL_INSTALLERS.get(cls.__name__)
        if installer is not None:
            return installer(denoiser, group, getattr(adapter, "sta", None))
    raise ValueError(f"parallel.sp_size > 1: no Ulysses sequence parallelism for {type(denoiser).__name__} "
                     f"(known: {', '.join(SEQUENCE_PARALLEL_INSTALLERS)}); use sp_size 1")
