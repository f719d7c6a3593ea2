"""Per-call cost of the fused SDE step on the CPU, through the public dispatcher, against the
plain eager formula: the host overhead a small latent exposes, and the kernel speed-up at a
real latent size. Everything runs in one process, interleaved round by round, and medians
are reported, so a loaded machine slows all contenders alike (ratios are what to read).

    OMP_NUM_THREADS=1 python -m bench.ops_overhead                  # both sizes, 15 rounds, 1 thread
    OMP_NUM_THREADS=1 python -m bench.ops_overhead --rounds 3 --out /tmp/overhead.json

Contenders, rollout mode (sample the next latent and score it) unless named "train":
  eager          the plain formula on tensors, schedule as Python floats (the "torch eager"
                 of issue 14's GPU table): mean, std, next, log-prob, in torch ops
  eager_sampler  the unfused trainer path: sampler.mean_std + sde.sde_step_with_log_prob
  fused[B]       ops.fused_sde_step(..., backend=B) with float schedule values
  sampler[B]     ops.sampler_step(sampler, ..., backend=B): the rollout's call
  train ...      the same for the training step: log-prob of a recorded action, forward + backward
Goals (issue 14): every fused/sampler contender at (2, 4, 8, 8) no slower than `eager`, and
the C++ backend at least 10x `eager` at 8x16x90x90 on one thread.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

from dancegrpo import ops, sde
from dancegrpo.sampler import FlowSampler

SIGMA, SIGMA_NEXT, ETA = 0.7, 0.62, 0.7
SMALL, LARGE = (2, 4, 8, 8), (8, 16, 90, 90)


def _eager_mean_std(v, x, s, s_next, eta):
    """Mean and std of the DanceGRPO step written out in torch ops (float schedule)."""
    ds = s_next - s
    x0 = x - s * v
    score = -(x - (1 - s) * x0) / s**2
    return x + ds * v + (-0.5 * eta**2 * score) * ds, eta * math.sqrt(s - s_next)


def _eager_mean_log_prob(sample, mean, std):
    return (-((sample - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)


def eager_rollout(v, x, noise, s, s_next, eta):
    """The DanceGRPO step and its mean log-prob written out in torch ops (float schedule)."""
    mean, std = _eager_mean_std(v, x, s, s_next, eta)
    nxt = mean + std * noise
    return nxt, _eager_mean_log_prob(nxt, mean, std)


def eager_log_prob(v, x, prev, s, s_next, eta):
    mean, std = _eager_mean_std(v, x, s, s_next, eta)
    return _eager_mean_log_prob(prev, mean, std)


def contenders(shape, backends, train: bool):
    gen = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(shape, generator=gen, device="cpu") for _ in range(3))
    sampler = FlowSampler(10, 3.0, ETA)
    step = torch.full((shape[0],), 3, dtype=torch.long)
    sched = dict(sigma=SIGMA, sigma_next=SIGMA_NEXT, eta=ETA)
    fns = {}
    if not train:
        fns["eager"] = lambda: eager_rollout(v, x, noise, SIGMA, SIGMA_NEXT, ETA)
        fns["eager_sampler"] = lambda: sde.sde_step_with_log_prob(*sampler.mean_std(v, x, step), noise=noise)
        for b in backends:
            fns[f"fused[{b}]"] = lambda b=b: ops.fused_sde_step(v, x, noise=noise, backend=b, **sched)
            fns[f"sampler[{b}]"] = lambda b=b: ops.sampler_step(sampler, v, x, step, noise=noise, backend=b)
        return fns
    prev = eager_rollout(v, x, noise, SIGMA, SIGMA_NEXT, ETA)[0]
    v_grad = v.clone().requires_grad_()
    weights = torch.ones(shape[0])

    def run(log_prob_fn):
        v_grad.grad = None
        log_prob_fn().backward(weights)

    fns["train eager"] = lambda: run(lambda: eager_log_prob(v_grad, x, prev, SIGMA, SIGMA_NEXT, ETA))
    for b in backends:
        fns[f"train fused[{b}]"] = lambda b=b: run(
            lambda: ops.fused_sde_step(v_grad, x, prev_sample=prev, backend=b, **sched).log_prob)
        fns[f"train sampler[{b}]"] = lambda b=b: run(
            lambda: ops.sampler_step(sampler, v_grad, x, step, prev_sample=prev, backend=b).log_prob)
    return fns


def interleaved_medians(fns: dict, rounds: int, target_s: float) -> dict[str, float]:
    """Median seconds per call of each function; every round runs all of them, in a rotated order."""
    for fn in fns.values():  # warm-up: builds, caches, first-call costs
        fn()
        fn()
    number = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        number[name] = max(1, int(target_s / once))
    names = list(fns)
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = fns[name], number[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(values) for name, values in samples.items()}


def run(rounds: int = 15, target_s: float = 0.02, sizes=(SMALL, LARGE)) -> list[dict]:
    ops.build_cpu_extension()
    backends = [b for b in ("torch", "cpp") if b in ops.available_backends("cpu")]
    rows = []
    for shape in sizes:
        # At the large size only what the goal names: the C++ kernels against the eager formula.
        for train in (False, True):
            fns = contenders(shape, backends if shape == SMALL else ["cpp"], train)
            if shape != SMALL:
                fns = {k: f for k, f in fns.items() if "sampler[" not in k and k != "eager_sampler"}
            with torch.set_grad_enabled(train):
                medians = interleaved_medians(fns, rounds, target_s)
            base = medians["train eager" if train else "eager"]
            for name, seconds in medians.items():
                rows.append(dict(shape="x".join(map(str, shape)), contender=name, us_per_call=seconds * 1e6,
                                 eager_over_this=base / seconds))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median over them)")
    parser.add_argument("--target-ms", type=float, default=20.0, help="time of one contender in one round")
    parser.add_argument("--small-only", action="store_true", help="only the (2, 4, 8, 8) latent")
    parser.add_argument("--threads", type=int, default=1, help="torch (and OpenMP) threads")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.target_ms <= 0 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1 and --target-ms > 0")
    torch.set_num_threads(args.threads)
    sizes = (SMALL,) if args.small_only else (SMALL, LARGE)
    rows = run(args.rounds, args.target_ms / 1e3, sizes)
    print(f"# fused SDE step per call, CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {args.rounds} interleaved rounds, medians")
    print(f"{'latent':>12}  {'contender':<22} {'us/call':>10} {'eager / this':>13}")
    for row in rows:
        print(f"{row['shape']:>12}  {row['contender']:<22} {row['us_per_call']:>10.1f} {row['eager_over_this']:>12.2f}x")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(threads=torch.get_num_threads(), torch=torch.__version__, rounds=args.rounds, rows=rows),
                      fh, indent=1)


if __name__ == "__main__":
    main()
