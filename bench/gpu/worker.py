"""Runs units of sections of the GPU suite in this process (started by bench.gpu.suite).

    python -m bench.gpu.worker --out DIR --device cuda [--tiny] --items SECTION:UNIT,... --options JSON

Each unit's rows go to DIR/.work/SECTION.jsonl as it finishes, and its start and end to
DIR/.work/progress.jsonl, so the suite knows which unit was running if this process dies or
is stopped at its section's time limit. A Python error is recorded as the unit's row and the
next unit runs; after an error that leaves the CUDA context unusable (an illegal memory
access, a device-side assert) the process exits with code 3 and the suite starts a fresh one
for the remaining units.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from bench.gpu import SECTIONS, section_module  # noqa: E402
from bench.gpu.common import Context, Skip, error_tail, is_sticky_cuda_error  # noqa: E402

STICKY_EXIT = 3


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--items", required=True, help="comma-separated SECTION:UNIT")
    parser.add_argument("--options", default="{}", help="JSON of pass-through options")
    args = parser.parse_args(argv)
    ctx = Context(out=args.out, device=torch.device(args.device), tiny=args.tiny, options=json.loads(args.options))
    work = args.out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    progress_path = work / "progress.jsonl"
    for item in args.items.split(","):
        section, _, unit = item.partition(":")
        if section not in SECTIONS:
            raise SystemExit(f"bench.gpu.worker: unknown section {section!r} in {item!r}")
        module = section_module(section)
        _append(progress_path, {"section": section, "unit": unit, "event": "start", "time": time.time()})
        print(f"[{section}] {unit} ...", flush=True)
        start, cpu_start, sticky = time.perf_counter(), time.process_time(), False
        try:
            rows = module.run_unit(ctx, unit)
        except Skip as exc:
            rows = [{"status": "skipped", "reason": str(exc)}]
        except torch.OutOfMemoryError as exc:
            rows = [{"status": "OOM", "error": error_tail(exc)}]
        except Exception as exc:   # recorded; the next unit runs
            rows = [{"status": "error", "error": error_tail(exc)}]
            sticky = ctx.cuda and is_sticky_cuda_error(exc)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        for row in rows:
            row.setdefault("status", "ok")
            _append(work / f"{section}.jsonl",
                    {"unit": unit, "unit_s": round(seconds, 3), "unit_cpu_s": round(cpu, 3), **row})
        _append(progress_path, {"section": section, "unit": unit, "event": "end", "time": time.time()})
        print(f"[{section}] {unit}: {', '.join(sorted({str(r['status']) for r in rows}))} in {seconds:.1f} s "
              f"({cpu:.1f} s CPU)", flush=True)
        if sticky:
            print(f"[{section}] the CUDA context is unusable after this error; exiting for a fresh process", flush=True)
            return STICKY_EXIT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
