"""Joining the process group under torchrun, restart-safe.

torchrun (elastic) keeps one key-value store for the whole job: after a failure it restarts
every worker against the same store, where the previous attempt's keys (the gloo/NCCL
addresses of its now dead ranks) are still present. A restarted rank that read such a stale
address would hang or fail to connect. Each attempt therefore keys its process group under
its own prefix, from TORCHELASTIC_RESTART_COUNT.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .mesh import init_distributed


def launched_world_size() -> int:
    """The number of processes of this job: torchrun's WORLD_SIZE, 1 without torchrun."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(backend: str | None = None) -> None:
    """Join the default process group from torchrun's environment (no-op if already joined).

    backend: None picks nccl with CUDA, else gloo. Without TORCHELASTIC_RESTART_COUNT (a plain
    environment, e.g. tests) this is `mesh.init_distributed`.
    """
    if dist.is_initialized():
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        init_distributed(backend)
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"dancegrpo/attempt_{attempt}", store)
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), store=store,
                            rank=rank, world_size=world_size)
