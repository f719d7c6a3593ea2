"""Per-sample coefficients of a sampler step: mean = coef_x * x + coef_v * v, and std.

Every step form of dancegrpo.sde has a mean that is linear in the latent x and the model
output v, with coefficients that depend only on the schedule values of the sample. Computing
those B numbers first lets the kernels make a single pass over the latents. The formulas
are the ones of sde.flow_step_mean_std / sde.ddim_step_mean_std, regrouped by x and v.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..sde import FLOW_FORMS, ScheduleValue
from .validation import require

PREDICTIONS = ("flow", "ddim")
SIGMA_ONE_MESSAGE = ("flow_grpo step at sigma == 1 divides by 1 - sigma; pass sigma_max "
                     "(the schedule's second sigma, e.g. flow_sigmas(...)[1])")


def compute_dtype(sample: Tensor) -> torch.dtype:
    """float64 for float64 latents, else float32 (never 16-bit: see dancegrpo.sde)."""
    return torch.float64 if sample.dtype == torch.float64 else torch.float32


def check_schedule_value(value: ScheduleValue | None, name: str, batch: int) -> None:
    """Shape/type check of a schedule value without converting it (same messages as per_sample)."""
    if value is None:
        return
    if isinstance(value, Tensor):
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real-valued tensor, got dtype {value.dtype}")
        if value.ndim == 0 or (value.ndim == 1 and value.shape[0] in (1, batch)):
            return
        raise ValueError(f"{name} has shape {tuple(value.shape)}; pass a scalar or one value per sample, "
                         f"shape ({batch},)")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def per_sample(value: ScheduleValue | None, name: str, batch: int, dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """A schedule value as a (B,) tensor: from a float, a 0-d tensor, or a (B,)/(1,) tensor."""
    if value is None:
        raise ValueError(f"schedule value {name} is required for this step")
    if isinstance(value, Tensor):
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real-valued tensor, got dtype {value.dtype}")
        v = value.detach().to(device=device, dtype=dtype)
        if v.ndim == 0 or (v.ndim == 1 and v.shape[0] == 1):
            return v.reshape(()).expand(batch)
        if v.ndim == 1 and v.shape[0] == batch:
            return v
        raise ValueError(f"{name} has shape {tuple(value.shape)}; pass a scalar or one value per sample, "
                         f"shape ({batch},)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((batch,), float(value), dtype=dtype, device=device)
    raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def flow_coefficients(sigma: Tensor, sigma_next: Tensor, eta: Tensor, form: str = "dancegrpo",
                      sigma_max: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(coef_x, coef_v, std) of a rectified-flow SDE step; all inputs (B,) in the compute dtype.

    "dancegrpo": mean = x + dt*v - 0.5*eta^2*score*dt with score = -(x + (1-s)*v)/s, so
        coef_x = 1 + 0.5*eta^2*dt/s, coef_v = dt + 0.5*eta^2*dt*(1-s)/s, std = eta*sqrt(-dt).
    "flow_grpo": with d = eta*sqrt(s/(1-s')) (s' = sigma_max where s == 1, else s),
        coef_x = 1 + d^2/(2s)*dt, coef_v = (1 + d^2*(1-s)/(2s))*dt, std = d*sqrt(-dt).
    """
    if form not in FLOW_FORMS:
        raise ValueError(f"unknown flow step form {form!r}; choose one of {FLOW_FORMS}")
    s, dt = sigma, sigma_next - sigma
    if form == "dancegrpo":
        half_eta_sq_dt = 0.5 * eta**2 * dt
        return 1 + half_eta_sq_dt / s, dt + half_eta_sq_dt * (1 - s) / s, eta * torch.sqrt(-dt)
    denom_sigma = s if sigma_max is None else torch.where(s == 1, sigma_max, s)
    std_dev = eta * torch.sqrt(s / (1 - denom_sigma))
    return (1 + std_dev**2 / (2 * s) * dt, (1 + std_dev**2 * (1 - s) / (2 * s)) * dt,
            std_dev * torch.sqrt(-dt))


def ddim_coefficients(abar_t: Tensor, abar_prev: Tensor, eta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(coef_x, coef_v, std) of a DDIM step with noise eta (epsilon prediction, no x0 clipping).

    mean = sqrt(abar_prev)*x0_hat + sqrt(1 - abar_prev - std^2)*eps with
    x0_hat = (x - sqrt(1-abar_t)*eps)/sqrt(abar_t), so coef_x = sqrt(abar_prev/abar_t) and
    coef_v = sqrt(1 - abar_prev - std^2) - sqrt(abar_prev)*sqrt(1-abar_t)/sqrt(abar_t).
    """
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = eta * torch.sqrt(variance)
    direction = torch.sqrt((1 - abar_prev - std**2).clamp(min=0))
    sqrt_prev, sqrt_t = torch.sqrt(abar_prev), torch.sqrt(abar_t)
    return sqrt_prev / sqrt_t, direction - sqrt_prev * torch.sqrt(1 - abar_t) / sqrt_t, std


# ------------------------------------------------------------------ step-coefficient tables
# What the kernels read: one float64 row per step (or per sample) of (coef_x, coef_v, std,
# log std). coef_x, coef_v and std are the compute-dtype values (float32 for all but float64
# latents) widened exactly, so the kernels compute with the very numbers the per-call path
# computed; log std is torch.log of the widened std, as the per-call finalisation took it.
TABLE_COLUMNS = ("coef_x", "coef_v", "std", "log_std")


def coefficient_table(coef_x: Tensor, coef_v: Tensor, std: Tensor) -> Tensor:
    """(R, 4) float64 table from three (R,) coefficient tensors in the compute dtype."""
    std64 = std.detach().double()
    return torch.stack((coef_x.detach().double(), coef_v.detach().double(), std64, torch.log(std64)), dim=1)


def step_table(prediction: str, batch_or_steps: int, dtype: torch.dtype, device: torch.device, *,
               sigma=None, sigma_next=None, eta=0.0, form: str = "dancegrpo", sigma_max=None, abar_t=None,
               abar_prev=None) -> tuple[Tensor, Tensor]:
    """(table (R, 4) float64, std (R,) in `dtype`) of R steps or samples from schedule values.

    Each value is a float, a 0-d tensor or an (R,) tensor (see per_sample); `dtype` is the
    compute dtype. Raises ValueError for a flow_grpo step at sigma == 1 without sigma_max.
    The caller checks std > 0 (dancegrpo.ops.validation.require_positive_std).
    """
    def value(v, name):
        return per_sample(v, name, batch_or_steps, dtype, device)

    if prediction == "ddim":
        coefs = ddim_coefficients(value(abar_t, "abar_t"), value(abar_prev, "abar_prev"), value(eta, "eta"))
    else:
        smax = None
        if form == "flow_grpo":
            if sigma_max is None:
                require(value(sigma, "sigma") != 1, ValueError, SIGMA_ONE_MESSAGE)
            else:
                if not isinstance(sigma_max, Tensor) and not 0.0 <= float(sigma_max) < 1.0:
                    raise ValueError(f"sigma_max must be in [0, 1), got {sigma_max}")
                smax = value(sigma_max, "sigma_max")
        coefs = flow_coefficients(value(sigma, "sigma"), value(sigma_next, "sigma_next"), value(eta, "eta"), form,
                                  smax)
    return coefficient_table(*coefs), coefs[2]
