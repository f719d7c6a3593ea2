"""Held-out evaluation: the deterministic ODE sampler from fixed per-prompt noise, scored by the
run's rewards. Used by the trainer (base, periodic and final evaluation) and `dancegrpo eval`.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from ..rewards import metadata_metrics
from ..rollout import ode_sample
from ..run_context import RunContext, global_seed
from ..seeding import seed_global_rngs, seeded_generator


def eval_noise_keys(prompts: list[str]) -> list[tuple]:
    """One noise key per evaluation sample: the prompt, plus its repeat index when a prompt
    list repeats a prompt (a kind-balanced set), so repeats are new samples, not copies."""
    seen: dict[str, int] = {}
    keys = []
    for prompt in prompts:
        repeat = seen.get(prompt, 0)
        seen[prompt] = repeat + 1
        keys.append((prompt,) if repeat == 0 else (prompt, repeat))
    return keys


@torch.no_grad()
def evaluate_heldout(ctx: RunContext, prompts: list[str], weights: ContextManager | None = None,
                     return_images: bool = False, seed: int | None = None, by_tag: bool = False) -> dict:
    """Mean reward (and accuracy, for rewards that report one) of `prompts` under the current policy.

    `weights`: a context in which the policy holds the weights to score (e.g. `EMA.swapped_in`);
    default: as they are. `seed`: default run.seed: sample i starts from noise drawn by a
    generator keyed by (seed, "eval", prompt i[, repeat]), the same at every call, and the global
    RNGs are reseeded from (seed, "eval") first.
    Returns {"eval/<reward>": mean over finite scores, "eval/<reward>_<key>": mean of each
    per-sample metadata measure a reward reports (e.g. accuracy; with `by_tag` also per tag, see
    `rewards.metadata_metrics`), ["images": (N, C, H, W) float in [0, 1] on the CPU]}; {} for no prompts.
    """
    if not prompts:
        return {}
    seed = ctx.cfg.run.seed if seed is None else seed
    seed_global_rngs(global_seed(seed, "eval"))  # a reward drawing from them scores the same at every call
    adapter = ctx.adapter
    noise = torch.stack([
        torch.randn(adapter.latent_shape(), generator=seeded_generator(ctx.device, seed, "eval", *key), device=ctx.device)
        for key in eval_noise_keys(prompts)])
    policy = adapter.trainable
    was_training = policy.training
    policy.eval()
    with (weights or contextlib.nullcontext()), ctx.autocast():
        latents = ode_sample(adapter, ctx.eval_sampler, adapter.encode_prompts(prompts), noise,
                             ctx.cfg.trainer.micro_batch_size)
    policy.train(was_training)
    images = adapter.decode(latents)
    scores = ctx.rewards.score(images, prompts)
    result = {f"eval/{k}": v[torch.isfinite(v)].mean().item() for k, v in scores.values.items()}
    result.update({f"eval/{k}": v for k, v in metadata_metrics(scores, by_tag).items()})
    if return_images:
        result["images"] = images.cpu()
    return result

