"""The fused ops as torch.library custom ops: one schema, a fake (meta) implementation for
tracing, an analytic backward, and a `backend` argument naming the kernels that run.

torch.compile sees each op as one node (it needs only the fake implementations), so graphs
around it compile with fullgraph=True; autograd uses the registered backward. The kernels
of every backend ("cpp", "triton", "cuda") take and return the same tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import kernels_module


# ------------------------------------------------------------------------------- SDE step
# coefs: (R, 4) float64 step-coefficient table (coef_x, coef_v, std, log std; see
# dancegrpo.ops.schedule); index: (B,) int64 row of each sample, or None (R == B, or R == 1).

def log_prob_dtype(sample: Tensor) -> torch.dtype:
    """The compute dtype the log-probs come back in: float64 for float64 latents, else float32."""
    return torch.float64 if sample.dtype == torch.float64 else torch.float32


@torch.library.custom_op("dancegrpo::sde_step_sample", mutates_args=())
def sde_step_sample(model_output: Tensor, sample: Tensor, noise: Tensor, coefs: Tensor, index: Optional[Tensor],
                    backend: str) -> tuple[Tensor, Tensor]:
    """Rollout step: (next_sample in the latent dtype, per-sample mean log-prob of it)."""
    return kernels_module(backend).sde_step_sample(model_output, sample, noise, coefs, index)


@sde_step_sample.register_fake
def _(model_output, sample, noise, coefs, index, backend):
    return torch.empty_like(sample), sample.new_empty(sample.shape[0], dtype=log_prob_dtype(sample))


@torch.library.custom_op("dancegrpo::sde_step_log_prob", mutates_args=())
def sde_step_log_prob(model_output: Tensor, sample: Tensor, prev_sample: Tensor, coefs: Tensor,
                      index: Optional[Tensor], backend: str) -> Tensor:
    """Training step: per-sample mean log-prob of the recorded action prev_sample."""
    return kernels_module(backend).sde_step_log_prob(model_output, sample, prev_sample, coefs, index)


@sde_step_log_prob.register_fake
def _(model_output, sample, prev_sample, coefs, index, backend):
    return sample.new_empty(sample.shape[0], dtype=log_prob_dtype(sample))


@torch.library.custom_op("dancegrpo::sde_step_backward", mutates_args=())
def sde_step_backward(grad_log_prob: Tensor, model_output: Tensor, sample: Tensor, prev_sample: Tensor,
                      coefs: Tensor, index: Optional[Tensor], backend: str) -> Tensor:
    """d(sum_b grad_log_prob[b] * log_prob[b]) / d model_output, in the model output's dtype."""
    return kernels_module(backend).sde_step_backward(grad_log_prob.contiguous(), model_output, sample, prev_sample,
                                                     coefs, index)


@sde_step_backward.register_fake
def _(grad_log_prob, model_output, sample, prev_sample, coefs, index, backend):
    return torch.empty_like(model_output)


def _log_prob_grad(ctx, grad_log_prob):
    if grad_log_prob is None or not ctx.needs_input_grad[0]:
        return (None,) * 6
    model_output, sample, action, coefs, index = ctx.saved_tensors
    grad = sde_step_backward(grad_log_prob, model_output, sample, action, coefs, index, ctx.backend)
    return grad, None, None, None, None, None


def _setup_sample(ctx, inputs, output):
    model_output, sample, _noise, coefs, index, backend = inputs
    # The action is the stored next sample; gradients reach the model output through the mean only.
    ctx.save_for_backward(model_output, sample, output[0], coefs, index)
    ctx.backend = backend


def _backward_sample(ctx, grad_next, grad_log_prob):
    return _log_prob_grad(ctx, grad_log_prob)


def _setup_log_prob(ctx, inputs, output):
    model_output, sample, prev_sample, coefs, index, backend = inputs
    ctx.save_for_backward(model_output, sample, prev_sample, coefs, index)
    ctx.backend = backend


def _backward_log_prob(ctx, grad_log_prob):
    return _log_prob_grad(ctx, grad_log_prob)


sde_step_sample.register_autograd(_backward_sample, setup_context=_setup_sample)
sde_step_log_prob.register_autograd(_backward_log_prob, setup_context=_setup_log_prob)


# Eager calls skip the op registry: the kernels are called directly, through a plain
# autograd.Function when a gradient is needed. Same kernels, same numbers as the custom ops
# above, which torch.compile traces (dancegrpo.ops.sde_step picks one or the other).

class EagerSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, model_output, sample, noise, coefs, index, kernels):
        next_sample, log_prob = kernels.sde_step_sample(model_output, sample, noise, coefs, index)
        ctx.save_for_backward(model_output, sample, next_sample, coefs, index)
        ctx.kernels = kernels
        ctx.mark_non_differentiable(next_sample)
        return next_sample, log_prob

    @staticmethod
    def backward(ctx, grad_next, grad_log_prob):
        return _eager_grad(ctx, grad_log_prob)


class EagerLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, model_output, sample, prev_sample, coefs, index, kernels):
        ctx.save_for_backward(model_output, sample, prev_sample, coefs, index)
        ctx.kernels = kernels
        return kernels.sde_step_log_prob(model_output, sample, prev_sample, coefs, index)

    @staticmethod
    def backward(ctx, grad_log_prob):
        return _eager_grad(ctx, grad_log_prob)


def _eager_grad(ctx, grad_log_prob):
    if grad_log_prob is None or not ctx.needs_input_grad[0]:
        return (None,) * 6
    model_output, sample, action, coefs, index = ctx.saved_tensors
    grad = ctx.kernels.sde_step_backward(grad_log_prob.contiguous(), model_output, sample, action, coefs, index)
    return grad, None, None, None, None, None


# ------------------------------------------------------------------------------- clipped loss

def loss_compute_dtype(new_logp: Tensor, old_logp: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(new_logp.dtype, old_logp.dtype), torch.float32)


@torch.library.custom_op("dancegrpo::clipped_loss", mutates_args=())
def clipped_loss(new_logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_range: float,
                 adv_clip_max: float | None, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, ratio, d loss / d new_logp, [ratio_mean, ratio_min, ratio_max, clip_fraction])."""
    return kernels_module(backend).clipped_loss(new_logp, old_logp, advantages, clip_range, adv_clip_max)


@clipped_loss.register_fake
def _(new_logp, old_logp, advantages, clip_range, adv_clip_max, backend):
    dtype = loss_compute_dtype(new_logp, old_logp)
    n = new_logp.shape[0]
    return (new_logp.new_empty((), dtype=dtype), new_logp.new_empty(n, dtype=dtype),
            new_logp.new_empty(n, dtype=dtype), new_logp.new_empty(4, dtype=dtype))


def _setup_loss(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.new_dtype = inputs[0].dtype


def _backward_loss(ctx, grad_loss, grad_ratio, grad_grad, grad_stats):
    # The gradient was computed in the forward pass; ratio and stats are statistics (no gradient).
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) * 6
    (grad_new,) = ctx.saved_tensors
    return (grad_loss * grad_new).to(ctx.new_dtype), None, None, None, None, None


clipped_loss.register_autograd(_backward_loss, setup_context=_setup_loss)


class EagerClippedLoss(torch.autograd.Function):
    """The eager counterpart of the clipped_loss custom op (same kernels, see EagerSample)."""

    @staticmethod
    def forward(ctx, new_logp, old_logp, advantages, clip_range, adv_clip_max, kernels):
        loss, ratio, grad, stats = kernels.clipped_loss(new_logp, old_logp, advantages, clip_range, adv_clip_max)
        ctx.save_for_backward(grad)
        ctx.new_dtype = new_logp.dtype
        ctx.mark_non_differentiable(ratio, grad, stats)
        return loss, ratio, grad, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_ratio, grad_grad, grad_stats):
        return _backward_loss(ctx, grad_loss, grad_ratio, grad_grad, grad_stats)
