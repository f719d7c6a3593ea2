"""End to end: time per training iteration of our Trainer against the published loop structure.

Both run the same configuration (default configs/quickstart.yaml) on the same machine in one
process, alternating iteration by iteration: Trainer.step() and bench.reference_loop
.reference_iteration() on a second Trainer built from the same config (same initial weights,
same prompts, sample count, steps, trained steps and optimizer updates per iteration).

    python -m bench.e2e [--iterations 2] [--warmup 1] [--short] [--set key=value ...] [--csv PATH]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import REPO, RESULTS, append_csv_row, commit, device_name, load_average, today  # noqa: E402
from bench.reference_loop import reference_iteration  # noqa: E402
from dancegrpo.trainer import Trainer  # noqa: E402

FIELDS = ["config", "samples_per_iteration", "iterations", "ours_s_per_it", "reference_s_per_it", "speedup",
          "device", "load_average", "commit", "date"]


def run(config: str, iterations: int, warmup: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        common = [*overrides, "data.eval_prompts=null"]
        ours = Trainer(config, overrides=[*common, f"run.output_dir={tmp}/ours"])
        reference = Trainer(config, overrides=[*common, f"run.output_dir={tmp}/reference"])
        times = {"ours": [], "reference": []}
        for it in range(warmup + iterations):
            start = time.perf_counter()
            ours.step()
            t_ours = time.perf_counter() - start
            start = time.perf_counter()
            reference_iteration(reference, it)
            t_ref = time.perf_counter() - start
            print(f"iteration {it}{' (warm-up)' if it < warmup else ''}: ours {t_ours:.2f} s, "
                  f"reference loop {t_ref:.2f} s", flush=True)
            if it >= warmup:
                times["ours"].append(t_ours)
                times["reference"].append(t_ref)
        g = ours.cfg.grpo
        ours_s, ref_s = statistics.median(times["ours"]), statistics.median(times["reference"])
        return dict(config=Path(config).name + "".join(f" {o}" for o in overrides),
                    samples_per_iteration=g.prompts_per_iteration * g.group_size, iterations=iterations,
                    ours_s_per_it=f"{ours_s:.3f}", reference_s_per_it=f"{ref_s:.3f}", speedup=f"{ref_s / ours_s:.2f}",
                    device=device_name(ours.device), load_average=load_average(), commit=commit(), date=today())


def append_row(row: dict, path: Path = RESULTS / "e2e.csv") -> None:
    append_csv_row(path, FIELDS, row)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--iterations", type=int, default=2, help="measured iterations (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured iterations first (default 1)")
    parser.add_argument("--short", action="store_true", help="4 prompts per iteration instead of the config's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--csv", type=Path, default=RESULTS / "e2e.csv", help="CSV the row is appended to "
                        "(default bench/results/e2e.csv)")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *(["grpo.prompts_per_iteration=4"] if args.short else [])]
    row = run(args.config, args.iterations, args.warmup, overrides)
    append_row(row, args.csv)
    print(f"ours {row['ours_s_per_it']} s/it, reference loop {row['reference_s_per_it']} s/it: "
          f"{row['speedup']}x ({row['device']}, load {row['load_average']})")
    return row


if __name__ == "__main__":
    main()
