"""Seeds of a run: one independent, reproducible stream per purpose.

Every random draw of an iteration comes from generators seeded by (run.seed, purpose, iteration,
...), so a resumed run repeats exactly what an uninterrupted one would have done, whatever the
number of processes.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from the run seed and labels (any reprs); independent streams per purpose."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_generator(device: torch.device, seed: int, *keys) -> torch.Generator:
    """A generator on `device` (a CUDA generator draws on the GPU) seeded by `derive_seed(seed, *keys)`."""
    return torch.Generator(device).manual_seed(derive_seed(seed, *keys))


def seed_global_rngs(seed: int) -> None:
    """Seed every global RNG a run does not own: torch (CPU and every CUDA device), Python's
    `random` and NumPy's legacy global state. They are what peft's LoRA initialisation, dropout
    and user rewards (`torch.rand`, `random.random`, `np.random`) draw from."""
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
