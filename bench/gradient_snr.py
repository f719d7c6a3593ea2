"""How much of a GRPO gradient is signal: the cosine between the gradients of two halves.

    python -m bench.gradient_snr --config configs/quickstart.yaml [--prompts 32] [--set key=value ...]

The batch (rollout of `--prompts` prompt groups, rewards, advantages) that training
iteration `--iteration` collects (dancegrpo.collect), then the policy gradient of the GRPO objective at the first update (ratio 1, so
-mean(A * log p)) for each stochastic step, separately on two disjoint halves of the
groups. Independent halves share only the true gradient, so their cosine estimates
|signal|^2 / (|signal|^2 + |noise|^2 per half): near 0 means an update is mostly noise, and
the learning rate only scales a random walk.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from dancegrpo.collect import collect
from dancegrpo.models import index_cond
from dancegrpo.rollout import step_log_prob
from dancegrpo.run_context import RunContext


def with_grpo(ctx: RunContext, **changes) -> RunContext:
    """`ctx` with some grpo settings changed (e.g. prompts_per_iteration), sharing its model and rewards."""
    return dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, grpo=dataclasses.replace(ctx.cfg.grpo, **changes)))


def half_gradient_cosines(ctx: RunContext, num_prompts: int, iteration: int = 0) -> dict[int | str, float]:
    """Cosine per stochastic step, and under "all" for the gradient summed over them, on the batch
    training iteration `iteration` would collect with `num_prompts` prompt groups."""
    ctx = with_grpo(ctx, prompts_per_iteration=num_prompts, best_of_n_keep=None)
    g, policy = ctx.cfg.grpo, ctx.adapter.trainable
    batch = collect(ctx, iteration)
    rollout, cond, advantages = batch.rollout, batch.cond, batch.advantages
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    half = (num_prompts // 2) * g.group_size  # whole groups on each side
    halves = (torch.arange(half, device=ctx.device), torch.arange(half, 2 * half, device=ctx.device))

    def gradient(rows: torch.Tensor, step: int) -> torch.Tensor:
        policy.zero_grad(set_to_none=True)
        for chunk in rows.split(ctx.cfg.trainer.micro_batch_size):
            logp, _, _ = step_log_prob(ctx.adapter, ctx.sampler, rollout.latents, chunk, step,
                                       index_cond(cond, chunk), g.logprob_reduce)
            (-(advantages[chunk] * logp).sum() / len(rows)).backward()
        return torch.cat([p.grad.flatten() for p in params])

    cosines, totals = {}, [0.0, 0.0]
    for step in ctx.sampler.stochastic_steps:
        a, b = gradient(halves[0], step), gradient(halves[1], step)
        cosines[step] = F.cosine_similarity(a, b, dim=0).item()
        totals = [totals[0] + a, totals[1] + b]
    # The update itself follows the sum over the trained steps: noisy steps dilute it.
    cosines["all"] = F.cosine_similarity(totals[0], totals[1], dim=0).item()
    return cosines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--prompts", type=int, default=32, help="prompt groups in the rollout (split in two halves)")
    parser.add_argument("--iteration", type=int, default=0, help="the training iteration whose batch is measured")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    ctx = RunContext.build(args.config, overrides=["data.eval_prompts=", "run.output_dir=runs/gradient_snr", *args.set])
    ctx.adapter.trainable.requires_grad_(True)
    cosines = half_gradient_cosines(ctx, args.prompts, args.iteration)
    whole = cosines.pop("all")
    for step, cosine in cosines.items():
        print(f"step {step}: cos(half A, half B) = {cosine:+.3f}")
    print(f"mean over steps: {sum(cosines.values()) / len(cosines):+.3f}")
    print(f"summed over steps (the update's direction): {whole:+.3f}")


if __name__ == "__main__":
    main()
