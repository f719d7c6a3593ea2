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
    # window 1x1x1: each video block attends itself and the text block, the text block attends all 9; the
    # fraction is over dense attention on the 128 + 8 real tokens.
    assert by["flex", "1x1x1"]["fraction"] == pytest.approx((8 * 2 + 9) * 16 ** 2 / 136 ** 2)
    assert by["flex", "full"]["fraction"] == pytest.approx(81 * 16 ** 2 / 136 ** 2)
    assert by["flex", "full"]["tile"] == "1x4x4"
    for row in rows:
        assert row["fwd_ms"] > 0 and row["speedup_fwd"] > 0
    assert by["dense_sdpa", "full"]["speedup_fwd"] == 1.0


def test_plan_table_hand_worked_recipe_canvas(capsys):
    """14x30x30 + 256 text, window 1x3x3, worked by hand.

    6x8x8: grid 3x4x4, 3 blocks of 128 per tile; the last time tile covers t = 12..17, so only its first block
    (t = 12, 13) is real: 112 real video blocks + 2 text blocks. A video query block in time tiles 0-1 (96 of
    them) attends 9 tiles x 3 blocks + 2 text = 29, one in time tile 2 (16) attends 9 x 1 + 2 = 11, a text block
    attends all 114: 2784 + 176 + 228 = 3188 blocks of 128^2 pairs.
    auto (2x10x16): grid 7x3x2, 5 blocks of 64 per tile, all real, 4 text blocks; 1x3x3 covers h and w whole:
    210 video blocks x (6 tiles x 5 + 4) + 4 text blocks x 214 = 7996 blocks of 64^2 pairs.
    """
    from bench.sta_plan_table import main as table
    rows = table(["--canvases", "14x30x30", "--windows", "1x3x3"])
    paper, auto, same_span = rows
    dense = (12600 + 256) ** 2
    assert (paper["tile"], paper["video tokens run"], paper["attended blocks"]) == ("6x8x8", 18432, 3188)
    assert paper["pairs / dense N^2"] == f"{3188 * 128 ** 2 / dense:.3f}"
    assert (auto["tile"], auto["video tokens run"], auto["attended blocks"]) == ("2x10x16", 13440, 7996)
    assert auto["pairs / dense N^2"] == f"{7996 * 64 ** 2 / dense:.3f}" and auto["padding"] == "+6.7%"
    # the 6x24x24-token span of 1x3x3 in 6x8x8 tiles needs 3x3x3 tiles of 2x10x16 (h and w whole)
    assert same_span["window (tiles)"] == "3x3x3" and same_span["window span (tokens)"] == "6x30x32"
    assert "| 14x30x30 | auto | 2x10x16 | 64 | 13440 |" in capsys.readouterr().out
