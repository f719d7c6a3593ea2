"""The whole denoising loop of a rollout chunk as one CUDA graph (``sampler.cuda_graph: true``).

Small models are launch-bound: every step of every chunk launches the model's kernels and the
fused step one by one from Python. With the option on, `run_rollout` captures the loop over
all steps of a chunk once per chunk shape (model forwards, fused SDE steps, ODE steps, the
writes of the latents and log-probs) and then replays it: one launch per chunk.

What stays outside the graph, so that results equal the eager loop's bit for bit: the noise,
drawn before each replay from the rollout generator in the eager loop's order (one draw per
stochastic step, the chunk's shape), and the copies of the chunk's initial latents and
conditioning into the graph's static input buffers.

Requirements (refused with a clear error otherwise): CUDA tensors; `grpo.logprob_reduce:
mean` (the fused step); a model whose forward is capturable (no host syncs, no CPU tensors,
static shapes), which excludes sharded (FSDP) and sequence-parallel policies, whose forwards
communicate. Parameters are read in place at replay, so optimizer updates between
iterations are seen; a graph is captured again when the chunk shape, dtype, conditioning
layout or autocast setting changes. Captured graphs live on the sampler (`sampler._graphs`).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import ops
from .models.base import Conditioning, index_cond


def denoise_chunk(adapter, sampler, x0: torch.Tensor, cond: Conditioning, noises: list[torch.Tensor],
                  steps: list[torch.Tensor], latents_out: torch.Tensor, log_probs_out: torch.Tensor) -> None:
    """The body of the graph: all steps of one chunk, written into the output buffers.

    x0 (n, *latent); noises: one (n, *latent) tensor per stochastic step, in step order;
    steps[i]: the (n,) int64 tensor filled with i; latents_out (n, T, *latent) receives x
    after each step; log_probs_out (n, T) receives each stochastic step's log-prob (its other
    entries are left as they are). The same operations as `rollout.run_rollout`'s loop, with
    no host sync and no allocation that depends on host values.
    """
    x, k = x0, 0
    stochastic = set(sampler.stochastic_steps)
    for i, step in enumerate(steps):
        out = adapter.predict(x, sampler.model_time(step), cond)
        if i in stochastic:
            x, log_prob = ops.sampler_step(sampler, out, x, step, noise=noises[k])
            log_probs_out[:, i].copy_(log_prob)
            k += 1
        else:  # an ODE step outside the SDE window
            x = sampler.mean_std(out, x, step)[0].to(x.dtype)
        latents_out[:, i].copy_(x)


class GraphedChunk:
    """One captured denoising loop for chunks of one shape; call it to replay."""

    def __init__(self, adapter, sampler, x0: torch.Tensor, cond: Conditioning, noises: list[torch.Tensor]):
        n, steps = x0.shape[0], sampler.num_steps
        device = x0.device
        self.x0 = x0.clone()
        self.cond = {key: value.clone() for key, value in cond.items()}
        self.noises = [noise.clone() for noise in noises]
        self.steps = [torch.full((n,), i, device=device, dtype=torch.long) for i in range(steps)]
        self.latents = x0.new_empty((n, steps, *x0.shape[1:]))
        self.log_probs = torch.full((n, steps), float("nan"), device=device)
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type)

        def body():
            # Autocast's weight cache must be off while capturing (its cast copies would be freed).
            with torch.autocast(device.type, dtype=dtype, enabled=autocast, cache_enabled=False):
                denoise_chunk(adapter, sampler, self.x0, self.cond, self.noises, self.steps, self.latents,
                              self.log_probs)

        # Warm up on a side stream (lazy initialisation, coefficient tables, autotuning), then capture.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                body()
        except Exception as exc:
            raise RuntimeError(
                "sampler.cuda_graph: capturing the denoising loop in a CUDA graph failed; the model's forward is "
                "probably not capturable (a host sync, a CPU tensor, a sharded or sequence-parallel policy). "
                f"Set sampler.cuda_graph: false. Cause: {type(exc).__name__}: {exc}") from exc

    def __call__(self, x0: torch.Tensor, cond: Conditioning, noises: list[torch.Tensor]):
        self.x0.copy_(x0)
        for key, value in cond.items():
            self.cond[key].copy_(value)
        for buffer, noise in zip(self.noises, noises):
            buffer.copy_(noise)
        self.graph.replay()
        return self.latents, self.log_probs


def check_cuda_graph(device: torch.device | str) -> None:
    """Refuse ``sampler.cuda_graph`` where there is no CUDA device (clear error, before any work)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"sampler.cuda_graph: true captures the denoising loop in a CUDA graph and needs a CUDA "
                         f"device, but the sampler runs on {device}; set sampler.cuda_graph: false (or "
                         "run.device: cuda)")


def _key(x0: torch.Tensor, cond: Conditioning) -> tuple:
    device = x0.device.type
    return (tuple(x0.shape), x0.dtype, tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(cond.items())),
            torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))


@torch.no_grad()
def graphed_rollout(adapter, sampler, cond: Conditioning, initial_latents: torch.Tensor, chunks: list[torch.Tensor],
                    generator: torch.Generator | None, reduce: str, progress=None,
                    on_chunk_done: Callable[[torch.Tensor, torch.Tensor], None] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`rollout.run_rollout`'s loop over `chunks` (sample indices) with each chunk's loop replayed
    from a CUDA graph (same results); returns (latents (N, T+1, ...), log_probs (N, T))."""
    check_cuda_graph(initial_latents.device)
    if reduce != "mean":
        raise ValueError(f"sampler.cuda_graph: true runs the fused SDE step, which scores the mean log-prob; "
                         f"grpo.logprob_reduce is {reduce!r}: set it to 'mean' or sampler.cuda_graph: false")
    graphs = sampler.__dict__.setdefault("_graphs", {})
    num_samples, steps = initial_latents.shape[0], sampler.num_steps
    latents = initial_latents.new_empty((num_samples, steps + 1, *initial_latents.shape[1:]))
    latents[:, 0] = initial_latents
    log_probs = torch.full((num_samples, steps), float("nan"), device=initial_latents.device)
    for rows in chunks:
        x0, chunk_cond = latents[rows, 0], index_cond(cond, rows)
        # the eager loop's draws, in its order: one per stochastic step, the chunk's shape
        noises = [torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
                  for _ in sampler.stochastic_steps]
        key = (id(adapter), *_key(x0, chunk_cond))
        runner = graphs.get(key)
        if runner is None:
            runner = graphs[key] = GraphedChunk(adapter, sampler, x0, chunk_cond, noises)
        chunk_latents, chunk_log_probs = runner(x0, chunk_cond, noises)
        latents[rows, 1:] = chunk_latents
        log_probs[rows] = chunk_log_probs
        if on_chunk_done is not None:
            on_chunk_done(rows, latents[rows, -1])
        if progress is not None:
            progress.update(1)
    return latents, log_probs
