"""One figure per op from bench/results/ops.csv: median time per shape, a bar per backend/mode/dtype.

    python bench/plot.py [--csv bench/results/ops.csv] [--out bench/results]
Only the newest row of each (op, backend, mode, shape, dtype, device) is drawn.
"""
from __future__ import annotations

import argparse
import csv
from collections import OrderedDict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def latest_rows(path: Path) -> list[dict]:
    rows: "OrderedDict[tuple, dict]" = OrderedDict()
    with path.open() as f:
        for row in csv.DictReader(f):
            key = (row["op"], row["backend"], row["mode"], row["shape"], row["dtype"], row["device"])
            rows.pop(key, None)
            rows[key] = row
    return list(rows.values())


def plot_op(op: str, rows: list[dict], out_dir: Path) -> Path:
    shapes = list(OrderedDict.fromkeys(r["shape"] for r in rows))
    series = list(OrderedDict.fromkeys((r["backend"], r["mode"], r["dtype"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(shapes) + 2), 4.5))
    width = 0.8 / max(1, len(series))
    for k, (backend, mode, dtype) in enumerate(series):
        times = {r["shape"]: float(r["p50_s"]) * 1e3 for r in rows
                 if (r["backend"], r["mode"], r["dtype"]) == (backend, mode, dtype)}
        xs = [i + k * width for i, s in enumerate(shapes) if s in times]
        ax.bar(xs, [times[s] for s in shapes if s in times], width, label=f"{backend} {mode} {dtype}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log scale)")
    ax.set_title(f"{op} on {rows[0]['device']}, {rows[0]['date']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = out_dir / f"{op}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=RESULTS / "ops.csv")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = latest_rows(args.csv)
    written = [plot_op(op, [r for r in rows if r["op"] == op], args.out)
               for op in OrderedDict.fromkeys(r["op"] for r in rows)]
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
