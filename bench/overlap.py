"""Reward scoring overlapped with sampling: seconds per iteration with trainer.overlap_rewards off and on.

Two Trainers built from the same config (same weights, prompts and seeds) run in one
process, alternating iteration by iteration so that both see the same machine load. The
two must produce identical rewards each iteration (checked); only the time may differ.

`--reward-delay S` adds S seconds per sample to every reward call, a wait that holds no
CPU and no GIL: it stands for a reward model that is slow on other hardware (a larger
model, a reward server), the case overlapping is for.

    python -m bench.overlap [--config configs/quickstart.yaml] [--iterations 3] [--warmup 1]
                            [--reward-delay 0] [--set key=value ...] [--out bench/results/overlap_cpu_<date>.md]
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import commit, device_name, load_average, today  # noqa: E402
from dancegrpo.config import load_config  # noqa: E402
from dancegrpo.rewards import build_reward  # noqa: E402
from dancegrpo.trainer import Trainer  # noqa: E402

PHASES = ("time/rollout", "time/reward", "time/update")
MODES = ("off", "on")


def delayed(fn, seconds_per_sample: float):
    """`fn` after a wait of `seconds_per_sample` per sample (no CPU, GIL released)."""
    def reward(images, prompts):
        time.sleep(seconds_per_sample * len(prompts))
        return fn(images, prompts)
    return reward


def run(config: str, iterations: int, warmup: int, overrides: list[str], reward_delay: float = 0.0) -> dict:
    """Per mode: the list of measured iterations, each {"total": s, "time/rollout": s, ...}."""
    measured: dict[str, list[dict]] = {mode: [] for mode in MODES}
    rewards = None
    if reward_delay:
        rewards = {rc.name: delayed(build_reward(rc.name, rc.options), reward_delay)
                   for rc in load_config(config, overrides).rewards}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {mode: Trainer(config, rewards=rewards,
                                  overrides=[*overrides, "data.eval_prompts=null",
                                             f"trainer.overlap_rewards={mode == 'on'}",
                                             f"run.output_dir={tmp}/{mode}"])
                    for mode in MODES}
        for it in range(warmup + iterations):
            rewards = {}
            for mode, trainer in trainers.items():
                start = time.perf_counter()
                metrics = trainer.step()
                total = time.perf_counter() - start
                rewards[mode] = {k: v for k, v in metrics.items() if k.startswith("reward/")}
                if it >= warmup:
                    measured[mode].append({"total": total, **{k: metrics[k] for k in PHASES}})
                print(f"iteration {it}{' (warm-up)' if it < warmup else ''}, overlap {mode}: {total:.2f} s "
                      f"(rollout {metrics['time/rollout']:.2f}, reward {metrics['time/reward']:.2f}, "
                      f"update {metrics['time/update']:.2f})", flush=True)
            if rewards["off"] != rewards["on"]:
                raise AssertionError(f"iteration {it}: overlap changed the rewards: {rewards}")
        g = trainers["off"].cfg.grpo
        info = dict(samples=g.prompts_per_iteration * g.group_size,
                    chunks=-(-g.prompts_per_iteration * g.group_size // trainers["off"].cfg.trainer.micro_batch_size),
                    device=device_name(trainers["off"].device))
    return {"measured": measured, "reward_delay": reward_delay, **info}


def markdown(result: dict, command: str, config: str, overrides: list[str]) -> str:
    med = {mode: {key: statistics.median(row[key] for row in result["measured"][mode])
                  for key in ("total", *PHASES)} for mode in MODES}
    n = len(result["measured"]["off"])
    lines = [
        f"# Reward scoring overlapped with sampling, {today()}",
        "",
        f"Command: `{command}`",
        "",
        f"Config: `{config}`{''.join(f' `{o}`' for o in overrides)}; {result['samples']} samples per iteration "
        f"in {result['chunks']} rollout chunks. Device: {result['device']}. Load average at the end: "
        f"{load_average()}. Commit {commit()}.",
        *(["", f"Every reward call waits {result['reward_delay']} s per sample first (a slow reward model "
               "elsewhere, simulated: no CPU, GIL released)."] if result["reward_delay"] else []),
        "",
        f"Median over {n} measured iterations (the two modes alternate iteration by iteration; "
        "rewards were identical in every iteration). With overlap on, `reward` is only the wait for "
        "the chunks still being scored after the rollout; the scoring itself runs inside `rollout`.",
        "",
        "| overlap | s/iteration | rollout s | reward s | update s | rollout + reward s |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        m = med[mode]
        lines.append(f"| {mode} | {m['total']:.2f} | {m['time/rollout']:.2f} | {m['time/reward']:.2f} | "
                     f"{m['time/update']:.2f} | {m['time/rollout'] + m['time/reward']:.2f} |")
    gain = med["off"]["total"] / med["on"]["total"]
    share = med["off"]["time/reward"] / med["off"]["total"]
    lines += ["", f"Speed-up of a whole iteration (off / on): {gain:.3f}x. Decoding and scoring take "
              f"{med['off']['time/reward']:.3f} s of the synchronous iteration ({100 * share:.1f}%): the most "
              "that overlapping can save.", "",
              "Per iteration (s): " + "; ".join(
                  f"{mode}: " + ", ".join(f"{row['total']:.2f}" for row in result["measured"][mode]) for mode in MODES),
              ""]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--iterations", type=int, default=3, help="measured iterations per mode (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured iterations first (default 1)")
    parser.add_argument("--reward-delay", type=float, default=0.0, metavar="S",
                        help="seconds per sample added to each reward call (a simulated slow reward; default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    result = run(args.config, args.iterations, args.warmup, args.overrides, args.reward_delay)
    given = argv if argv is not None else sys.argv[1:]
    command = "python -m bench.overlap " + " ".join(shlex.quote(a) for a in given)
    text = markdown(result, command.strip(), args.config, args.overrides)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
