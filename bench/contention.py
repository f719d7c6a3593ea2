"""CPU contention: quickstart iteration time with and without another process spinning on a core.

Each setting runs in a fresh process (the OpenMP wait policy is read when torch loads) for
`--iterations` trainer iterations of the quickstart recipe (after one warm-up), once on a quiet
machine and once with `--spinners` background processes that each busy-loop on one core. The
table gives the median seconds per iteration and the slowdown under load; with the machine's
cores split between the run and the spinners, a run that degrades in proportion to the cores
it gets slows down by about cores / (cores - spinners).

    python -m bench.contention [--iterations 4] [--spinners 1] [--out bench/results/contention.md]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import commit, cpu_model, load_average, today  # noqa: E402

SETTINGS = {  # name: (run.num_threads, OMP_WAIT_POLICY or None for libgomp's default)
    "2 threads, default wait": ("2", None),
    "2 threads, passive wait": ("2", "PASSIVE"),
    "auto, default wait": ("auto", None),
    "auto, passive wait": ("auto", "PASSIVE"),
}

_CHILD = r"""
import json, sys, time
from dancegrpo.trainer import Trainer
threads, out, iterations, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
t = Trainer("configs/quickstart.yaml", overrides=[f"run.num_threads={threads}", f"run.output_dir={out}",
            "data.eval_prompts=null", f"grpo.prompts_per_iteration={prompts}"])
times, threads_used = [], []
for it in range(iterations + 1):
    start = time.perf_counter()
    m = t.step()
    if it:
        times.append(time.perf_counter() - start)
        threads_used.append(m.get("cpu/threads"))
print("RESULT " + json.dumps({"times": times, "threads": threads_used}))
"""


def _spin() -> None:
    while True:
        pass


def run_setting(threads: str, wait: str | None, iterations: int, prompts: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    if wait:
        env["OMP_WAIT_POLICY"] = wait
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", _CHILD, threads, tmp, str(iterations), str(prompts)],
                             cwd=repo, env=env, capture_output=True, text=True, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--spinners", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16, help="grpo.prompts_per_iteration")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.spinners < 1 or args.prompts < 1:
        parser.error("--iterations, --spinners and --prompts must be >= 1")
    rows = []
    for name, (threads, wait) in SETTINGS.items():
        quiet = run_setting(threads, wait, args.iterations, args.prompts)
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.spinners)]
        for p in spinners:
            p.start()
        time.sleep(0.5)
        try:
            loaded = run_setting(threads, wait, args.iterations, args.prompts)
        finally:
            for p in spinners:
                p.terminate()
                p.join()
        q, l = statistics.median(quiet["times"]), statistics.median(loaded["times"])
        rows.append(f"| {name} | {q:.2f} | {l:.2f} | {l / q:.2f}x | {loaded['threads']} |")
        print(rows[-1], flush=True)
    cores = len(os.sched_getaffinity(0))
    table = "\n".join([
        f"CPU contention, quickstart recipe ({args.prompts} prompts x 8 samples per iteration), median of "
        f"{args.iterations} iterations after one warm-up; {cpu_model()}, {cores} cores, {args.spinners} busy-loop "
        f"process(es) under load; load average before: {load_average()}; commit {commit()}, {today()}.",
        f"Proportional slowdown would be {cores / max(1, cores - args.spinners):.2f}x.",
        f"Command: `python -m bench.contention --iterations {args.iterations} --spinners {args.spinners} "
        f"--prompts {args.prompts}`",
        "",
        "| setting | quiet s/it | loaded s/it | slowdown | threads used under load |",
        "|---|---|---|---|---|",
        *rows, ""])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
