"""bench/sta_bench.py runs its tiny CPU configuration and counts attended blocks correctly."""
from __future__ import annotations

import pytest

from bench.sta_bench import main


def test_tiny_benchmark_runs_and_counts_attended_fraction(tmp_path):
    out = tmp_path / "sta.csv"
    rows = main(["--tiny", "--out", str(out)])
    assert out.is_file() and len(out.read_text().splitlines()) == len(rows) + 1
    by = {(r["backend"], r["window"]): r for r in rows}
    # canvas 2x8x8 in 1x4x4 tiles = 8 tiles of 16 tokens + 8 text tokens in one 16-token block: 9 x 9 blocks.
    # window 1x1x1: each video block attends itself and the text block, the text block attends all 9.
    assert by["flex", "1x1x1"]["fraction"] == pytest.approx((8 * 2 + 9) / 81)
    assert by["flex", "full"]["fraction"] == pytest.approx(1.0)
    for row in rows:
        assert row["fwd_ms"] > 0 and row["speedup_fwd"] > 0
    assert by["dense_sdpa", "full"]["speedup_fwd"] == 1.0
