"""What every section of the GPU suite shares: the run context, timing, and row helpers."""
from __future__ import annotations

import math
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Context:
    """One worker's view of the run: where results go, which device, which sizes."""

    out: Path                  # the suite's output folder (DIR of --out)
    device: torch.device       # cuda when there is a GPU, else cpu
    tiny: bool                 # tiny sizes (the CPU smoke run of tests/test_bench_gpu.py)
    options: dict = field(default_factory=dict)   # pass-through options of the command line

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


class Skip(Exception):
    """Raised by a unit that cannot run here (a backend not built, no GPU): recorded as skipped."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, tiny: bool = False) -> float:
    """Median milliseconds per call of fn.

    GPU: triton.testing.do_bench (it flushes the L2 cache between calls and times with CUDA
    events; warm-up 25 ms, 100 ms of repetitions). CPU: a perf_counter timer, median of the
    calls after two warm-up calls (5 calls with tiny sizes, else as many as fit in 0.2 s, 5 to 50).
    """
    if device.type == "cuda":
        from triton.testing import do_bench
        try:
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except TypeError:   # a Triton without return_mode
            return float(do_bench(fn, warmup=25, rep=100, quantiles=[0.5]))
    fn()
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    calls = 5 if tiny else max(5, min(50, int(0.2 / max(once, 1e-6))))
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def error_tail(exc: BaseException, chars: int = 1500) -> str:
    """The last `chars` characters of an exception's traceback."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return text[-chars:]


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """Errors after which the CUDA context is unusable: the worker must restart."""
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("illegal memory access", "CUDA error", "CUBLAS_STATUS", "cuDNN error",
                                   "device-side assert", "unspecified launch failure", "AcceleratorError"))


def fmt(value, digits: int = 4) -> str:
    """A table cell: floats to `digits` significant digits, None/NaN as a dash."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str], headers: list[str] | None = None) -> str:
    """A markdown table of `columns` of `rows` (missing cells as a dash)."""
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
