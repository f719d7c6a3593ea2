"""Which attention backend runs an attention call: the names, their limits and `auto`'s rule.

Pure rules on what is known (device type, dtype, head_dim, mask, dropout, installed packages,
GPU capability), shared by the config check (`config_problems`), the adapter build and each
call; `dancegrpo.attention.backends` (whose docstring explains every value and why) applies
the choice to a denoiser's attention modules.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Collection

import torch
from torch.nn.attention import SDPBackend

#: Every accepted value of `model.options.attention_backend`.
BACKENDS = ("auto", "flash", "efficient", "cudnn", "math", "flash_attn", "flash_attn3", "xformers")

SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
#: What `auto` lets SDPA choose from on CUDA: everything but cuDNN (see the module docstring).
AUTO_SDPA = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


@dataclass(frozen=True)
class Package:
    module: str    # import name
    label: str     # what users call it
    install: str   # how to get it


PACKAGES = {
    "flash_attn": Package("flash_attn", "flash-attn 2", "pip install flash-attn --no-build-isolation"),
    "flash_attn3": Package("flash_attn_interface", "FlashAttention-3",
                           "build it from the flash-attention repository's hopper/ folder "
                           "(cd hopper && python setup.py install)"),
    "xformers": Package("xformers", "xformers", "pip install xformers (the wheel matching your torch and CUDA)"),
}
CUDA_ONLY = frozenset({"efficient", "cudnn", "flash_attn", "flash_attn3", "xformers"})
HALF_ONLY_ON_CUDA = frozenset({"flash", "cudnn", "flash_attn", "flash_attn3"})
MASKLESS_ON_CUDA = frozenset({"flash", "flash_attn", "flash_attn3", "xformers"})
HALF = (torch.float16, torch.bfloat16)
MAX_FLASH_HEAD_DIM = 256   # torch's flash kernel, flash-attn 2 and FlashAttention-3 take head_dim <= 256
FALLBACK_HINT = "use attention_backend: efficient (any dtype, masks) or auto"

class AttentionBackendError(ValueError):
    """A chosen attention backend cannot run the given attention (a settings error, not a bug)."""


def refusal_error(name: str, where: str, reason: str) -> AttentionBackendError:
    return AttentionBackendError(f"attention_backend = {name!r} cannot run {where}: {reason}; {FALLBACK_HINT}")


@dataclass(frozen=True)
class AttentionChoice:
    """What runs one attention call.

    backend: the BACKENDS name that runs (never "auto"), or "default" (torch's unrestricted
    choice: CPU auto); sdpa: the SDPA kernels allowed (None: unrestricted); package: the
    PACKAGES key that runs instead of SDPA, or None.
    """

    backend: str
    sdpa: tuple[SDPBackend, ...] | None = None
    package: str | None = None

    def describe(self) -> str:
        if self.package:
            return PACKAGES[self.package].label
        if self.sdpa is None:
            return "torch SDPA (default choice)"
        return "torch SDPA (" + ", ".join(k.name.lower() for k in self.sdpa) + ")"


@functools.lru_cache(maxsize=1)
def installed_packages() -> frozenset[str]:
    """The PACKAGES keys whose module can be imported here (looked up once)."""
    return frozenset(key for key, package in PACKAGES.items() if importlib.util.find_spec(package.module))


def unfit_reason(name: str, device_type: str | None = None, dtype: torch.dtype | None = None,
                 head_dim: int | None = None, masked: bool | None = None, dropout: bool = False,
                 installed: Collection[str] = ()) -> str | None:
    """Why backend `name` (not "auto") cannot run such an attention, or None if nothing known forbids it.

    Every argument but `name` may be None (unknown: its checks are skipped), so the same rules
    serve the config (device only), the adapter build (head_dim, mask, packages) and the first call
    (everything). device_type: "cpu" | "cuda"; head_dim: the largest over the model's attentions.
    """
    cuda = device_type == "cuda"
    if device_type is not None and not cuda and name in CUDA_ONLY:
        return f"it runs only on CUDA devices, and this run is on {device_type!r}"
    if name in PACKAGES and name not in installed:
        package = PACKAGES[name]
        return f"the {package.label} package ({package.module}) is not installed; {package.install}"
    on_cuda_only = name in PACKAGES or cuda   # the package kernels exist only on CUDA
    if dtype is not None and dtype not in HALF and name in HALF_ONLY_ON_CUDA and on_cuda_only:
        return (f"its kernels take float16/bfloat16 only, and q is {str(dtype).replace('torch.', '')} "
                f"(set run.autocast_dtype: bf16)")
    if head_dim is not None and head_dim > MAX_FLASH_HEAD_DIM and name in ("flash", "flash_attn", "flash_attn3") \
            and on_cuda_only:
        return f"its kernels take head_dim <= {MAX_FLASH_HEAD_DIM}, and this model has head_dim {head_dim}"
    if masked and name in MASKLESS_ON_CUDA and on_cuda_only:
        return "it takes no attention mask, and this attention is masked (padded text tokens)"
    if dropout and name == "flash_attn3":
        return "FlashAttention-3 has no attention dropout"
    return None


def select_backend(requested: str, device_type: str, dtype: torch.dtype, head_dim: int, masked: bool = False,
                   dropout: bool = False, installed: Collection[str] = (),
                   capability: tuple[int, int] | None = None, where: str = "this attention") -> AttentionChoice:
    """The choice for one attention call: `auto`'s rule, or the requested backend if it can run.

    Pure (no device query): device_type "cpu" | "cuda"; dtype of q; head_dim (last dim of q);
    masked: an attn_mask is given; dropout: dropout_p > 0; installed: PACKAGES keys importable;
    capability: the CUDA device's (major, minor). Raises AttentionBackendError (naming `where`)
    when the requested backend cannot run it, ValueError for an unknown name.
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend = {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "auto":
        if device_type != "cuda":
            return AttentionChoice("default")
        package_fits = (not masked and not dropout and dtype in HALF and head_dim <= MAX_FLASH_HEAD_DIM
                        and capability is not None)
        if package_fits and "flash_attn3" in installed and capability[0] == 9:
            return AttentionChoice("flash_attn3", package="flash_attn3")
        if package_fits and "flash_attn" in installed and (8, 0) <= tuple(capability) < (10, 0):
            return AttentionChoice("flash_attn", package="flash_attn")
        return AttentionChoice("auto", sdpa=AUTO_SDPA)
    reason = unfit_reason(requested, device_type, dtype, head_dim, masked, dropout, installed)
    if reason:
        raise refusal_error(requested, where, reason)
    if requested in PACKAGES:
        return AttentionChoice(requested, package=requested)
    return AttentionChoice(requested, sdpa=(SDPA_KERNELS[requested],))


def config_problems(options, device: str) -> list[str]:
    """Config-load checks of `model.options.attention_backend` (the name; CUDA-only kernels on a CPU run)."""
    if not isinstance(options, dict) or "attention_backend" not in options:
        return []
    name = options["attention_backend"]
    field = "model.options.attention_backend"
    if not isinstance(name, str) or name not in BACKENDS:
        return [f"{field} = {name!r} is not one of {', '.join(BACKENDS)}"]
    device_type = device.split(":")[0] if isinstance(device, str) else None
    if device_type == "cpu" and name in CUDA_ONLY:
        return [f"{field} = {name!r} runs only on CUDA devices, and run.device = {device!r}; "
                f"on the CPU use auto, math or flash"]
    return []
