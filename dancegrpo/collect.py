"""One iteration's training data: prompts -> shared noise -> SDE rollout -> rewards -> advantages.

`collect(ctx, iteration)` is the first half of a GRPO iteration, shared by the trainer and the
bench tools (gradient SNR, toy diagnostics): they see exactly the batch training sees. Every draw
comes from generators seeded by (run.seed, purpose, iteration), so it repeats after a resume.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import grpo
from .data import prompts_for_iteration
from .models import repeat_cond
from .models.base import Conditioning, index_cond
from .profiling import nvtx_range
from .rewards import RewardScores
from .rewards.overlap import OverlappedScoring
from .rollout import Rollout, chunk_indices, run_rollout, step_log_prob
from .run_context import RunContext


@dataclass
class Batch:
    """This process's share of one iteration, ready for the update.

    N below is the number of local samples (after best-of-N selection, if configured).
    `group_ids`: (N,) int64 on the run's device, the index in `prompts` of each sample's prompt:
    samples with the same id form one GRPO group, whatever their position or rank.
    """

    prompts: list[str]            # the iteration's prompts, every rank's, in group order
    group_ids: torch.Tensor       # (N,) int64
    group_size: int               # samples per group over all ranks (after best-of-N: 2 * keep)
    cond: Conditioning            # (N, ...) per-sample conditioning
    rollout: Rollout
    scores: RewardScores          # per reward (N,) values, (N,) valid mask, fault counts
    advantages: torch.Tensor      # (N,) float32, weighted sum of per-reward group advantages
    timings: dict[str, float] = field(default_factory=dict)  # "time/rollout", "time/reward" in seconds

    def sample_prompts(self) -> list[str]:
        """The prompt of each local sample (reads the group ids to the host: not for hot paths)."""
        return [self.prompts[i] for i in self.group_ids.tolist()]


def collect(ctx: RunContext, iteration: int) -> Batch:
    """Roll out and score iteration `iteration`'s prompt groups; returns this rank's `Batch`.

    The policy (`ctx.adapter.trainable`) is put in eval mode; the caller restores train mode.
    Reseeds the global RNGs for this iteration first (rewards or layers drawing from them repeat).
    """
    cfg, dp, g = ctx.cfg, ctx.dp, ctx.cfg.grpo
    ctx.seed_global_rngs("iteration", iteration)  # whatever draws from them repeats on resume
    timings = {}
    start = time.perf_counter()
    prompts = prompts_for_iteration(ctx.train_prompts, iteration, g.prompts_per_iteration, cfg.run.seed)
    local_prompts, local_group = dp.local_prompts(prompts), dp.local_group_size(g.group_size)
    sample_prompts = [p for p in local_prompts for _ in range(local_group)]
    cond = repeat_cond(ctx.adapter.encode_prompts(local_prompts), local_group)
    rollout_gen = ctx.generator("rollout", iteration)
    # Initial noise is drawn for the iteration's whole batch on every rank (cheap) and each
    # rank keeps its rows: a group's shared noise does not depend on the number of ranks.
    init = grpo.initial_noise(len(prompts), g.group_size, ctx.adapter.latent_shape(), g.shared_group_noise,
                              generator=rollout_gen, device=ctx.device)
    rows = torch.arange(len(prompts) * g.group_size, device=ctx.device)
    if dp.size > 1:
        rows = dp.local_rows(len(prompts), g.group_size, ctx.device)
        init = init[rows]
        rollout_gen = ctx.generator("rollout", iteration, "dp_rank", dp.rank)  # distinct SDE noise per rank
    group_ids = torch.div(rows, g.group_size, rounding_mode="floor")
    overlap = (OverlappedScoring(ctx.adapter, ctx.rewards, sample_prompts, ctx.device)
               if cfg.trainer.overlap_rewards else None)
    ctx.adapter.trainable.eval()
    with ctx.autocast():
        rollout = run_rollout(ctx.adapter, ctx.sampler, cond, init, cfg.trainer.micro_batch_size,
                              generator=rollout_gen, reduce=g.logprob_reduce,
                              on_chunk_done=overlap.submit if overlap else None)
    timings["time/rollout"] = time.perf_counter() - start

    start = time.perf_counter()
    with nvtx_range("reward"), torch.no_grad():
        if overlap is not None:  # chunks were decoded and scored while later ones sampled
            scores = overlap.gather()
        else:
            scores = ctx.rewards.score(ctx.adapter.decode(rollout.final), sample_prompts)
    advantages = group_advantages(ctx, scores, group_ids, len(prompts))
    timings["time/reward"] = time.perf_counter() - start
    batch = Batch(prompts, group_ids, g.group_size, cond, rollout, scores, advantages, timings)
    if g.best_of_n_keep:
        batch = best_of_n(ctx, batch)
    return batch


def group_advantages(ctx: RunContext, scores: RewardScores, group_ids: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Per-group advantages of this rank's samples.

    Whole groups on a rank (one process, or group_placement "rank"): the group-major
    computation. Groups spread over ranks: every rank's rewards and group ids are all-gathered
    and each group is normalised over its members by id, as in one process.
    """
    g, dp, weights = ctx.cfg.grpo, ctx.dp, ctx.rewards.weights
    if dp.placement != "spread" or dp.size == 1:
        return grpo.aggregate_advantages(scores.values, weights, g.group_size, valid=scores.valid)
    values = {name: dp.gather_cat(value) for name, value in scores.values.items()}
    valid = dp.gather_cat(scores.valid.to(torch.uint8)).bool()
    groups = grpo.GroupIds(dp.gather_cat(group_ids), num_prompts)
    advantages = grpo.aggregate_advantages(values, weights, groups, valid=valid)
    n = len(group_ids)
    return advantages[dp.rank * n:(dp.rank + 1) * n]


def best_of_n(ctx: RunContext, batch: Batch) -> Batch:
    """Keep the top-k and bottom-k samples of each group (by total advantage).

    The kept samples form new chunks, so their old log-probs are recomputed in exactly
    the micro-batches training will use; advantages are recomputed within the kept groups,
    as for a group sampled that way. With groups spread over ranks the selection is made on
    every rank's samples (all-gathered), and each rank then holds 2k / ranks kept samples of
    every group, so ranks keep equal shares (what FSDP's collectives need).
    """
    g = ctx.cfg.grpo
    k2 = 2 * g.best_of_n_keep
    if ctx.dp.placement == "spread" and ctx.dp.size > 1:
        return _best_of_n_spread(ctx, batch)
    keep = grpo.best_of_n_indices(batch.advantages, g.group_size, g.best_of_n_keep)
    scores = batch.scores.select(keep)
    advantages = grpo.aggregate_advantages(scores.values, ctx.rewards.weights, k2, valid=scores.valid)
    latents, cond = batch.rollout.latents[keep], index_cond(batch.cond, keep)
    return Batch(batch.prompts, batch.group_ids[keep], k2, cond, _recompute_log_probs(ctx, latents, cond),
                 scores, advantages, batch.timings)


def _best_of_n_spread(ctx: RunContext, batch: Batch) -> Batch:
    """best_of_n for groups spread over the data-parallel ranks (see there).

    Costs one all-gather of every rank's trajectories (N_global x (T+1) latents) per iteration.
    """
    g, dp = ctx.cfg.grpo, ctx.dp
    k2, num_prompts = 2 * g.best_of_n_keep, len(batch.prompts)
    share = k2 // dp.size  # kept samples of each group on each rank (checked at setup)
    local_group = g.group_size // dp.size
    gather = lambda t: dp.gather_rows(t, g.group_size)  # noqa: E731  every rank's rows, group-major
    keep = grpo.best_of_n_indices(gather(batch.advantages), g.group_size, g.best_of_n_keep)  # (P * 2k,)
    values = {name: gather(v)[keep] for name, v in batch.scores.values.items()}
    valid = gather(batch.scores.valid.to(torch.uint8)).bool()[keep]
    advantages = grpo.aggregate_advantages(values, ctx.rewards.weights, k2, valid=valid)
    mine = torch.arange(dp.rank * share, (dp.rank + 1) * share, device=keep.device)
    mine = (torch.arange(num_prompts, device=keep.device)[:, None] * k2 + mine).reshape(-1)  # of the kept rows
    latents = gather(batch.rollout.latents)[keep[mine]]
    # Every local sample of a prompt has the same conditioning: the first one's, `share` times.
    first = torch.arange(num_prompts, device=keep.device).repeat_interleave(share) * local_group
    cond = index_cond(batch.cond, first)
    # (The rewards' metadata, a reporting aid, is not exchanged between ranks: none after this selection.)
    scores = RewardScores({name: v[mine] for name, v in values.items()}, valid[mine], dict(batch.scores.faults))
    group_ids = torch.arange(num_prompts, device=keep.device).repeat_interleave(share)
    return Batch(batch.prompts, group_ids, k2, cond, _recompute_log_probs(ctx, latents, cond), scores,
                 advantages[mine], batch.timings)


def _recompute_log_probs(ctx: RunContext, latents: torch.Tensor, cond: Conditioning) -> Rollout:
    """A Rollout of the kept trajectories, re-chunked, with old log-probs recomputed chunk by chunk."""
    sampler = ctx.sampler
    chunks = chunk_indices(len(latents), ctx.cfg.trainer.micro_batch_size, ctx.device)
    log_probs = torch.full((len(latents), sampler.num_steps), float("nan"), device=ctx.device)
    ctx.adapter.trainable.eval()
    with torch.no_grad(), ctx.autocast():
        for rows in chunks:
            for step in sampler.stochastic_steps:
                log_probs[rows, step], _, _ = step_log_prob(ctx.adapter, sampler, latents, rows, step,
                                                            index_cond(cond, rows), ctx.cfg.grpo.logprob_reduce)
    return Rollout(latents, log_probs, chunks)
