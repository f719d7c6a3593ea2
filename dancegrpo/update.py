"""The second half of a GRPO iteration: optimizer updates on the clipped-ratio objective.

From a `Batch` (dancegrpo.collect), pick ceil(tau*K) of the K trainable steps per rollout chunk,
shuffle the (chunk, step) pairs, split them into `trainer.updates_per_iteration` optimizer
updates, and for each micro-batch recompute the step's log-prob with gradients, form the ratio
to the rollout's log-prob, and minimise the clipped surrogate (plus beta * KL to the frozen
initial policy when grpo.kl_coef > 0). Statistics stay on the device until one read at the end.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from . import grpo, ops
from .distributed.data_parallel import all_reduce_sum, sum_gradients
from .models.base import index_cond
from .profiling import nvtx_range
from .rollout import Rollout, step_log_prob
from .run_context import RunContext

log = logging.getLogger(__name__)


@dataclass
class UpdatePlan:
    """The micro-batches of one iteration, grouped into optimizer updates."""

    updates: list[list[tuple[torch.Tensor, int]]]  # per update: (sample rows, step) micro-batches


def plan_updates(chunks: list[torch.Tensor], trainable_steps: list[int], tau: float, num_updates: int,
                 generator: torch.Generator, tau_rounding: str = "ceil") -> UpdatePlan:
    """Pick ceil(tau*K) (tau_rounding "floor": int(K*tau)) of the K trainable steps per chunk,
    shuffle the (chunk, step) pairs, split into updates.

    Steps are chosen per chunk (not per sample) because a micro-batch must be a rollout
    chunk at one step for its log-prob to be recomputed bit-identically.

    Both draws run on the generator's device (a CUDA generator draws on the GPU); the plan is
    then read to the host in one transfer, since planning is host-side list work.
    """
    if not trainable_steps:
        raise ValueError("no stochastic sampler steps to train on: set sampler.eta > 0")
    picks = grpo.subsample_timesteps(len(chunks), len(trainable_steps), tau, generator=generator, rounding=tau_rounding)
    order = torch.randperm(picks.numel(), generator=generator, device=picks.device)
    plan = torch.cat([picks.reshape(-1), order]).tolist()
    k = picks.shape[1]
    pairs = [(chunks[c], trainable_steps[plan[c * k + j]]) for c in range(len(chunks)) for j in range(k)]
    pairs = [pairs[i] for i in plan[picks.numel():]]
    num_updates = min(num_updates, len(pairs))
    bounds = [round(u * len(pairs) / num_updates) for u in range(num_updates + 1)]
    return UpdatePlan([pairs[bounds[u]: bounds[u + 1]] for u in range(num_updates)])


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The LR factor of iteration `it` (0-based): linear warmup over `warmup` iterations, then
    "constant", "linear" decay to 0 or "cosine" decay to 0 at iteration `total`."""
    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / warmup) if warmup > 0 else 1.0
        progress = min(1.0, max(0.0, (it - warmup) / max(1, total - warmup)))
        if schedule == "linear":
            return warm * (1.0 - progress)
        if schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm
    return factor



class Updater:
    """Runs one iteration's optimizer updates for a policy; built once by the trainer.

    `params`: the trained parameters (what the optimizer steps; LoRA: the adapters alone).
    `ema`: an EMA stepped after each optimizer update, or None. `reference`: the frozen initial
    policy for the KL term (grpo.kl_coef > 0), or None. `sharded_module`: under FSDP, what
    holds the sharded root(s) (the trainer's `Parallelized`, or one FSDP2 root): anything with
    `set_requires_gradient_sync(bool)`, so gradients are reduce-scattered once per update; else None.
    """

    def __init__(self, ctx: RunContext, policy: torch.nn.Module, params: list[torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer, ema=None, reference=None, sharded_module=None):
        self.ctx, self.policy, self.params, self.optimizer = ctx, policy, params, optimizer
        self.ema, self.reference, self.sharded_module = ema, reference, sharded_module

    # Read through the context: a caller (or test) that replaces the context's adapter is followed.
    cfg = property(lambda self: self.ctx.cfg)
    sampler = property(lambda self: self.ctx.sampler)
    adapter = property(lambda self: self.ctx.adapter)
    device = property(lambda self: self.ctx.device)
    dp = property(lambda self: self.ctx.dp)

    @property
    def sharded(self) -> bool:
        return self.sharded_module is not None

    def trainable_steps(self) -> list[int]:
        """The sampler steps updates train on: the stochastic ones (grpo.exclude_last_step: not the last)."""
        g = self.cfg.grpo
        return [s for s in self.sampler.stochastic_steps  # the release never trains the final step
                if not (g.exclude_last_step and s == self.sampler.num_steps - 1)]

    def run(self, rollout: Rollout, advantages: torch.Tensor, valid: torch.Tensor, cond, plan_gen: torch.Generator,
            iteration: int) -> dict:
        """Optimizer updates over the planned micro-batches.

        Statistics accumulate on the device and are read once at the end: no host sync per
        micro-step (only one per update, for the non-finite gradient check). The valid mask and
        the chunks' rows are read to the host once; micro-batch counts are host arithmetic.
        """
        cfg, g = self.cfg, self.cfg.grpo
        plan = plan_updates(rollout.chunks, self.trainable_steps(), g.tau, cfg.trainer.updates_per_iteration,
                            plan_gen, tau_rounding=g.tau_rounding)
        valid_host = valid.tolist()  # counts below come from here, not from device tensors
        chunk_rows = torch.cat(rollout.chunks).tolist()
        rows_host, start = {}, 0
        for rows in rollout.chunks:  # the plan's micro-batches hold these very tensors
            rows_host[id(rows)], start = chunk_rows[start:start + len(rows)], start + len(rows)
        zero = torch.zeros((), device=self.device)
        stats = dict(ratio_sum=zero.clone(), clipped=zero.clone(), kl=zero.clone(), loss=zero.clone(),
                     ratio_min=torch.full((), math.inf, device=self.device),
                     ratio_max=torch.full((), -math.inf, device=self.device), first_dev=zero.clone())
        count, grad_norms, skipped = 0, [], 0
        # Each update's loss is normalised by its valid samples over all data-parallel ranks
        # (one small all-reduce per iteration), so summed gradients are the single-process ones.
        denoms = sum_over_ranks(self.dp, self.device, {str(u): sum(valid_host[r] for rows, _ in mbs for r in rows_host[id(rows)])
                                       for u, mbs in enumerate(plan.updates)})
        # FSDP averages gradients over all processes; scaling the loss by their number turns that into a sum.
        loss_scale = self.dp.world if self.sharded else 1
        for u, micro_batches in enumerate(plan.updates):
            denom = denoms[str(u)]
            if denom == 0:
                continue
            with nvtx_range("update"):
                self.optimizer.zero_grad(set_to_none=True)
                update_loss = zero.clone()
                for m, (rows, step) in enumerate(micro_batches):
                    n = sum(valid_host[r] for r in rows_host[id(rows)])
                    if n == 0 and not self.sharded:
                        continue  # (FSDP: every rank must run every backward, even one of weight 0)
                    if self.sharded:  # reduce-scatter once per update, after its last micro-batch
                        self.sharded_module.set_requires_gradient_sync(m == len(micro_batches) - 1)
                    # The valid samples' positions, without a host sync (n is known): the same
                    # elements in the same order as a boolean mask would select.
                    keep = slice(None) if n == len(rows) else valid[rows].nonzero_static(size=n).flatten()
                    with nvtx_range("train_step"), self.ctx.autocast():
                        logp, mean, std = step_log_prob(self.adapter, self.sampler, rollout.latents, rows, step,
                                                        index_cond(cond, rows), g.logprob_reduce,
                                                        with_moments=self.reference is not None)
                        old = rollout.log_probs[rows, step]
                        if n == 0:  # only under FSDP: a backward that contributes nothing
                            (logp.sum() * 0.0).backward()
                            continue
                        out = ops.fused_clipped_loss(logp[keep], old[keep], advantages[rows][keep],
                                                     g.clip_range, g.adv_clip_max)
                        loss = out.loss
                        if self.reference is not None:
                            kl = self._kl_to_reference(rollout, rows, step, cond, mean, std)[keep].mean()
                            loss = loss + g.kl_coef * kl
                            stats["kl"] += kl.detach() * n
                    (loss * (n * loss_scale / denom)).backward()
                    if u == 0:
                        stats["first_dev"] = torch.maximum(stats["first_dev"], (logp.detach() - old).abs().max())
                    update_loss += loss.detach() * (n / denom)
                    ratio = out.ratio.detach().float()
                    stats["ratio_sum"] += ratio.sum()
                    stats["ratio_min"] = torch.minimum(stats["ratio_min"], ratio.min())
                    stats["ratio_max"] = torch.maximum(stats["ratio_max"], ratio.max())
                    stats["clipped"] += out.clip_fraction.detach() * n
                    count += n
                if self.dp.enabled and not self.sharded:
                    sum_gradients(self.params)  # DDP-style: one flat all-reduce over all processes
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.trainer.grad_clip or math.inf)
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: the same global norm on every rank
                    grad_norm = grad_norm.full_tensor()
                if not torch.isfinite(grad_norm):
                    # One bad batch must not poison the weights of a long run: drop the update, count it.
                    log.warning("iteration %d update %d: non-finite grad norm, update skipped", iteration, u)
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.policy)
                grad_norms.append(grad_norm.detach())
                stats["loss"] += update_loss
        if self.dp.size > 1:
            count = self._reduce_stats(stats, count)
        # One device-to-host read for all the statistics of the iteration.
        keys = list(stats)
        read = torch.stack([stats[k] for k in keys] + ([torch.stack(grad_norms).mean()] if grad_norms else [])).tolist()
        host = dict(zip(keys, read))
        if host["first_dev"] > 0:
            log.warning("iteration %d: first-update log-prob deviation %.3g (expected exactly 0): old and new "
                        "log-probs did not come from the same computation", iteration, host["first_dev"])
        n_updates = max(1, len(grad_norms))
        return {
            "loss": host["loss"] / n_updates,
            "grad_norm": read[-1] if grad_norms else 0.0,
            "ratio_mean": host["ratio_sum"] / max(1, count),
            "ratio_min": host["ratio_min"] if count else float("nan"),
            "ratio_max": host["ratio_max"] if count else float("nan"),
            "clip_fraction": host["clipped"] / max(1, count),
            "kl": host["kl"] / max(1, count),
            "first_update_logp_max_dev": host["first_dev"],
            "updates": len(grad_norms),
            "skipped_updates": skipped,
        }

    def _reduce_stats(self, stats: dict[str, torch.Tensor], count: int) -> int:
        """Combine the update statistics of the data-parallel ranks in place; returns the global count."""
        group = self.dp.group
        sums = torch.stack([stats[k] for k in ("ratio_sum", "clipped", "kl", "loss")]
                           + [torch.tensor(float(count), device=self.device)])
        dist.all_reduce(sums, group=group)
        for k, v in zip(("ratio_sum", "clipped", "kl", "loss"), sums):
            stats[k] = v
        dist.all_reduce(stats["ratio_min"], op=dist.ReduceOp.MIN, group=group)
        maxima = torch.stack([stats["ratio_max"], stats["first_dev"]])
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        stats["ratio_max"], stats["first_dev"] = maxima[0], maxima[1]
        return int(sums[-1].item())

    @torch.no_grad()
    def _kl_to_reference(self, rollout: Rollout, rows, step: int, cond, mean, std) -> torch.Tensor:
        """Per-sample KL between this step's Gaussian under the policy and the frozen initial one."""
        x = rollout.latents[rows, step]
        steps = torch.full_like(rows, step)
        with self.reference.active():
            ref_out = self.adapter.predict(x, self.sampler.model_time(steps), index_cond(cond, rows))
        ref_mean, _ = self.sampler.mean_std(ref_out, x, steps)
        with torch.enable_grad():
            return grpo.kl_penalty(mean, ref_mean, std)


def sum_over_ranks(dp, device: torch.device, counts: dict[str, int]) -> dict[str, int]:
    """Each count summed over the data-parallel ranks (one all-reduce; unchanged in one process)."""
    if dp.size == 1 or not counts:
        return counts
    total = all_reduce_sum(torch.tensor(list(counts.values()), dtype=torch.float64, device=device), dp.group)
    return dict(zip(counts, (int(v) for v in total.tolist())))
