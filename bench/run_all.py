"""Run the whole benchmark suite and write a markdown summary.

    python -m bench [--short] [--skip-ops] [--skip-e2e] [--e2e-iterations N]

Steps: the op benchmarks (bench/test_bench_ops.py, rows appended to bench/results/ops.csv),
one plot per op (bench/plot.py), the end-to-end comparison (bench/e2e.py, a row in
bench/results/e2e.csv), then bench/results/summary.md with this run's numbers, the
machine, the commit, the date and the load average before and after (other jobs on the
machine slow everything down; compare ratios, and only between runs on the same device).
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import e2e, plot  # noqa: E402
from bench.machine import REPO, RESULTS, commit, load_average, today  # noqa: E402

OPS_CSV = RESULTS / "ops.csv"


def _rows_after(path: Path, skip: int) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))[skip:]


def _row_count(path: Path) -> int:
    return len(_rows_after(path, 0))


def run_ops(short: bool) -> list[dict]:
    before = _row_count(OPS_CSV)
    env = dict(os.environ, DANCEGRPO_BENCH_SHORT="1" if short else "0", DANCEGRPO_BENCH_CSV=str(OPS_CSV))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           str(REPO / "bench" / "test_bench_ops.py")]
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return _rows_after(OPS_CSV, before)


def _latest_run(rows: list[dict]) -> list[dict]:
    """Rows of the newest date in the file (others may commit in between, so not by commit)."""
    if not rows:
        return []
    newest = max(r.get("date", "") for r in rows)
    return [r for r in rows if r.get("date", "") == newest]


def ops_table(rows: list[dict]) -> str:
    """One line per (op, mode, shape, dtype): median ms per backend, speed-up over torch, GB/s."""
    grouped: dict[tuple, dict[str, dict]] = defaultdict(dict)
    backends: list[str] = []
    for r in rows:
        grouped[(r["op"], r["mode"], r["shape"], r["dtype"])][r["backend"]] = r
        if r["backend"] not in backends:
            backends.append(r["backend"])
    others = [b for b in backends if b != "torch"]
    head = ["op", "mode", "shape", "dtype", *[f"{b} ms" for b in backends],
            *[f"{b} vs torch" for b in others], *[f"{b} GB/s" for b in others]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, mode, shape, dtype), by_backend in grouped.items():
        ms = [f"{float(by_backend[b]['p50_s']) * 1e3:.3f}" if b in by_backend else "" for b in backends]
        torch_s = float(by_backend["torch"]["p50_s"]) if "torch" in by_backend else None
        speed = [f"{torch_s / float(by_backend[b]['p50_s']):.1f}x" if torch_s and b in by_backend else ""
                 for b in others]
        gbs = [by_backend[b]["gb_per_s"] if b in by_backend else "" for b in others]
        lines.append("| " + " | ".join([op, mode, shape, dtype, *ms, *speed, *gbs]) + " |")
    return "\n".join(lines)


def e2e_table(rows: list[dict]) -> str:
    lines = ["| config | samples/iteration | device | load average | ours s/it | reference loop s/it | speed-up |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['samples_per_iteration']} | {r['device']} | {r['load_average']} | "
              f"{r['ours_s_per_it']} | {r['reference_s_per_it']} | {r['speedup']}x |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="small sizes, few rounds, 4 prompts end to end")
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--e2e-iterations", type=int, default=2)
    parser.add_argument("--e2e-short", action="store_true", help="4 prompts per iteration end to end")
    args = parser.parse_args(argv)

    load_before = load_average()
    sections = []
    # A skipped part is summarised from its newest stored results, so the suite can run in pieces.
    ops_rows = _latest_run(plot.latest_rows(OPS_CSV)) if args.skip_ops and OPS_CSV.exists() else (
        [] if args.skip_ops else run_ops(args.short))
    if ops_rows:
        plot.main(["--csv", str(OPS_CSV), "--out", str(RESULTS)])
        sections += ["## Fused ops (median time per call)", "", ops_table(ops_rows), "",
                     "Plots: `bench/results/sde_step.png`, `bench/results/clipped_loss.png`. GB/s counts the bytes "
                     "the fused kernel moves (same numerator for every backend).", ""]
    e2e_rows = []
    if not args.skip_e2e:
        e2e_rows = [e2e.main(["--iterations", str(args.e2e_iterations),
                              *(["--short"] if args.short or args.e2e_short else [])])]
    elif (RESULTS / "e2e.csv").exists():
        e2e_rows = _latest_run(_rows_after(RESULTS / "e2e.csv", 0))
    if e2e_rows:
        sections += ["## End to end (time per training iteration)", "", e2e_table(e2e_rows), "",
                     "Reference loop: the published implementation's structure on the same model, config and "
                     "machine (bench/README.md).", ""]
    device = ops_rows[0]["device"] if ops_rows else (e2e_rows[0]["device"] if e2e_rows else "")
    header = [f"# Benchmark summary ({'short' if args.short else 'full'} run)", "",
              f"Device: {device}. Date: {today()}. Summary written at commit {commit()} (ops.csv and e2e.csv "
              "record the commit of each measurement). "
              f"Load average (1/5/15 min) before: {load_before}; after: {load_average()}.", ""]
    text = "\n".join(header + sections)
    (RESULTS / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
