"""Batched SDE rollouts that record what training needs.

A rollout runs the policy's stochastic sampler on many samples at once, in chunks of
`chunk_size` samples. Training later reuses exactly these chunks, one chunk at one step
per micro-batch, so the log-probs recorded here and the ones recomputed with gradients
come from the same computation on the same inputs and the ratio at the first update is
exactly 1 (a model's float output depends on the batch it runs in).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import ops, sde
from .cuda_graph import graphed_rollout
from .models.base import Conditioning, index_cond
from .profiling import nvtx_range


@dataclass
class Rollout:
    """Trajectories of N samples over T steps (N = groups * group_size, group-major)."""

    latents: torch.Tensor    # (N, T+1, *latent): x at each step, x[:, 0] the initial noise
    log_probs: torch.Tensor  # (N, T): log-density of each taken step under the rollout policy (NaN at ODE steps)
    chunks: list[torch.Tensor]  # sample indices of each chunk, in the order they ran

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


def chunk_indices(num_samples: int, chunk_size: int, device=None) -> list[torch.Tensor]:
    return list(torch.arange(num_samples, device=device).split(chunk_size))


@torch.no_grad()
def run_rollout(adapter, sampler, cond: Conditioning, initial_latents: torch.Tensor, chunk_size: int,
                generator: torch.Generator | None = None, reduce: str = "mean", progress=None,
                on_chunk_done: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> Rollout:
    """Sample all trajectories; chunk by chunk, all steps of a chunk in a row.

    `on_chunk_done(rows, final_latents)` is called as each chunk finishes, in order, with a
    copy of its final latents (e.g. to start scoring it while the next chunk samples).
    """
    if getattr(sampler, "cuda_graph", False):  # the same loop, replayed from a CUDA graph per chunk
        chunks = chunk_indices(initial_latents.shape[0], chunk_size, initial_latents.device)
        latents, log_probs = graphed_rollout(adapter, sampler, cond, initial_latents, chunks, generator, reduce,
                                             progress, on_chunk_done)
        return Rollout(latents=latents, log_probs=log_probs, chunks=chunks)
    num_samples, steps = initial_latents.shape[0], sampler.num_steps
    latents = initial_latents.new_empty((num_samples, steps + 1, *initial_latents.shape[1:]))
    latents[:, 0] = initial_latents
    # NaN marks the ODE steps, which have no log-prob (and are never trained).
    log_probs = torch.full((num_samples, steps), float("nan"), device=initial_latents.device)
    stochastic = set(sampler.stochastic_steps)  # a host list: no device read
    chunks = chunk_indices(num_samples, chunk_size, initial_latents.device)
    with nvtx_range("rollout"):
        for rows in chunks:
            x, chunk_cond = latents[rows, 0], index_cond(cond, rows)
            for i in range(steps):
                with nvtx_range("denoise_step"):
                    step = torch.full((len(rows),), i, device=x.device, dtype=torch.long)
                    out = adapter.predict(x, sampler.model_time(step), chunk_cond)
                    if i in stochastic:
                        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                        x, log_probs[rows, i] = _sde_step(sampler, out, x, step, reduce, noise=noise)
                    else:  # an ODE step outside the SDE window: no noise, no log-prob
                        x = sampler.mean_std(out, x, step)[0].to(x.dtype)
                    latents[rows, i + 1] = x
            if on_chunk_done is not None:
                on_chunk_done(rows, latents[rows, -1])  # indexing by rows copies: later writes cannot reach it
            if progress is not None:
                progress.update(1)
    return Rollout(latents=latents, log_probs=log_probs, chunks=chunks)


def _sde_step(sampler, out, x, step, reduce: str, noise=None, prev_sample=None):
    """(next latent, log-prob) of a stochastic step: the fused op (one pass over memory,
    analytic backward) for the mean log-prob, the plain torch math for the sum. Rollout and
    training both come here, so they share one computation and the first ratio is exactly 1."""
    if reduce == "mean":
        return ops.sampler_step(sampler, out, x, step, noise=noise, prev_sample=prev_sample)
    mean, std = sampler.mean_std(out, x, step)
    # The std > 0 check reads the device: only for CPU latents (the sampler's stochastic steps have eta > 0).
    return sde.sde_step_with_log_prob(mean, std, noise=noise, prev_sample=prev_sample, reduce=reduce, dtype=x.dtype,
                                      validate=x.device.type == "cpu")


def step_log_prob(adapter, sampler, latents: torch.Tensor, rows: torch.Tensor, step: int, cond: Conditioning,
                  reduce: str = "mean", with_moments: bool = False):
    """Log-prob of the recorded step `step` for samples `rows`, with gradients.

    Returns (log_prob, mean, std); mean and std (for a KL term) only when `with_moments`,
    else None.
    """
    x, x_next = latents[rows, step], latents[rows, step + 1]
    steps = torch.full((len(rows),), step, device=x.device, dtype=torch.long)
    out = adapter.predict(x, sampler.model_time(steps), cond)
    _, log_prob = _sde_step(sampler, out, x, steps, reduce, prev_sample=x_next)
    mean, std = sampler.mean_std(out, x, steps) if with_moments else (None, None)
    return log_prob, mean, std


@torch.no_grad()
def ode_sample(adapter, sampler, cond: Conditioning, initial_latents: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Deterministic sampling (eta = 0) for evaluation: the mean of every step."""
    finals = []
    for rows in chunk_indices(initial_latents.shape[0], chunk_size, initial_latents.device):
        x, chunk_cond = initial_latents[rows], index_cond(cond, rows)
        for i in range(sampler.num_steps):
            step = torch.full((len(rows),), i, device=x.device, dtype=torch.long)
            out = adapter.predict(x, sampler.model_time(step), chunk_cond)
            x, _ = sampler.mean_std(out, x, step, eta=0.0)
        finals.append(x)
    return torch.cat(finals)
