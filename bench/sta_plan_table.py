"""Padded tokens and attended work of sliding-tile attention per canvas, window and tile: pure
arithmetic from the kernel plan (dancegrpo.attention.sta.kernel_plan), no timing, any machine.

    python -m bench.sta_plan_table                     # the table of bench/STA.md (markdown on stdout)
    python -m bench.sta_plan_table --canvases 14x30x30 --windows 1x3x3 --text 256

Per canvas (video tokens after patchify) and window, three rows:
- "6x8x8": the STA paper's tile, the window in tiles as given;
- "auto": `tile: auto` (dancegrpo.attention.sta_mask.auto_tile), the same window in tiles (so a
  different span in tokens);
- "auto, same span": `tile: auto` with the window converted from the span in tokens the
  window has with 6x8x8 (`window_for_extent`), i.e. `window_unit: tokens`.
Columns: the tile and kernel block; the video tokens the kernel runs on (padded to whole
tiles) and the padding over the real tokens; the window in tiles and its span in tokens
(capped at the padded canvas); attended blocks (query block x key block pairs the kernel
computes, fully padded blocks skipped, text included); attended (query, key) pairs = blocks x
block^2 in millions; and those pairs over the N^2 pairs dense attention computes on the real
N = video + text tokens (< 1 is less work than dense; it is not a speed-up, which also
depends on the kernel's efficiency: bench/STA.md).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dancegrpo.attention.sta import kernel_plan  # noqa: E402
from dancegrpo.attention.sta_mask import DEFAULT_TILE, auto_tile, window_for_extent  # noqa: E402

CANVASES = ["14x30x30", "30x48x80", "14x25x40"]
CANVAS_NOTES = {"14x30x30": "HunyuanVideo 480x480x53 (recipe)", "30x48x80": "720p, 117 frames",
                "14x25x40": "SkyReels-I2V 400x640x53 (recipe)"}
WINDOWS = ["1x3x3", "3x3x3", "3x5x5"]
COLUMNS = ["canvas", "tile choice", "tile", "block", "video tokens run", "padding", "window (tiles)",
           "window span (tokens)", "attended blocks", "attended pairs (M)", "pairs / dense N^2"]


def triple(text: str) -> tuple[int, int, int]:
    values = tuple(int(x) for x in text.split("x"))
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not TxHxW with positive integers")
    return values  # type: ignore[return-value]


def fmt(values) -> str:
    return "x".join(str(v) for v in values)


def plan_row(canvas, window, tile, text_tokens: int, choice: str) -> dict:
    """One table row: the kernel plan's padding and attended work for (canvas, window in tiles, tile)."""
    plan = kernel_plan(canvas, window, tile, text_tokens)
    grid = plan.mask.layout.grid
    real = math.prod(canvas)
    span = [min(w, g) * t for w, g, t in zip(window, grid, plan.tile)]
    dense = (real + text_tokens) ** 2
    return {"canvas": fmt(canvas), "tile choice": choice, "tile": fmt(plan.tile), "block": plan.block,
            "video tokens run": plan.video_padded, "padding": f"{plan.video_padded / real - 1:+.1%}",
            "window (tiles)": fmt(window), "window span (tokens)": fmt(span),
            "attended blocks": plan.attended_blocks, "attended pairs (M)": f"{plan.attended_pairs / 1e6:.1f}",
            "pairs / dense N^2": f"{plan.attended_pairs / dense:.3f}"}


def rows_for(canvas, window, text_tokens: int) -> list[dict]:
    tile = auto_tile(canvas)
    span = [w * t for w, t in zip(window, DEFAULT_TILE)]
    return [plan_row(canvas, window, DEFAULT_TILE, text_tokens, "6x8x8"),
            plan_row(canvas, window, tile, text_tokens, "auto"),
            plan_row(canvas, window_for_extent(span, tile), tile, text_tokens, "auto, same span")]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canvases", nargs="+", type=triple, default=[triple(c) for c in CANVASES])
    parser.add_argument("--windows", nargs="+", type=triple, default=[triple(w) for w in WINDOWS])
    parser.add_argument("--text", type=int, default=256, help="text tokens (HunyuanVideo's prompt cache: 256)")
    args = parser.parse_args(argv)
    if args.text < 0:
        parser.error(f"--text {args.text} must be >= 0")
    rows = [row for canvas in args.canvases for window in args.windows for row in rows_for(canvas, window, args.text)]
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
