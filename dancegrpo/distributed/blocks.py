"""Per-block activation checkpointing and torch.compile for the diffusers denoisers.

Apply in this order, before sharding (FSDP2 `fully_shard` per block, then the root):

    apply_activation_checkpointing(model, "selective")   # 1. recompute inside each block
    compile_blocks(model)                                 # 2. compile each block (with its checkpoint)
    for block in transformer_blocks(model): fully_shard(block, mesh=...)   # 3. shard
    fully_shard(model, mesh=...)

Checkpointing is innermost so that the recomputation happens inside the block the compiler
sees and inside FSDP's per-block all-gather. Both steps change modules in place and leave
their parameter names alone (no wrapper modules), so state_dict keys, FSDP/DCP checkpoints
and safetensors files are the same with and without them.

Checkpointing replaces a block's `forward` by a bound method that runs the class's forward
under non-reentrant `torch.utils.checkpoint`; it is bound to the block, so `copy.deepcopy`
(EMA, frozen reference copies) rebinds it to the copy.

Modes:
- "none": nothing is wrapped.
- "full": only the block's inputs are kept; the whole block is recomputed in backward.
- "selective": the outputs of matrix products (aten mm / addmm / bmm) and of the fused
  attention kernels are kept; the cheap element-wise work around them (norms, modulation,
  activations, RoPE) is recomputed. Costs more memory than "full", but backward no longer
  repeats the FLOP-heavy matmuls and attention.
"""
from __future__ import annotations

import functools
import types
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..models import block_classes, denoiser_blocks   # the registry, with the built-in models in it

CHECKPOINT_MODES = ("none", "full", "selective")
_MARK = "_dancegrpo_checkpoint_mode"   # set on a wrapped block: the mode
_MODEL_MARK = "_dancegrpo_checkpointing_applied"


# Adapted from torchtitan torchtitan/distributed/activation_checkpoint.py::_get_default_save_ops (BSD-3-Clause)
def _saved_ops() -> frozenset:
    """The aten ops whose outputs selective checkpointing keeps: matmuls and fused attention forwards."""
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
    for name in dir(aten):
        # the forward kernels only (flash, efficient, cudnn, CPU flash, overrideable), not their backwards
        if name.startswith("_scaled_dot_product_") and "attention" in name and not name.endswith("backward") \
                and "math" not in name:
            ops.add(getattr(aten, name).default)
    return frozenset(ops)


SELECTIVE_SAVED_OPS = _saved_ops()


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    # A fresh pair of contexts per call: they hold that call's saved outputs.
    return create_selective_checkpoint_contexts(_selective_policy)


def unwrap_denoiser(model: nn.Module) -> nn.Module:
    """The diffusers model inside the wrappers that hold one: torch.compile's OptimizedModule
    (`_orig_mod`) and peft's PeftModel (`get_base_model()`, whose LoRA layers stay in place
    inside the blocks). Any other module is returned as is."""
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "get_base_model") and callable(inner.get_base_model):
        inner = inner.get_base_model()
    return inner


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a diffusers denoiser, in execution order: the units to checkpoint,
    compile and shard.

    Each model's `ModelSpec.denoiser_blocks` (dancegrpo/models/<model>.py) says which they are for
    its denoiser class; the class is looked up through its bases (FSDP2 swaps it for a subclass
    "FSDP<Name>"), in the wrappers torch.compile and peft put around it (`unwrap_denoiser`).
    Raises ValueError naming the class and the classes the registered models cover.
    """
    inner = unwrap_denoiser(model)
    blocks = denoiser_blocks(cls.__name__ for cls in type(inner).__mro__)
    if blocks is None:
        raise ValueError(f"transformer_blocks: {type(inner).__name__} is not a denoiser whose blocks a registered "
                         f"model gives (known: {', '.join(block_classes())}); give its block lists in its "
                         f"ModelSpec's denoiser_blocks")
    return blocks(inner)


def _checkpointed_forward(block_forward: Callable[..., Any]) -> Callable[..., Any]:
    """A forward that runs the class's `block_forward` under non-reentrant activation checkpointing.

    The class's function is captured here rather than looked up as `type(self).forward`, which
    torch.compile cannot trace (a graph break per block)."""
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = functools.partial(block_forward, self)
        if not torch.is_grad_enabled():   # rollouts, evaluation: nothing to save, nothing to recompute
            return run(*args, **kwargs)
        if getattr(self, _MARK) == "selective":
            return checkpoint(run, *args, use_reentrant=False, context_fn=_selective_context, **kwargs)
        return checkpoint(run, *args, use_reentrant=False, **kwargs)
    return forward


def _diffusers_checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def apply_activation_checkpointing(model: nn.Module, mode: str, every_n: int = 1) -> int:
    """Checkpoint every `every_n`-th block of `model` (blocks 0, n, 2n, ... of `transformer_blocks`).

    mode: "none" | "full" | "selective" (see the module docstring). Returns how many blocks
    were wrapped (0 for "none"). Refuses a second call on the same model and a model whose
    diffusers gradient checkpointing is on (the blocks would be checkpointed twice).
    """
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {list(CHECKPOINT_MODES)}")
    if isinstance(every_n, bool) or not isinstance(every_n, int) or every_n < 1:
        raise ValueError(f"every_n = {every_n!r} must be a positive integer (1 = every block, 2 = every other block)")
    if mode == "none":
        return 0
    if getattr(model, _MODEL_MARK, False):
        raise RuntimeError(f"apply_activation_checkpointing was already called on this {type(model).__name__} "
                           f"(mode {getattr(model, _MODEL_MARK)!r}): wrapping twice would checkpoint twice; "
                           f"build the model again to change the mode")
    if _diffusers_checkpointing_on(model):
        raise RuntimeError(f"{type(model).__name__} has diffusers' gradient checkpointing enabled "
                           f"(enable_gradient_checkpointing / gradient_checkpointing: true): turn it off "
                           f"(model.disable_gradient_checkpointing()) before applying mode {mode!r}")
    blocks = transformer_blocks(model)
    wrapped = 0
    for index, block in enumerate(blocks):
        if index % every_n:
            continue
        if getattr(block, "_compiled_call_impl", None) is not None:
            raise RuntimeError(f"block {index} ({type(block).__name__}) is already compiled: apply activation "
                               f"checkpointing before compile_blocks (order: checkpointing, compile, sharding)")
        if "forward" in vars(block):
            raise RuntimeError(f"block {index} ({type(block).__name__}) already has an instance-level forward "
                               f"(compiled or wrapped by another tool): apply checkpointing first")
        setattr(block, _MARK, mode)
        block.forward = types.MethodType(_checkpointed_forward(type(block).forward), block)
        wrapped += 1
    setattr(model, _MODEL_MARK, mode)
    return wrapped


def checkpointed_blocks(model: nn.Module) -> list[int]:
    """Indices (in `transformer_blocks(model)`) of the blocks that activation checkpointing wraps."""
    return [i for i, block in enumerate(transformer_blocks(model)) if getattr(block, _MARK, None)]


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """`torch.compile` each block of `model` in place (`nn.Module.compile`: names and state_dict
    keys unchanged); a block's activation checkpointing, applied before, is compiled with it.

    compile_kwargs go to torch.compile (backend, mode, fullgraph, dynamic, ...). Returns the count.
    """
    blocks = transformer_blocks(model)
    for index, block in enumerate(blocks):
        if getattr(block, "_compiled_call_impl", None) is not None:
            raise RuntimeError(f"block {index} ({type(block).__name__}) is already compiled: "
                               f"compile_blocks was called twice on this {type(model).__name__}")
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
