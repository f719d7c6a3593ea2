"""The plain torch definitions of the fused ops: what every backend must reproduce.

They call dancegrpo.sde and dancegrpo.grpo, the math the trainer uses, so the "torch"
backend gives exactly the numbers of the unfused code path.
"""
from __future__ import annotations

from torch import Tensor

from .. import grpo, sde
from ..sde import ScheduleValue


def step_mean_std(model_output: Tensor, sample: Tensor, prediction: str, *, sigma: ScheduleValue | None = None,
                  sigma_next: ScheduleValue | None = None, eta: ScheduleValue = 0.0, form: str = "dancegrpo",
                  sigma_max: ScheduleValue | None = None, abar_t: ScheduleValue | None = None,
                  abar_prev: ScheduleValue | None = None) -> tuple[Tensor, Tensor]:
    """Mean and std of the step's Gaussian, by sde.flow_step_mean_std or sde.ddim_step_mean_std."""
    if prediction == "flow":
        return sde.flow_step_mean_std(model_output, sample, sigma, sigma_next, eta, form=form, sigma_max=sigma_max)
    if prediction == "ddim":
        return sde.ddim_step_mean_std(model_output, sample, abar_t, abar_prev, eta)
    raise ValueError(f"unknown prediction {prediction!r}; choose 'flow' or 'ddim'")


def sde_step(mean: Tensor, std: Tensor, latent_dtype, noise: Tensor | None = None,
             prev_sample: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(next_sample, log_prob) as sde.sde_step_with_log_prob computes them (std checked by the caller)."""
    if prev_sample is None:
        prev_sample = sde.sample_step(mean, std, noise=noise, dtype=latent_dtype)
    prev_sample = prev_sample.detach()
    return prev_sample, sde.gaussian_log_prob(prev_sample, mean, std, validate=False)


def clipped_loss(new_logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_range: float,
                 adv_clip_max: float | None = None) -> grpo.ClippedLossOutput:
    """grpo.clipped_ratio_loss."""
    return grpo.clipped_ratio_loss(new_logp, old_logp, advantages, clip_range, adv_clip_max)
