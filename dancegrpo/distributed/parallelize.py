"""Apply a run's parallelism to the denoiser(s), always in one order per module (torchtitan's `parallelize_*`):

1. sequence parallelism (Ulysses; sliding-tile attention, if installed, keeps running inside),
2. activation checkpointing and torch.compile per block,
3. FSDP2 sharding (or HSDP groups) over every process.

The wrappers go on every denoiser module the adapter runs: the modules of `adapter.experts`
when the adapter has that attribute (a dict or list of denoiser modules, e.g. Wan 2.2's
high- and low-noise transformers, trained or frozen), else `adapter.denoiser`, else the trainable
module; each unwrapped from peft. For a full fine-tune that is the trainable module itself (or,
with several experts, the modules the trainable module holds); under LoRA it is the base model
with its LoRA layers inside the blocks, while the trainer keeps training, checkpointing and
averaging `adapter.trainable` (the LoRA weights alone).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..config import ParallelConfig
from .blocks import unwrap_denoiser


@dataclass
class Parallelized:
    """What `parallelize_denoiser` installed: the FSDP2 roots (one per denoiser module, in the
    adapter's order; empty when not sharded), the Ulysses handles (one per module; empty
    without sequence parallelism), and how many of the roots hold a trainable parameter."""

    sharded_modules: list[nn.Module] = field(default_factory=list)
    ulysses: list = field(default_factory=list)
    trained_roots: int = 0

    @property
    def sharded(self) -> bool:
        return bool(self.sharded_modules)

    def set_requires_gradient_sync(self, requires_gradient_sync: bool) -> None:
        """FSDP2's `set_requires_gradient_sync` on every sharded root: whether the next backward
        reduce-scatters its gradients (the updater passes True on an update's last micro-batch) or
        only accumulates them unsharded on this rank.

        With several trained roots (Wan 2.2 with both experts trained) every backward synchronises:
        a micro-batch runs the expert of its sampling step only, so the update's last micro-batch
        may not reach the other expert, whose locally accumulated gradients would then never be
        reduce-scattered (FSDP2 reduces only in a backward through that root). Each backward then
        reduce-scatters into the sharded gradients, which accumulate over the update: the same sum,
        at one reduce-scatter per micro-batch instead of per update."""
        sync = requires_gradient_sync or self.trained_roots > 1
        for module in self.sharded_modules:
            module.set_requires_gradient_sync(sync)

    def reshard(self) -> None:
        """Under FSDP, return every parameter of every root to its sharded form (after a forward a
        root's own parameters stay gathered), so named_parameters() gives the sharded DTensors again."""
        for root in self.sharded_modules:
            for module in root.modules():
                if hasattr(module, "reshard"):
                    module.reshard()


def denoiser_modules(adapter, trainable: nn.Module) -> list[nn.Module]:
    """The denoiser modules `adapter` runs, unwrapped from torch.compile / peft, each once, in a
    fixed order: `adapter.experts` (dict values in their order, or a list) when the adapter has
    that attribute, else [`adapter.denoiser`], else [`trainable`]. Raises ValueError if `experts`
    is empty or not a dict / list / tuple of modules."""
    experts = getattr(adapter, "experts", None)
    if experts is None:
        denoiser = getattr(adapter, "denoiser", None)
        modules = [trainable if denoiser is None else denoiser]
    else:
        modules = list(experts.values()) if isinstance(experts, dict) else experts
        if not isinstance(modules, (list, tuple)) or not modules \
                or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError(f"{type(adapter).__name__}.experts must be a non-empty dict or list of the denoiser "
                             f"modules the adapter runs, got {experts!r}")
    unique, seen = [], set()
    for module in modules:
        module = unwrap_denoiser(module)
        if id(module) not in seen:
            seen.add(id(module))
            unique.append(module)
    return unique


def parallelize_denoiser(adapter, trainable: nn.Module, par: ParallelConfig, mesh,
                         device: torch.device) -> Parallelized:
    """On each denoiser module (`denoiser_modules`), install sequence parallelism, then block
    checkpointing/compile, then FSDP2 (each only if configured); then make `trainable` hold the
    sharded parameters (`trainable_after_sharding`: LoRA weights re-bound, every trained
    parameter a DTensor).

    Every module gets Ulysses (a frozen expert too: it runs in the rollouts on the same sharded
    tokens) and, under FSDP, its own sharded root (a frozen expert's weights are split over the
    ranks as well; every rank runs every forward of it in lockstep, as for the trained ones).
    Activation checkpointing goes on the modules with a trainable parameter only (a frozen
    expert never runs a backward); compiled blocks on every module.

    `mesh`: the run's DeviceMesh (dims "dp", "sp"), None in a single process. Raises what the
    installers raise (heads not divisible by sp_size, ...).
    """
    modules = denoiser_modules(adapter, trainable)
    result = Parallelized()
    if par.sp_size > 1:
        group = mesh["sp"].get_group()
        result.ulysses = [_install_sequence_parallel(adapter, module, group) for module in modules]
    if par.activation_checkpointing != "none" or par.compile_blocks:
        from .fsdp import apply_block_wrappers
        for module in modules:
            trained = any(p.requires_grad for p in module.parameters())
            apply_block_wrappers(module, par.activation_checkpointing if trained else "none",
                                 par.checkpoint_every_n_blocks, par.compile_blocks)
    if not par.fsdp.enabled:
        return result
    from .fsdp import fsdp_mesh, shard_model, trainable_after_sharding
    # Over every process (or HSDP groups of them): sequence-parallel ranks hold partial
    # gradients of the same replica, so FSDP reduces over all of them.
    fmesh = fsdp_mesh(device.type, dist.get_world_size(), par.fsdp.shard_size)
    result.trained_roots = sum(any(p.requires_grad for p in module.parameters()) for module in modules)
    result.sharded_modules = [shard_model(module, fmesh, par.fsdp.param_dtype, par.fsdp.reduce_dtype,
                                          par.fsdp.cpu_offload) for module in modules]
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
