"""pytest-benchmark glue: each benchmark appends one row to bench/results/ops.csv.

Columns: op, backend, mode, shape, dtype, p20_s, p50_s, p80_s, gb_per_s, device, commit, date.
Throughput counts the bytes the fused kernel has to move (the same number for every backend,
so the columns compare directly). DANCEGRPO_BENCH_SHORT=1 keeps to small sizes and few rounds.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import RESULTS, append_csv_row, commit, device_name, today  # noqa: E402

CSV_PATH = Path(os.environ.get("DANCEGRPO_BENCH_CSV", RESULTS / "ops.csv"))
FIELDS = ["op", "backend", "mode", "shape", "dtype", "p20_s", "p50_s", "p80_s", "gb_per_s", "device", "commit", "date"]
SHORT = os.environ.get("DANCEGRPO_BENCH_SHORT", "0") == "1"


def _quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


@pytest.fixture
def record(benchmark):
    """record(fn, op=..., backend=..., mode=..., shape=..., dtype=..., nbytes=..., device=...)."""

    def run(fn, *, op, backend, mode, shape, dtype, nbytes, device):
        rounds = 5 if SHORT else 20
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=2, iterations=1)
        times = list(benchmark.stats.stats.data)
        p20, p50, p80 = (_quantile(times, q) for q in (0.2, 0.5, 0.8))
        row = dict(op=op, backend=backend, mode=mode, shape="x".join(map(str, shape)), dtype=str(dtype).split(".")[-1],
                   p20_s=f"{p20:.6g}", p50_s=f"{p50:.6g}", p80_s=f"{p80:.6g}", gb_per_s=f"{nbytes / p50 / 1e9:.3f}",
                   device=device_name(torch.device(device)), commit=commit(), date=today())
        append_csv_row(CSV_PATH, FIELDS, row)
        return row

    return run
