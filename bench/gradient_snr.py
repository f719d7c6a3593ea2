"""How much of a GRPO gradient is signal: the cosine between the gradients of two halves.

    python -m bench.gradient_snr --config configs/quickstart.yaml [--prompts 32] [--set key=value ...]

One rollout of `--prompts` prompt groups, rewards and advantages as the trainer computes
them, then the policy gradient of the GRPO objective at the first update (ratio 1, so
-mean(A * log p)) for each stochastic step, separately on two disjoint halves of the
groups. Independent halves share only the true gradient, so their cosine estimates
|signal|^2 / (|signal|^2 + |noise|^2 per half): near 0 means an update is mostly noise, and
the learning rate only scales a random walk.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dancegrpo import grpo
from dancegrpo.data import prompts_for_iteration
from dancegrpo.models import index_cond, repeat_cond
from dancegrpo.rollout import run_rollout, step_log_prob
from dancegrpo.trainer import Trainer


def half_gradient_cosines(trainer: Trainer, num_prompts: int, seed: int = 0) -> dict[int | str, float]:
    """Cosine per stochastic step, and under "all" for the gradient summed over them."""
    g = trainer.cfg.grpo
    prompts = prompts_for_iteration(trainer.train_prompts, 0, num_prompts, seed)
    cond = repeat_cond(trainer.adapter.encode_prompts(prompts), g.group_size)
    init = grpo.initial_noise(len(prompts), g.group_size, trainer.adapter.latent_shape(), g.shared_group_noise,
                              generator=torch.Generator("cpu").manual_seed(seed), device=trainer.device)
    with torch.no_grad():
        rollout = run_rollout(trainer.adapter, trainer.sampler, cond, init, trainer.cfg.trainer.micro_batch_size,
                              generator=torch.Generator(device=trainer.device).manual_seed(seed + 1))
        samples = [p for p in prompts for _ in range(g.group_size)]
        scores = trainer.rewards.score(trainer.adapter.decode(rollout.final), samples)
    advantages = grpo.aggregate_advantages(scores.values, trainer.rewards.weights, g.group_size, valid=scores.valid)
    params = [p for p in trainer.policy.parameters() if p.requires_grad]
    half = (len(prompts) // 2) * g.group_size  # whole groups on each side
    halves = (torch.arange(half, device=trainer.device), torch.arange(half, 2 * half, device=trainer.device))

    def gradient(rows: torch.Tensor, step: int) -> torch.Tensor:
        trainer.policy.zero_grad(set_to_none=True)
        for chunk in rows.split(trainer.cfg.trainer.micro_batch_size):
            logp, _, _ = step_log_prob(trainer.adapter, trainer.sampler, rollout.latents, chunk, step,
                                       index_cond(cond, chunk), g.logprob_reduce)
            (-(advantages[chunk] * logp).sum() / len(rows)).backward()
        return torch.cat([p.grad.flatten() for p in params])

    cosines, totals = {}, [0.0, 0.0]
    for step in trainer.sampler.stochastic_steps:
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    trainer = Trainer(args.config, overrides=["data.eval_prompts=", "run.output_dir=runs/gradient_snr", *args.set])
    cosines = half_gradient_cosines(trainer, args.prompts, args.seed)
    whole = cosines.pop("all")
    for step, cosine in cosines.items():
        print(f"step {step}: cos(half A, half B) = {cosine:+.3f}")
    print(f"mean over steps: {sum(cosines.values()) / len(cosines):+.3f}")
    print(f"summed over steps (the update's direction): {whole:+.3f}")


if __name__ == "__main__":
    main()
