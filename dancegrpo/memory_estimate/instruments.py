"""The memory estimate's instruments: exact parameter counts, saved-tensor bytes, live-memory peaks.

They work on real and on fake tensors (torch's FakeTensorMode), so a full-size model's training
step can be measured on a CPU without allocating its memory (see the package docstring).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def diffusers_class(name: str) -> type:
    """The diffusers model class of that name (e.g. "FluxTransformer2DModel")."""
    import diffusers
    return getattr(diffusers, name)


# ---------------------------------------------------------------------------------------------
# Parameter counts

def count_parameters(build: Callable[[], nn.Module]) -> int:
    """Exact parameter count of the module `build()` makes, built with fake tensors (no memory).

    FakeTensorMode rather than the meta device: it keeps small constants, so constructors that
    read a scalar back (`float(torch.log(...))`) still run.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        module = build()
    return sum(p.numel() for p in module.parameters())


def count_diffusers_parameters(class_name: str, config: dict) -> int:
    """Exact parameter count of a diffusers model class built from `config`."""
    cls = diffusers_class(class_name)
    return count_parameters(lambda: cls.from_config(config))


# ---------------------------------------------------------------------------------------------
# Instruments

def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl's address: one key per distinct buffer


def saved_tensor_bytes(step: Callable[[], torch.Tensor], exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes autograd saves for backward while `step()` runs its forward.

    Counts each distinct storage once (views and repeated saves of one buffer share it) and
    leaves out the storages of `exclude` (the parameters: model state, not activations).
    Returns the total; `step`'s result is discarded without a backward.
    """
    excluded = {_storage_key(t) for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in excluded:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


class LiveMemoryTracker(TorchDispatchMode):
    """Live bytes of the storages that operators allocate inside the context, and their peak.

    A storage counts from the operator that creates it until it is freed (a weak reference
    fires). Outputs that alias an input (views, in-place results) allocate nothing.
    Works on real and on fake tensors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_sparse:
                continue
            storage = t.untyped_storage()
            key = _storage_key(t)
            if key in inputs or key in self._live:
                continue
            size = storage.nbytes()
            self._live[key] = weakref.ref(storage, functools.partial(self._freed, key, size))
            self.current += size
            self.peak = max(self.peak, self.current)
        return out

    def _freed(self, key: int, size: int, _ref) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= size


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention with the memory of a fused kernel (flash / memory-efficient):
    saves q, k, v, the output and a float32 log-sum-exp per query, never the attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


@contextlib.contextmanager
def cuda_like_numerics(autocast_dtype: torch.dtype | None) -> Iterator[None]:
    """Make a CPU (fake) run keep the tensors a CUDA training step keeps.

    - attention: a fused kernel's footprint (`_FusedAttention`), in the autocast dtype as CUDA
      autocast runs it; CPU's math fallback would save the full attention matrix.
    - layer_norm, group_norm: in float32, as CUDA autocast runs them (CPU autocast does not).
    """
    originals = {name: getattr(F, name) for name in ("scaled_dot_product_attention", "layer_norm", "group_norm")}

    def autocasting() -> bool:
        return autocast_dtype is not None and torch.is_autocast_enabled("cpu")

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
        q, k, v = query, key, value
        if autocasting():
            q, k, v = q.to(autocast_dtype), k.to(autocast_dtype), v.to(autocast_dtype)
        return _FusedAttention.apply(q, k, v, attn_mask)

    def fp32(name):
        def run(x, *args, **kwargs):
            if not autocasting():
                return originals[name](x, *args, **kwargs)
            args = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: a.float() if isinstance(a, torch.Tensor) else a for k, a in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return originals[name](x.float(), *args, **kwargs)
        return run

    F.scaled_dot_product_attention = attention
    F.layer_norm, F.group_norm = fp32("layer_norm"), fp32("group_norm")
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


@dataclass
class StepMemory:
    """Activation memory of one training micro-batch (bytes), gradients of parameters excluded."""

    saved: int   # kept for backward at the end of the forward (saved-tensor hooks)
    peak: int    # peak live bytes over forward + backward (LiveMemoryTracker)


def measure_training_step(model: nn.Module, forward: Callable[[], torch.Tensor],
                          autocast_dtype: torch.dtype | None = torch.bfloat16) -> StepMemory:
    """Run `forward()` (returning the model output) and a backward, as the trainer does.

    The forward runs under CPU autocast in `autocast_dtype` with `cuda_like_numerics`, the
    backward outside it (as in `Trainer._update`). Parameter gradients are dropped as soon as
    they are accumulated, so `peak` holds activations and temporaries only.
    """
    params = tuple(p for p in model.parameters() if p.requires_grad)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params]
    autocast = torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    try:
        with cuda_like_numerics(autocast_dtype), warnings.catch_warnings():
            # CPU kernels warn about mixed dtypes they cannot fuse; CUDA's would not, and nothing runs here
            warnings.simplefilter("ignore", UserWarning)
            def loss() -> torch.Tensor:
                with autocast:
                    return forward().float().square().mean()  # a latent-sized loss, like the log-prob's
            saved = saved_tensor_bytes(loss, exclude=params)
            with LiveMemoryTracker() as tracker:
                loss().backward()
    finally:
        for hook in hooks:
            hook.remove()
    return StepMemory(saved=saved, peak=tracker.peak)
