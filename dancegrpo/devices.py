"""Is the device a config names present on this machine? Asked before any work starts.

`run.device: cuda` on a machine without CUDA would otherwise fail after the model has loaded,
with torch's "Torch not compiled with CUDA enabled". `device_problem` says instead, in one line,
what torch this is (version, CPU-only or CUDA build), what it sees, and how to get a CUDA build.
"""
from __future__ import annotations

import os
import re

__all__ = ["device_problem", "require_device", "CUDA_INSTALL_HINT"]

CUDA_INSTALL_HINT = ("install a CUDA build of torch (pick one at https://pytorch.org/get-started/locally/, e.g. "
                     "`pip install torch --index-url https://download.pytorch.org/whl/cu126`)")


def device_problem(device: str) -> str | None:
    """Why `device` ("cpu", "cuda", "cuda:N") cannot be used on this machine, or None if it can.

    Under torchrun, "cuda" means the GPU of LOCAL_RANK, which must exist too.
    """
    import torch
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device)
    if match is None:
        return f"{device!r} is not a device this trainer runs on: use 'cpu', 'cuda' or 'cuda:N' (N a GPU index)"
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        return None if index is None else f"{device!r}: write 'cpu' (there is one CPU device)"
    build = torch.version.cuda or getattr(torch.version, "hip", None)
    if build is None:
        return (f"{device!r} needs CUDA, but this torch {torch.__version__} is a CPU-only build "
                f"(torch.version.cuda is None); {CUDA_INSTALL_HINT}, or use 'cpu'")
    if not torch.cuda.is_available():
        return (f"{device!r}: torch {torch.__version__} is built for CUDA {build} but sees no GPU "
                "(torch.cuda.is_available() is False: no NVIDIA driver loaded, or CUDA_VISIBLE_DEVICES hides "
                "the GPUs); run on a machine with a GPU, or use 'cpu'")
    count = torch.cuda.device_count()
    wanted = int(index) if index is not None else int(os.environ.get("LOCAL_RANK", "0"))
    if wanted >= count:
        which = f"cuda:{wanted}" if index is not None else f"the GPU of LOCAL_RANK {wanted}"
        return (f"{device!r}: {which} does not exist, this machine shows {count} GPU(s) "
                f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}; CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return None


def require_device(device: str, field: str = "run.device") -> None:
    """Raise ConfigError naming `field` if `device` is not usable here (see `device_problem`)."""
    from .config import ConfigError
    problem = device_problem(device)
    if problem is not None:
        raise ConfigError([f"{field} = {problem}"])
