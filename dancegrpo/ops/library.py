"""The fused ops as torch.library custom ops: one schema, a fake (meta) implementation for
tracing, an analytic backward, and a `backend` argument naming the kernels that run.

torch.compile sees each op as one node (it needs only the fake implementations), so graphs
around it compile with fullgraph=True; autograd uses the registered backward. The kernels
of every backend ("cpp", "triton", "cuda") take and return the same tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backends import kernels_module


# ------------------------------------------------------------------------------- SDE step

@torch.library.custom_op("dancegrpo::sde_step_sample", mutates_args=())
def sde_step_sample(model_output: Tensor, sample: Tensor, noise: Tensor, coef_x: Tensor, coef_v: Tensor,
                    std: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Rollout step: (next_sample in the latent dtype, per-sample mean log-prob of it)."""
    return kernels_module(backend).sde_step_sample(model_output, sample, noise, coef_x, coef_v, std)


@sde_step_sample.register_fake
def _(model_output, sample, noise, coef_x, coef_v, std, backend):
    return torch.empty_like(sample), coef_x.new_empty(sample.shape[0])


@torch.library.custom_op("dancegrpo::sde_step_log_prob", mutates_args=())
def sde_step_log_prob(model_output: Tensor, sample: Tensor, prev_sample: Tensor, coef_x: Tensor, coef_v: Tensor,
                      std: Tensor, backend: str) -> Tensor:
    """Training step: per-sample mean log-prob of the recorded action prev_sample."""
    return kernels_module(backend).sde_step_log_prob(model_output, sample, prev_sample, coef_x, coef_v, std)


@sde_step_log_prob.register_fake
def _(model_output, sample, prev_sample, coef_x, coef_v, std, backend):
    return coef_x.new_empty(sample.shape[0])


@torch.library.custom_op("dancegrpo::sde_step_backward", mutates_args=())
def sde_step_backward(grad_log_prob: Tensor, model_output: Tensor, sample: Tensor, prev_sample: Tensor,
                      coef_x: Tensor, coef_v: Tensor, std: Tensor, backend: str) -> Tensor:
    """d(sum_b grad_log_prob[b] * log_prob[b]) / d model_output, in the model output's dtype."""
    return kernels_module(backend).sde_step_backward(grad_log_prob.contiguous(), model_output, sample, prev_sample,
                                                     coef_x, coef_v, std)


@sde_step_backward.register_fake
def _(grad_log_prob, model_output, sample, prev_sample, coef_x, coef_v, std, backend):
    return torch.empty_like(model_output)


def _save_for_log_prob_grad(ctx, model_output, sample, action, coef_x, coef_v, std, backend) -> None:
    ctx.save_for_backward(model_output, sample, action, coef_x, coef_v, std)
    ctx.backend = backend


def _log_prob_grad(ctx, grad_log_prob):
    if grad_log_prob is None or not ctx.needs_input_grad[0]:
        return (None,) * 7
    model_output, sample, action, coef_x, coef_v, std = ctx.saved_tensors
    grad = sde_step_backward(grad_log_prob, model_output, sample, action, coef_x, coef_v, std, ctx.backend)
    return grad, None, None, None, None, None, None


def _setup_sample(ctx, inputs, output):
    model_output, sample, _noise, coef_x, coef_v, std, backend = inputs
    # The action is the stored next sample; gradients reach the model output through the mean only.
    _save_for_log_prob_grad(ctx, model_output, sample, output[0], coef_x, coef_v, std, backend)


def _backward_sample(ctx, grad_next, grad_log_prob):
    return _log_prob_grad(ctx, grad_log_prob)


def _setup_log_prob(ctx, inputs, output):
    _save_for_log_prob_grad(ctx, *inputs)


def _backward_log_prob(ctx, grad_log_prob):
    return _log_prob_grad(ctx, grad_log_prob)


sde_step_sample.register_autograd(_backward_sample, setup_context=_setup_sample)
sde_step_log_prob.register_autograd(_backward_log_prob, setup_context=_setup_log_prob)


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
