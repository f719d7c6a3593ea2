"""Input checks shared by the op dispatchers, with messages that say what to change."""
from __future__ import annotations

import os

import torch
from torch import Tensor

CHECK_ENV_VAR = "DANCEGRPO_OPS_CHECK"
_debug_checks = os.environ.get(CHECK_ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


def set_debug_checks(enabled: bool) -> None:
    """Turn the per-call debug checks of the fused ops on or off (default: the environment
    variable DANCEGRPO_OPS_CHECK=1 at import). They read tensor values (host syncs on a GPU):
    every step index within the sampler's steps. Without them a schedule is validated once,
    when its coefficient table is built, and each call checks only tensor metadata."""
    global _debug_checks
    _debug_checks = bool(enabled)


def debug_checks() -> bool:
    return _debug_checks

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(t, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    return t


def check_latents(model_output: Tensor, sample: Tensor, action: Tensor, action_name: str) -> None:
    """Shapes equal, one device, and the dtype contract every backend implements (metadata only)."""
    # The common, valid case in one expression; anything else gets the detailed checks below.
    if (isinstance(sample, Tensor) and isinstance(model_output, Tensor) and isinstance(action, Tensor)
            and sample.dtype in _FLOATS and action.dtype == sample.dtype and sample.dim() >= 1
            and model_output.shape == sample.shape and action.shape == sample.shape
            and (model_output.dtype == sample.dtype
                 or (sample.dtype == torch.float32 and model_output.dtype in _LOW_PRECISION))
            and model_output.device == sample.device and action.device == sample.device
            and not ((sample.requires_grad or action.requires_grad) and torch.is_grad_enabled())):
        return
    for t, name in ((model_output, "model_output"), (sample, "sample"), (action, action_name)):
        check_tensor(t, name)
    if sample.dim() < 1:
        raise ValueError("sample must have a batch dimension (B, ...), got a 0-d tensor")
    for t, name in ((model_output, "model_output"), (action, action_name)):
        if t.shape != sample.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} differs from sample shape {tuple(sample.shape)}")
        if t.device != sample.device:
            raise ValueError(f"{name} is on {t.device} but sample is on {sample.device}; put them on one device")
    if action.dtype != sample.dtype:
        raise TypeError(f"{action_name} dtype {action.dtype} differs from sample dtype {sample.dtype}; "
                        f"latents, noise and actions share one dtype")
    same = model_output.dtype == sample.dtype
    autocast = sample.dtype == torch.float32 and model_output.dtype in _LOW_PRECISION
    if not (same or autocast):
        raise TypeError(f"model_output dtype {model_output.dtype} does not fit sample dtype {sample.dtype}: use one "
                        f"dtype, or a bfloat16/float16 model output with float32 latents (cast model_output)")
    for t, name in ((sample, "sample"), (action, action_name)):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but the fused SDE step differentiates only w.r.t. "
                             f"model_output (recorded latents are constants); pass {name}.detach()")


def require(condition: Tensor, error: type[Exception], message: str) -> None:
    """Raise `error(message)` unless the boolean tensor is all true.

    On the CPU this is a host check. Under torch.compile, and on accelerators (where reading
    the value back would stall the stream), it is an asynchronous device assertion instead: a
    RuntimeError carrying `message`, raised by the device, with no graph break and no sync.
    """
    if torch.compiler.is_compiling() or condition.device.type != "cpu":
        torch._assert_async(condition.all(), message)
    elif not bool(condition.all()):
        raise error(message)


_STD_MESSAGE = ("the step's std must be > 0 for a log-prob: eta = 0 (or sigma_next == sigma) is a deterministic "
                "step with no density; use eta > 0, or the ODE sampler (dancegrpo.rollout.ode_sample) "
                "when no log-prob is needed")


def require_positive_std(std: Tensor) -> None:
    """std (B,) or (B, 1, ..., 1) must be > 0 (NaN fails too); the eager CPU error names the samples."""
    positive = std > 0
    if not torch.compiler.is_compiling() and std.device.type == "cpu" and not bool(positive.all()):
        flat = std.reshape(-1)
        bad = (~positive.reshape(-1)).nonzero().flatten().tolist()
        raise ValueError(f"{_STD_MESSAGE} (std = {flat[bad[:8]].tolist()} at sample(s) {bad[:8]})")
    require(positive, ValueError, _STD_MESSAGE)
