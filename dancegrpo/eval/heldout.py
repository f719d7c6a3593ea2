"""Held-out evaluation: the deterministic ODE sampler from fixed per-prompt noise, scored by the
run's rewards. Used by the trainer (base, periodic and final evaluation) and `dancegrpo eval`.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch import nn

from ..ema import EMA
from ..rewards import metadata_metrics
from ..rollout import ode_sample
from ..run_context import RunContext, global_seed
from ..seeding import seed_global_rngs, seeded_generator

log = logging.getLogger(__name__)


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



class EvalModel:
    """The policy of a run as evaluation sees it: the RunContext's model, and the EMA whose
    weights are swapped in for every evaluation when the config keeps one (trainer.ema_decay).

    The trainer evaluates through one; `dancegrpo eval` and `dancegrpo sample` build their own
    from the config (`EvalModel.build`) and load checkpoints into it.
    """

    def __init__(self, ctx: RunContext, ema: EMA | None = None, reshard: Callable[[], None] = lambda: None):
        self.ctx, self.ema, self._reshard = ctx, ema, reshard

    @classmethod
    def build(cls, config, overrides=()) -> "EvalModel":
        """From a config (path, dict or Config): the run's model, prompts, rewards and samplers, and
        an EMA of the initial weights when trainer.ema_decay is set (a checkpoint's replaces it)."""
        ctx = RunContext.build(config, overrides=overrides)
        decay = ctx.cfg.trainer.ema_decay
        return cls(ctx, EMA(ctx.adapter.trainable, decay) if decay else None)

    @property
    def policy(self) -> nn.Module:
        return self.ctx.adapter.trainable

    @property
    def eval_prompts(self) -> list[str]:
        return self.ctx.eval_prompts

    def weights(self) -> ContextManager:
        """The context in which the policy holds the weights evaluation scores (EMA when kept)."""
        return self.ema.swapped_in(self.policy, self._reshard) if self.ema is not None else contextlib.nullcontext()

    def evaluate(self, prompts: list[str] | None = None, return_images: bool = False, by_tag: bool = False,
                 seed_index: int = 0) -> dict:
        """`evaluate_heldout` on `prompts` (default: the held-out set) with this model's weights.
        Seed index s draws the noise a run with `run.seed + s` would draw (0: the run's own)."""
        prompts = self.eval_prompts if prompts is None else prompts
        return evaluate_heldout(self.ctx, prompts, self.weights(), return_images, seed=self.ctx.cfg.run.seed + seed_index,
                                by_tag=by_tag)

    def load_checkpoint(self, path: str | Path) -> int:
        """Load a checkpoint folder's policy weights (and its EMA weights when this model keeps an
        EMA) for sampling and evaluation; optimizer, scheduler and RNG state are left alone (resuming
        is `Trainer.resume`). Returns the checkpoint's training iteration. Raises CheckpointError."""
        from ..checkpoint import EMA_FILE, CheckpointManager
        checkpoints = CheckpointManager(None)  # one process; the folder's content picks the format
        has_ema = checkpoints.has_ema(path)
        use_ema = self.ema is not None and has_ema
        state = checkpoints.load(path, model=self.policy, ema=self.ema.shadow if use_ema else None,
                                 restore_global_rng=False)
        if self.ema is not None and not use_ema:
            # Otherwise evaluation would swap in the EMA of the base weights the model started with.
            log.warning("%s has no EMA weights (%s) although trainer.ema_decay is set: evaluating its raw weights",
                        path, EMA_FILE)
            self.ema.reset_to(self.policy)
        elif self.ema is None and has_ema:
            log.info("%s also holds EMA weights; the config sets no trainer.ema_decay, so its raw weights are used",
                     path)
        return int(state["extra"].get("iteration", state["step"]))
