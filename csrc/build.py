"""What the C++/CUDA extensions are built from: sources, flags and a source hash.

Loaded by path (not imported as a package) from setup.py, which builds the extensions ahead
of time, and from dancegrpo/ops/extension.py, which can build them just in time from a
source checkout. Keeping one description avoids the two builds drifting apart.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent
INCLUDE_DIRS = [str(CSRC / "include")]

CPU_EXTENSION = "dancegrpo._ops_cpu"
CUDA_EXTENSION = "dancegrpo._ops_cuda"


def cpu_sources() -> list[Path]:
    return sorted((CSRC / "cpu").glob("*.cpp"))


def cuda_sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))


def _hashed_files(kind: str) -> list[Path]:
    folder = CSRC / kind
    return sorted(CSRC.glob("include/**/*.h")) + sorted(folder.glob("*.h")) + sorted(folder.glob("*.cuh")) + (
        cpu_sources() if kind == "cpu" else cuda_sources())


def source_hash(kind: str) -> int:
    """63-bit hash of the headers and sources of the `kind` ("cpu" or "cuda") extension.

    Compiled into the extension, so a stale build (sources edited after it) can be detected.
    """
    digest = hashlib.sha256()
    for path in _hashed_files(kind):
        digest.update(path.relative_to(CSRC).as_posix().encode())
        digest.update(path.read_bytes())
    return int(digest.hexdigest()[:16], 16) & ((1 << 63) - 1)


def openmp_flags() -> list[str]:
    # GCC and Linux clang take -fopenmp; Apple clang has no OpenMP by default, so build without
    # it there (the loops stay vectorised, just single-threaded).
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def cpu_compile_args() -> list[str]:
    # -ffp-contract=off: no fused multiply-add contraction, so the step mean rounds identically
    # in the rollout and training kernels (bit-identical log-probs, ratio exactly 1).
    return ["-O3", "-ffp-contract=off", f"-DDANCEGRPO_SOURCE_HASH={source_hash('cpu')}ULL", *openmp_flags()]


def cpu_link_args() -> list[str]:
    return openmp_flags()


def cuda_compile_args() -> dict[str, list[str]]:
    define = f"-DDANCEGRPO_SOURCE_HASH={source_hash('cuda')}ULL"
    return {"cxx": ["-O3", define], "nvcc": ["-O3", "--fmad=true", define, "-lineinfo"]}
