"""python -m bench.gpu: run every section of the GPU suite, each time-boxed, and write DIR/summary.md.

    python -m bench.gpu --out DIR [--tiny] [--sections a,b] [--budget SECTION=SECONDS ...]
                        [--max-seconds 480] [--attention-backend NAME] [--grpo-weights auto|full-bf16|lora]
                        [--grpo-prompts 1] [--grpo-iterations 1] [--overwrite]

Each section runs its units in a worker process (bench.gpu.worker; on a GPU a fresh one per
section, with --tiny one for all, to import torch once) under a time budget. A unit that
fails is recorded with its traceback tail and the next one runs; a worker that dies (a
crash, a CUDA error that poisons the context) is replaced by a fresh one for the remaining
units; at the budget the worker is stopped, the running unit is recorded as a timeout, the
section's units not started as not run, and the suite goes on with the next section.
Time a section leaves unused goes to the next; model_steps, last, takes what is left of
--max-seconds (default 480 s with a GPU: the 8 minutes of a fresh-clone run on an H100/H200).

On a GPU the workers get DANCEGRPO_OPS_JIT=1 unless it is set: a CUDA extension that is not
built is compiled on first use (in the env section), so the cuda backend is measured; if that
build fails, later workers get 0 and report the cuda backend as skipped.

Written to DIR: summary.md (device, versions, date, commit, the command; a table per
section; failures), <section>.csv and <section>.json (every row), suite.json (per section:
status, seconds, budget, unit counts), logs/<section>.log (the workers' output).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.gpu import SECTIONS, section_module  # noqa: E402
from bench.gpu.common import Context  # noqa: E402

# Seconds per section on a GPU (sum 480 with model_steps' 100); --tiny: a CPU smoke run.
GPU_BUDGETS = {"env": 80, "correctness": 30, "ops_timing": 60, "sta": 45, "quickstart": 45, "grpo_iteration": 120,
               "model_steps": 100}
TINY_BUDGETS = {name: 90 for name in SECTIONS}
FAILED_STATUSES = ("error", "FAILED", "OOM", "timeout", "crashed", "not run")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tail(path: Path, chars: int = 2000) -> str:
    if not path.exists():
        return ""
    return path.read_text(errors="replace")[-chars:]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the worker this suite started, with the processes it started (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class _Section:
    """Book-keeping of one section while the scheduler runs it."""

    def __init__(self, name: str, own_budget: float):
        self.name, self.own_budget = name, own_budget
        self.units: list[str] = []
        self.extra: list[dict] = []        # rows the suite writes (timeouts, crashes, units not run)
        self.started: float | None = None  # time.time() when its first unit (or its worker) started
        self.budget: float | None = None
        self.finished: float | None = None
        self.timed_out = False


def _jit_setting(work: Path) -> str:
    """DANCEGRPO_OPS_JIT for the next worker: "1" (build the CUDA extension on first use, once;
    torch caches it), unless the env section already tried and the cuda backend is still
    missing: then "0", so that no later section spends its budget on a build that fails."""
    probe = next((r for r in _read_jsonl(work / "env.jsonl") if r.get("status") == "ok"), None)
    if probe is not None and "cuda" not in str(probe.get("ops_backends", "")).split():
        return "0"
    return "1"


def _progress(path: Path, seen: int) -> tuple[list[dict], int]:
    """Progress events appended since the first `seen` ones."""
    events = _read_jsonl(path)
    return events[seen:], len(events)


def schedule(sections: list[str], ctx: Context, budgets: dict[str, float], max_seconds: float, options: dict,
             log_dir: Path, one_worker: bool) -> list[dict]:
    """Run the sections' units in worker processes under their time budgets; one record per section.

    one_worker: all sections in one worker process (one import of torch and diffusers: --tiny
    uses it); else a fresh worker per section (a GPU run: no state carried between sections).
    A section's budget starts with its first unit (its worker's start, for the first section of
    a worker) and is its own plus what earlier sections left unused; model_steps, last, gets
    what is left of max_seconds.
    """
    work = ctx.out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    progress_path = work / "progress.jsonl"
    state = {name: _Section(name, budgets[name]) for name in sections}
    queue: list[tuple[str, str]] = []
    for name in sections:
        try:
            state[name].units = list(section_module(name).units(ctx))
        except Exception as exc:   # a section that cannot even list its units
            from bench.gpu.common import error_tail
            state[name].extra.append({"unit": "units", "status": "error", "error": error_tail(exc)})
        queue += [(name, unit) for unit in state[name].units]
    begin, carry, seen = time.time(), 0.0, 0

    def open_section(name: str, now: float) -> None:
        nonlocal carry
        sec = state[name]
        if sec.started is not None:
            return
        left = max_seconds - (now - begin)
        sec.started = now
        sec.budget = left if name == sections[-1] == "model_steps" else min(sec.own_budget + carry, left)

    def close_section(name: str, now: float) -> None:
        nonlocal carry
        sec = state[name]
        if sec.started is not None and sec.finished is None:
            sec.finished = now
            carry = max(0.0, sec.budget - (now - sec.started))

    while queue:
        now = time.time()
        if max_seconds - (now - begin) <= 1:
            for name, unit in queue:
                state[name].extra.append({"unit": unit, "status": "not run",
                                          "reason": f"the suite's --max-seconds ({max_seconds:.0f} s) was spent"})
            break
        batch = queue if one_worker else [item for item in queue if item[0] == queue[0][0]]
        cmd = [sys.executable, "-m", "bench.gpu.worker", "--out", str(ctx.out), "--device", str(ctx.device),
               "--items", ",".join(f"{name}:{unit}" for name, unit in batch), "--options", json.dumps(options),
               *(["--tiny"] if ctx.tiny else [])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                                          if p), PYTHONUNBUFFERED="1")
        if ctx.cuda and "DANCEGRPO_OPS_JIT" not in os.environ:
            env["DANCEGRPO_OPS_JIT"] = _jit_setting(work)
        log_path = log_dir / ("suite.log" if one_worker else f"{batch[0][0]}.log")
        with log_path.open("a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        print(f"bench.gpu: worker for {', '.join(dict.fromkeys(n for n, _ in batch))}", flush=True)
        open_section(batch[0][0], time.time())
        current, running, ended = batch[0][0], None, set()
        while True:
            code = proc.poll()
            events, seen = _progress(progress_path, seen)
            for event in events:
                item = (event["section"], event["unit"])
                if event["event"] == "start":
                    if event["section"] != current:
                        close_section(current, event["time"])
                        current = event["section"]
                    open_section(current, event["time"])
                    running = item
                else:
                    ended.add(item)
                    running = None if running == item else running
            sec = state[current]
            if code is None and time.time() - sec.started > sec.budget:
                _stop(proc)
                sec.timed_out = True
                if running is not None:
                    sec.extra.append({"unit": running[1], "status": "timeout",
                                      "error": f"stopped at the section's time budget ({sec.budget:.0f} s); "
                                               f"log tail:\n{_tail(log_path)}"})
                    ended.add(running)
                for name, unit in queue:
                    if name == current and (name, unit) not in ended:
                        sec.extra.append({"unit": unit, "status": "not run",
                                          "reason": "the section's time budget was spent"})
                        ended.add((name, unit))
                close_section(current, time.time())
                break
            if code is not None:
                if code != 0 and running is not None:
                    if code != 3:   # 3: the worker recorded the error itself and left for a fresh process
                        state[running[0]].extra.append({"unit": running[1], "status": "crashed", "error":
                                                        f"the worker process exited with code {code}; log tail:\n"
                                                        f"{_tail(log_path)}"})
                    ended.add(running)
                elif code != 0 and not ended:
                    # died before any unit ended (an import error): its batch will not run
                    for name, unit in batch:
                        state[name].extra.append({"unit": unit, "status": "crashed", "error":
                                                  f"the worker exited with code {code} before this unit; log tail:"
                                                  f"\n{_tail(log_path)}"})
                        ended.add((name, unit))
                if code == 0:
                    ended.update(batch)
                break
            time.sleep(0.1)
        queue = [item for item in queue if item not in ended]
        if not queue or queue[0][0] != current:
            close_section(current, time.time())
    records = []
    for name in sections:
        sec = state[name]
        rows = _read_jsonl(work / f"{name}.jsonl") + sec.extra
        order = {u: i for i, u in enumerate(sec.units)}
        rows.sort(key=lambda r: order.get(r.get("unit"), len(order)))
        statuses = [str(r.get("status")) for r in rows]
        failed = [x for x in statuses if x in FAILED_STATUSES or x.startswith("invalid")]
        good = [x for x in statuses if x in ("ok", "skipped")]
        status = ("not run" if sec.started is None else "timeout" if sec.timed_out and not good
                  else "ok" if not failed else "partial" if good else "failed")
        seconds = (sec.finished or time.time()) - sec.started if sec.started is not None else 0.0
        records.append(dict(section=name, status=status, seconds=round(seconds, 1), budget=round(sec.budget or 0),
                            rows=rows, counts={x: statuses.count(x) for x in sorted(set(statuses))}))
    return records


def write_rows(out: Path, name: str, rows: list[dict]) -> None:
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1, default=str))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()})


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def write_summary(out: Path, records: list[dict], ctx: Context, command: str, started: str, total_s: float,
                  cpu_s: float) -> str:
    env = next((r["rows"][0] for r in records if r["section"] == "env" and r["rows"]
                and r["rows"][0].get("status") == "ok"), {})
    import torch
    lines = ["# dancegrpo GPU suite" + (" (tiny sizes: a smoke run, not a measurement)" if ctx.tiny else ""), "",
             f"- Command: `{command}`",
             f"- Date: {started} (local time); total {total_s:.0f} s, CPU time of the workers {cpu_s:.0f} s",
             f"- Commit: {env.get('commit') or _git_commit()}",
             f"- Device: {env.get('device', str(ctx.device))}"
             + (f", {env['device_memory_gib']} GiB" if env.get("device_memory_gib") else ""),
             f"- torch {env.get('torch', torch.__version__)}, CUDA {env.get('cuda', torch.version.cuda or 'none')}, "
             f"cuDNN {env.get('cudnn', '-')}, Triton {env.get('triton', '-')}, diffusers {env.get('diffusers', '-')}, "
             f"Python {env.get('python', '-')}",
             f"- Fused-op backends on the device: {env.get('ops_backends', '-')}", "",
             "| section | status | seconds | budget s | units |", "|---|---|---|---|---|"]
    for r in records:
        counts = ", ".join(f"{n} {s}" for s, n in r.get("counts", {}).items())
        lines.append(f"| {r['section']} | {r['status']} | {r['seconds']} | {r['budget']} | {counts} |")
    for r in records:
        module = section_module(r["section"])
        lines += ["", f"## {module.TITLE}", "", f"Status: {r['status']} ({r['seconds']} s of {r['budget']} s). "
                  f"Rows: `{r['section']}.csv`, `{r['section']}.json`.", ""]
        try:
            lines.append(module.summarize([row for row in r["rows"]], ctx))
        except Exception as exc:   # a summary must not lose the other sections
            lines.append(f"(summary failed: {type(exc).__name__}: {exc})")
        problems = [row for row in r["rows"] if str(row.get("status")) in FAILED_STATUSES
                    or str(row.get("status")).startswith("invalid")]
        if problems:
            lines += ["", "Failures:", ""]
            for row in problems:
                detail = row.get("error") or row.get("reason") or ""
                lines.append(f"- `{row.get('unit')}`: {row.get('status')}")
                if detail:
                    lines += ["", "```", str(detail).strip()[-1500:], "```", ""]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def parse_budgets(items: list[str]) -> dict[str, float]:
    budgets = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in SECTIONS:
            raise SystemExit(f"bench.gpu: --budget {item!r}: use SECTION=SECONDS with SECTION one of "
                             f"{', '.join(SECTIONS)}")
        try:
            budgets[name] = float(value)
        except ValueError:
            raise SystemExit(f"bench.gpu: --budget {item!r}: {value!r} is not a number of seconds") from None
        if budgets[name] <= 0:
            raise SystemExit(f"bench.gpu: --budget {item!r}: the seconds must be > 0")
    return budgets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--tiny", action="store_true", help="every section at tiny sizes (runs on a CPU)")
    parser.add_argument("--device", default=None, help="default: cuda when there is a GPU, else cpu (needs --tiny)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                        help="a section's time budget (repeatable)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="the whole suite's limit (default 480 on a GPU, 900 with --tiny)")
    parser.add_argument("--attention-backend", default=None,
                        help="passed to model.options.attention_backend / bench.throughput where this checkout has it")
    parser.add_argument("--grpo-weights", default="auto", choices=["auto", "full-bf16", "lora", "full"],
                        help="(e): bf16 full fine-tune (needs ~120 GiB) or LoRA 128; auto picks by device memory")
    parser.add_argument("--grpo-prompts", type=int, default=1, help="(e): prompt groups per iteration on the GPU")
    parser.add_argument("--grpo-iterations", type=int, default=1, help="(e): iterations run (the last is reported)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    args = parser.parse_args(argv)

    import torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        parser.exit(2, "bench.gpu: no GPU here (device cpu): the full sizes (12 B-parameter models, 77 MB latents) "
                       "need one; pass --tiny for the CPU smoke run of every section\n")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.exit(2, f"bench.gpu: unknown section(s) {unknown}: choose from {', '.join(SECTIONS)}\n")
    for name, value in (("--grpo-prompts", args.grpo_prompts), ("--grpo-iterations", args.grpo_iterations)):
        if value < 1:
            parser.exit(2, f"bench.gpu: {name} = {value} must be >= 1\n")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        parser.exit(2, f"bench.gpu: {args.out} is not empty; choose a new folder or pass --overwrite\n")
    budgets = {**(TINY_BUDGETS if args.tiny else GPU_BUDGETS), **parse_budgets(args.budget)}
    max_seconds = args.max_seconds or (900.0 if args.tiny else 480.0)
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    work = args.out / ".work"
    if work.exists():
        for stale in work.iterdir():
            stale.unlink()
    options = dict(attention_backend=args.attention_backend, grpo_weights=args.grpo_weights,
                   grpo_prompts=args.grpo_prompts, grpo_iterations=args.grpo_iterations)
    ctx = Context(out=args.out, device=device, tiny=args.tiny, options=options)
    command = "python -m bench.gpu " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    begin = time.perf_counter()
    ordered = [s for s in SECTIONS if s in sections]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    records = schedule(ordered, ctx, budgets, max_seconds, options, log_dir, one_worker=args.tiny)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    for record in records:
        print(f"bench.gpu: {record['section']}: {record['status']} in {record['seconds']} s", flush=True)
        write_rows(args.out, record["section"], record["rows"])
    (args.out / "suite.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "rows"} for r in records], indent=1))
    write_summary(args.out, records, ctx, command, started, time.perf_counter() - begin, cpu)
    print(f"bench.gpu: wrote {args.out / 'summary.md'}", flush=True)
    return 0 if all(r["status"] in ("ok",) for r in records) else 1
