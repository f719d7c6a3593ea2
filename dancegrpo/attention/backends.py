"""Attention backends, chosen rather than left to torch: `model.options.attention_backend`.

One module serves every adapter (toy_flux, sd14, flux, hunyuan_video, skyreels_i2v). Values:

- `auto` (default). On CUDA: FlashAttention-3 (`flash_attn_interface`) if installed, on a
  Hopper GPU (sm90), for fp16/bf16, head_dim <= 256, no mask, no dropout; else flash-attn 2
  (`flash_attn`) if installed, on sm80-sm90, same limits; else torch SDPA restricted to its
  flash, memory-efficient and math kernels (torch picks among them, in that order). Auto never
  picks cuDNN attention: on an H200 (torch 2.11+cu130) torch's own choice for the FLUX.1-dev
  training step (720x720, bf16) was cuDNN, whose backward failed (`mha_graph.execute(...)
  .is_good()` false, then an illegal memory access). Never xformers either: SDPA's
  memory-efficient backend is built from its kernel. On the CPU, auto is torch's default
  choice, untouched (results are bit for bit those without this module).
- `flash`, `efficient`, `cudnn`, `math`: torch SDPA restricted to that one kernel
  (`torch.nn.attention.sdpa_kernel`). On the CPU, torch has `math` and `flash` (its CPU flash
  kernel, any float dtype); `efficient` and `cudnn` need CUDA.
- `flash_attn` (flash-attn 2), `flash_attn3` (FlashAttention-3), `xformers`: optional packages,
  never required; choosing one that is not installed is refused, naming how to install it.
  They take no attention mask here, so models that mask padded text tokens (HunyuanVideo,
  SkyReels-I2V) refuse them; `auto` routes masked calls to SDPA.

How it applies. `install_attention_backend(denoiser, name)` replaces the `forward` of every
diffusers attention module of the denoiser with one that runs the module's own forward under
`torch.nn.attention.sdpa_kernel(<the chosen kernels>)`, so every SDPA call inside it (diffusers'
native dispatcher, `AttnProcessor2_0`, the sliding-tile processor's dense fallback, the Ulysses
processor) is held to them. The package routes instead run the module under `AttentionRouter`,
a TorchFunctionMode sending those SDPA calls to the package (torch.compile cannot trace under a
mode, so under compile such a module runs eagerly; the SDPA routes compile fullgraph). Being on
the module, not on the processor, the choice holds whatever processor is installed (STA,
Ulysses) and whoever calls the module: rollout, the training forward, the activation-
checkpointing recompute inside backward, evaluation, the KL reference copy. SDPA's backward runs
the kernel its forward chose; the packages' autograd functions bring their own backward.
diffusers' dispatcher (`set_attention_backend`) is not used: SD v1.4's UNet processor calls SDPA
directly, it has no "SDPA without cuDNN" choice, and its flash backends refuse HunyuanVideo's mask.

When it is checked (the rules: `dancegrpo.attention.backend_choice`). The name at config load
(`config_problems`, with the device: a CUDA-only kernel on `run.device: cpu` is refused there);
the package, the head dims and the mask at install (adapter build); the device, attention dtype
(autocast's if on) and capability when the denoiser is first called (a forward pre-hook), before
any kernel runs. A kernel that still fails raises `AttentionBackendError` naming the backend, the
module and its input shapes and dtype (the q/k/v shapes on the package routes), and the fix.
"""
from __future__ import annotations

import types
from typing import Collection

import torch
from torch import nn
from torch.nn.attention import sdpa_kernel
from torch.overrides import TorchFunctionMode

from .backend_choice import (AUTO_SDPA, BACKENDS, FALLBACK_HINT, PACKAGES, AttentionBackendError, AttentionChoice,
                             config_problems, installed_packages, refusal_error, select_backend, unfit_reason)

_SDPA = torch.nn.functional.scaled_dot_product_attention   # the builtin, whatever patches F later


# ---------------------------------------------------------------------------------------------
# Running a choice


def _describe_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: bool) -> str:
    mask = ", with an attention mask" if masked else ""
    return (f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (batch, heads, tokens, head_dim), "
            f"{str(q.dtype).replace('torch.', '')} on {q.device}{mask}")


def _package_attention(package: str, q, k, v, dropout_p: float, is_causal: bool, scale: float | None,
                       enable_gqa: bool) -> torch.Tensor:
    """Run a package kernel on SDPA-layout tensors (B, H, N, D); returns (B, H, N, D)."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))   # the packages take (B, N, H, D)
    if package == "flash_attn":
        from flash_attn import flash_attn_func
        out = flash_attn_func(qt, kt, vt, dropout_p=dropout_p, softmax_scale=scale, causal=is_causal)
    elif package == "flash_attn3":
        from flash_attn_interface import flash_attn_func
        out = flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=is_causal)
        out = out[0] if isinstance(out, tuple) else out   # older releases return (out, lse)
    elif package == "xformers":
        if q.shape[1] != k.shape[1]:
            raise RuntimeError(f"xformers route: q has {q.shape[1]} heads, k/v {k.shape[1]} (grouped-query "
                               "attention is not routed to xformers)")
        import xformers.ops as xops
        bias = xops.LowerTriangularMask() if is_causal else None
        out = xops.memory_efficient_attention(qt, kt, vt, attn_bias=bias, p=dropout_p, scale=scale)
    else:
        raise ValueError(f"unknown attention package {package!r}")
    return out.transpose(1, 2)


def _attention_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype attention will run in: autocast's when it is on for the device, else the input's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        hidden = kwargs.get("sample")          # UNet2DConditionModel's name for its input
    return hidden if isinstance(hidden, torch.Tensor) else None


class AttentionBackend:
    """The chosen backend of one denoiser: its name, the model's attention facts, the choices made.

    The choice is made per (device, attention dtype) for the whole denoiser (`choice_for`), and
    per call for the package routes (`attend`, which also sends masked calls of `auto` to SDPA).
    """

    def __init__(self, requested: str, model: str = "model", installed: Collection[str] | None = None,
                 head_dim: int | None = None, masked: bool = False):
        if requested not in BACKENDS:
            raise ValueError(f"{model}: attention_backend = {requested!r} is not one of {', '.join(BACKENDS)}")
        self.requested, self.model, self.head_dim, self.masked = requested, model, head_dim, masked
        self.installed = installed_packages() if installed is None else frozenset(installed)
        self._choices: dict[tuple, AttentionChoice] = {}        # (device, dtype) -> choice
        self._call_choices: dict[tuple, AttentionChoice] = {}   # package routes: per kind of call

    def check_model(self) -> None:
        """Build-time refusal from what the model fixes: packages, head_dim, masks (device still unknown)."""
        if self.requested == "auto":
            return
        reason = unfit_reason(self.requested, head_dim=self.head_dim, masked=self.masked, installed=self.installed)
        if reason:
            raise refusal_error(self.requested, f"the {self.model} denoiser", reason)

    def describe(self, device: torch.device, dtype: torch.dtype, hidden_shape=None) -> str:
        shape = "" if hidden_shape is None else f" on hidden_states {tuple(hidden_shape)}"
        head = "" if self.head_dim is None else f" (head_dim up to {self.head_dim})"
        mask = ", masked" if self.masked else ""
        return (f"the {self.model} denoiser's attention{head}{shape}, "
                f"{str(dtype).replace('torch.', '')} on {device}{mask}")

    def choice_for(self, device: torch.device, dtype: torch.dtype, hidden_shape=None) -> AttentionChoice:
        """The choice for this denoiser's attention on `device` in `dtype` (cached); raises if it cannot run."""
        key = (device, dtype)
        choice = self._choices.get(key)
        if choice is None:
            needs_capability = device.type == "cuda" and bool(self.installed)
            capability = torch.cuda.get_device_capability(device) if needs_capability else None
            choice = select_backend(self.requested, device.type, dtype, self.head_dim or 0, self.masked, False,
                                    self.installed, capability, where=self.describe(device, dtype, hidden_shape))
            self._choices[key] = choice
        return choice

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the denoiser: makes the choice before the (maybe compiled) blocks run."""
        hidden = _hidden_of(args, kwargs)
        if hidden is not None:
            self.choice_for(hidden.device, _attention_dtype(hidden), hidden.shape)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
        """F.scaled_dot_product_attention on (B, H, N, D) tensors for the package routes (per-call choice)."""
        masked = attn_mask is not None
        kind = (query.device, query.dtype, query.shape[-1], masked, dropout_p > 0)
        choice = self._call_choices.get(kind)
        if choice is None:
            capability = torch.cuda.get_device_capability(query.device) if query.is_cuda else None
            choice = select_backend(self.requested, query.device.type, query.dtype, query.shape[-1], masked,
                                    dropout_p > 0, self.installed, capability,
                                    where=_describe_call(query, key, value, masked))
            self._call_choices[kind] = choice
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                      enable_gqa=enable_gqa)
        if choice.package is None and choice.sdpa is None:
            return _SDPA(query, key, value, **kwargs)
        try:
            if choice.package is not None:
                return _package_attention(choice.package, query, key, value, dropout_p, is_causal, scale,
                                          enable_gqa)
            with sdpa_kernel(list(choice.sdpa)):
                return _SDPA(query, key, value, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            raise AttentionBackendError(
                f"attention_backend = {self.requested!r} ({choice.describe()}) failed on "
                f"{_describe_call(query, key, value, masked)}: {exc}; {FALLBACK_HINT}") from exc


class AttentionRouter(TorchFunctionMode):
    """Sends every F.scaled_dot_product_attention call made under it to `backend.attend` (package routes)."""

    def __init__(self, backend: AttentionBackend):
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is _SDPA:
            return self.backend.attend(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@torch.compiler.disable
def _package_forward(cls_forward, module: nn.Module, backend: AttentionBackend, args: tuple, kwargs: dict):
    """An attention module's forward with its SDPA calls sent to a package kernel.

    torch.compile cannot trace under a TorchFunctionMode, so under compile this module runs
    eagerly (a graph break around it); the SDPA routes compile without one.
    """
    with AttentionRouter(backend):
        return cls_forward(module, *args, **kwargs)


def _module_failure(backend: AttentionBackend, choice: AttentionChoice, module: nn.Module, hidden: torch.Tensor,
                    kwargs: dict, exc: Exception) -> AttentionBackendError:
    extra = kwargs.get("encoder_hidden_states")
    text = f", encoder_hidden_states {tuple(extra.shape)}" if isinstance(extra, torch.Tensor) else ""
    heads = getattr(module, "heads", "?")
    return AttentionBackendError(
        f"attention_backend = {backend.requested!r} ({choice.describe()}): {type(module).__name__} ({heads} heads) on "
        f"hidden_states {tuple(hidden.shape)}{text}, {str(_attention_dtype(hidden)).replace('torch.', '')} on "
        f"{hidden.device} failed: {exc}; {FALLBACK_HINT}")


# ---------------------------------------------------------------------------------------------
# Installing on a denoiser

_MARK = "_dancegrpo_attention_backend"


def attention_modules(denoiser: nn.Module) -> list[nn.Module]:
    """The diffusers attention modules of a denoiser (joint, self, cross and token-refiner attention)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention
    return [m for m in denoiser.modules() if isinstance(m, (Attention, AttentionModuleMixin))]


def head_dims(modules: list[nn.Module]) -> set[int]:
    """Per-head width of each attention module: the query projection's outputs / heads."""
    dims = set()
    for module in modules:
        to_q, heads = getattr(module, "to_q", None), getattr(module, "heads", None)
        if to_q is not None and heads:
            dims.add(to_q.weight.shape[0] // heads)
    return dims


def _routed(cls_forward, backend: AttentionBackend):
    """The forward an attention module gets: its class's forward under the chosen backend."""
    def forward(self, *args, **kwargs):
        hidden = _hidden_of(args, kwargs)
        if hidden is None:    # not called the diffusers way: nothing to decide from, torch's choice
            return cls_forward(self, *args, **kwargs)
        choice = backend.choice_for(hidden.device, _attention_dtype(hidden), hidden.shape)
        if choice.package is not None:
            return _package_forward(cls_forward, self, backend, args, kwargs)
        if choice.sdpa is None:
            return cls_forward(self, *args, **kwargs)
        try:
            with sdpa_kernel(list(choice.sdpa)):
                return cls_forward(self, *args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            raise _module_failure(backend, choice, self, hidden, kwargs, exc) from exc
    return forward


def install_attention_backend(denoiser: nn.Module, name: str = "auto", model: str = "model",
                              masked: bool = False, installed: Collection[str] | None = None) -> AttentionBackend:
    """Run the attention of every diffusers attention module of `denoiser` on backend `name`.

    masked: the model masks attention (padded text tokens), which the package kernels cannot take.
    Raises ValueError for an unknown name, AttentionBackendError when the model cannot run the
    backend (package missing, head_dim, mask), RuntimeError when installed twice or when the
    denoiser has no diffusers attention module. Returns the AttentionBackend (its choices).
    """
    modules = attention_modules(denoiser)
    if not modules:
        raise RuntimeError(f"{model}: {type(denoiser).__name__} has no diffusers attention module; "
                           "attention_backend cannot be applied to it")
    if any(_MARK in vars(m) for m in modules):
        raise RuntimeError(f"{model}: an attention backend is already installed on this {type(denoiser).__name__}")
    dims = head_dims(modules)
    backend = AttentionBackend(name, model, installed, head_dim=max(dims) if dims else None, masked=masked)
    backend.check_model()
    for module in modules:
        module.forward = types.MethodType(_routed(type(module).forward, backend), module)
        setattr(module, _MARK, name)
    denoiser.register_forward_pre_hook(backend.prepare, with_kwargs=True)
    return backend


def installed_backend(module: nn.Module) -> str | None:
    """The backend name installed on a diffusers attention module, or None."""
    return vars(module).get(_MARK)


__all__ = ["AUTO_SDPA", "AttentionBackend", "AttentionBackendError", "AttentionChoice", "AttentionRouter",
           "BACKENDS", "PACKAGES", "attention_modules", "config_problems", "install_attention_backend",
           "installed_backend", "installed_packages", "select_backend", "unfit_reason"]
