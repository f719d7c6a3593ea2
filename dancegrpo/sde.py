"""Sampler math for DanceGRPO: schedules, stochastic steps, Gaussian log-probs.

The deterministic ODE sampler for evaluation (eta = 0) is `dancegrpo.rollout.ode_sample`, which
runs these step functions with eta = 0 through a `dancegrpo.sampler` sampler.

Everything here is a pure function on tensors. A stochastic sampler step is described by the
Gaussian it draws the next latent from, ``(mean, std)``; GRPO needs both the sample and the
log-density of the sample under that Gaussian (the policy's log-prob of the action).

Conventions
-----------
* Schedule values (``sigma``, ``abar_t``, ``eta`` ...) may be Python floats, 0-d tensors or
  1-d tensors of shape ``(B,)``: one value per sample, because training batches mix steps.
  They broadcast over the trailing dims of the latent.
* Arithmetic runs in float32 at least (bf16/fp16 inputs are upcast; float64 stays float64):
  the mean and the log-prob are differences of nearly equal numbers and bf16 ruins them.
* Step functions return ``mean`` with the latent's shape and ``std`` broadcastable to it
  (shape ``()`` or ``(B, 1, ..., 1)``), both in the compute dtype. ``sample_step`` and
  ``sde_step_with_log_prob`` return the next latent in the dtype asked for (by default the
  mean's); log-probs come back in the compute dtype (float32 for low-precision inputs).
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

ScheduleValue = float | Tensor

FLOW_FORMS = ("dancegrpo", "flow_grpo")
LOG_PROB_REDUCTIONS = ("mean", "sum")
DDIM_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("scaled_linear", "linear")

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64: never compute in bf16/fp16."""
    dtype = torch.float32
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _expand_like(value: ScheduleValue, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Turn a schedule value into a tensor that broadcasts against the latent ``x``.

    A float or 0-d tensor stays 0-d; a (B,) tensor becomes (B, 1, ..., 1); a tensor that already
    has ``x.ndim`` dims is returned as is (it must broadcast against ``x``).
    """
    dtype = dtype or _compute_dtype(x)
    v = torch.as_tensor(value, dtype=dtype, device=x.device)
    if v.ndim == 0 or v.ndim == x.ndim:
        return v
    if v.ndim == 1:
        if v.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"per-sample schedule value has {v.shape[0]} entries but the latent batch has "
                f"{x.shape[0]}; pass one value per sample (shape ({x.shape[0]},)) or a scalar"
            )
        return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))
    raise ValueError(
        f"schedule value of shape {tuple(v.shape)} does not fit a latent of shape "
        f"{tuple(x.shape)}; use a scalar, shape ({x.shape[0]},), or a tensor of {x.ndim} dims"
    )


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------


# Adapted from DanceGRPO fastvideo/train_grpo_flux.py::sd3_time_shift (Apache-2.0)
def time_shift(t: ScheduleValue, shift: float) -> ScheduleValue:
    """Resolution time shift of SD3/FLUX: ``shift*t / (1 + (shift-1)*t)`` (maps 0->0, 1->1)."""
    return shift * t / (1 + (shift - 1) * t)


# Adapted from DanceGRPO fastvideo/train_grpo_flux.py::sample_reference_model (Apache-2.0)
def flow_sigmas(num_steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """Rectified-flow noise levels for ``num_steps`` steps: shape (num_steps+1,), float32.

    ``linspace(1, 0, num_steps+1)`` then :func:`time_shift`; starts at 1 (pure noise), ends at 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32, device=device)
    return time_shift(t, shift)


# Adapted from diffusers src/diffusers/schedulers/scheduling_ddim.py::DDIMScheduler.__init__ (Apache-2.0)
def ddim_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
) -> Tensor:
    """Cumulative products of ``1 - beta`` (alpha-bar), shape (num_train_timesteps,), float32.

    "scaled_linear" is linear in sqrt(beta) (Stable Diffusion v1.x: 0.00085..0.012);
    "linear" is linear in beta (original DDPM).
    """
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")
    return torch.cumprod(1.0 - betas, dim=0)


# Adapted from diffusers src/diffusers/schedulers/scheduling_ddim.py::DDIMScheduler.set_timesteps (Apache-2.0)
def ddim_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    steps_offset: int = 1,
    spacing: str = "leading",
) -> Tensor:
    """Descending integer timesteps of a ``num_steps`` DDIM sampler (LongTensor, (num_steps,)).

    "leading": ``arange(num_steps) * (num_train // num_steps) + steps_offset`` (SD v1.4 uses
    steps_offset=1). "trailing": ``round(num_train - i*num_train/num_steps) - 1``, which ignores
    steps_offset (it always starts at the last training timestep). "linspace":
    ``round(linspace(0, num_train-1, num_steps))``.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_steps must be in [1, num_train_timesteps={num_train_timesteps}], got {num_steps}"
        )
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        steps = [i * ratio + steps_offset for i in range(num_steps)]
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        # Python's round() is round-half-to-even, like numpy's.
        steps = [round(num_train_timesteps - i * ratio) - 1 for i in reversed(range(num_steps))]
    elif spacing == "linspace":
        grid = torch.linspace(0, num_train_timesteps - 1, num_steps, dtype=torch.float64)
        steps = torch.round(grid).long().tolist()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {DDIM_SPACINGS}")
    return torch.tensor(steps[::-1], dtype=torch.long)


# Adapted from diffusers src/diffusers/schedulers/scheduling_ddim.py::DDIMScheduler.step (Apache-2.0)
def ddim_schedule(
    num_steps: int,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    set_alpha_to_one: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-step alpha-bar pairs ``(abar_t, abar_prev)``, each of shape (len(timesteps),).

    The previous timestep is ``t - num_train // num_steps``; where it falls below 0 the final
    alpha-bar is used: 1.0 if ``set_alpha_to_one`` else ``alphas_cumprod[0]`` (SD v1.4: False).
    """
    timesteps = torch.as_tensor(timesteps, dtype=torch.long, device=alphas_cumprod.device)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-d, got shape {tuple(timesteps.shape)}")
    num_train = alphas_cumprod.shape[0]
    prev = timesteps - num_train // num_steps
    final = torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    if not set_alpha_to_one:
        final = alphas_cumprod[0]
    abar_t = alphas_cumprod[timesteps]
    abar_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
    return abar_t, abar_prev


# --------------------------------------------------------------------------------------------
# steps: the Gaussian of the next latent given the model output
# --------------------------------------------------------------------------------------------


# Adapted from DanceGRPO fastvideo/train_grpo_flux.py::flux_step (Apache-2.0)
# Adapted from flow_grpo flow_grpo/diffusers_patch/sd3_sde_with_logprob.py::sde_step_with_logprob (MIT)
def flow_step_mean_std(
    velocity: Tensor,
    sample: Tensor,
    sigma: ScheduleValue,
    sigma_next: ScheduleValue,
    eta: ScheduleValue,
    form: str = "dancegrpo",
    sigma_max: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and std of the next latent of a rectified-flow SDE step from ``sigma`` to ``sigma_next``.

    Convention: ``x_sigma = (1 - sigma) * x0 + sigma * noise`` and ``velocity = noise - x0``.

    form "dancegrpo" (DanceGRPO): Euler mean plus a score correction,
        x0_hat = x - sigma*v;  score = -(x - (1-sigma)*x0_hat) / sigma^2
        mean = x + (sigma_next - sigma)*v - 0.5*eta^2*score*(sigma_next - sigma)
        std = eta*sqrt(sigma - sigma_next)
    form "flow_grpo" (Flow-GRPO): Euler-Maruyama step of the marginal-preserving SDE with
        diffusion std_dev = eta*sqrt(sigma/(1-sigma)); at sigma == 1 the denominator uses
        ``sigma_max`` (the schedule's second sigma), which must then be given.
    At eta = 0 both forms are the deterministic Euler ODE step (std = 0).
    """
    if form not in FLOW_FORMS:
        raise ValueError(f"unknown flow step form {form!r}; choose one of {FLOW_FORMS}")
    dtype = _compute_dtype(velocity, sample)
    x = sample.to(dtype)
    v = velocity.to(dtype)
    s = _expand_like(sigma, x, dtype)
    s_next = _expand_like(sigma_next, x, dtype)
    eta_t = _expand_like(eta, x, dtype)
    dt = s_next - s  # negative: sampling runs from noise (1) to data (0)

    if form == "dancegrpo":
        x0_hat = x - s * v
        score = -(x - (1 - s) * x0_hat) / s**2
        mean = x + dt * v - 0.5 * eta_t**2 * score * dt
        std = eta_t * torch.sqrt(-dt)
        return mean, std

    # Flow-GRPO (Liu et al. 2025, arXiv:2505.05470), its ODE-to-SDE conversion discretised by
    # Euler-Maruyama:  x_{t+dt} = x_t + [v + s_t^2/(2t) (x_t + (1-t) v)] dt + s_t sqrt(|dt|) eps,
    # s_t = a*sqrt(t/(1-t)) (t = sigma, a = eta, dt < 0). Checked against sde_step_with_logprob in
    # the authors' flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, which guards the 1/(1-t)
    # singularity at t = 1 by putting the schedule's second sigma in the denominator only.
    at_one = s == 1
    if sigma_max is None:
        if bool(at_one.any()):
            raise ValueError(
                "flow_grpo step at sigma == 1 divides by 1 - sigma; pass sigma_max "
                "(the schedule's second sigma, e.g. flow_sigmas(...)[1])"
            )
        denom_sigma = s
    else:
        smax = _expand_like(sigma_max, x, dtype)
        if not isinstance(sigma_max, Tensor) and not 0.0 <= sigma_max < 1.0:
            raise ValueError(f"sigma_max must be in [0, 1), got {sigma_max}")
        denom_sigma = torch.where(at_one, smax, s)
    std_dev_t = eta_t * torch.sqrt(s / (1 - denom_sigma))
    mean = x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    std = std_dev_t * torch.sqrt(-dt)
    return mean, std


# Adapted from diffusers src/diffusers/schedulers/scheduling_ddim.py::DDIMScheduler.step (Apache-2.0)
# Adapted from DanceGRPO fastvideo/models/stable_diffusion/ddim_with_logprob.py::ddim_step_with_logprob (Apache-2.0)
def ddim_step_mean_std(
    eps: Tensor,
    sample: Tensor,
    abar_t: ScheduleValue,
    abar_prev: ScheduleValue,
    eta: ScheduleValue,
    clip_sample: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and std of the next latent of a DDIM step with noise ``eta`` (epsilon prediction).

        x0_hat = (x - sqrt(1-abar_t)*eps) / sqrt(abar_t)   (clamped to +-clip_sample if given)
        std = eta * sqrt((1-abar_prev)/(1-abar_t) * (1 - abar_t/abar_prev))
        mean = sqrt(abar_prev)*x0_hat + sqrt(1 - abar_prev - std^2)*eps
    eta = 0 is deterministic DDIM, eta = 1 is DDPM-like ancestral sampling.
    """
    dtype = _compute_dtype(eps, sample)
    x = sample.to(dtype)
    e = eps.to(dtype)
    a_t = _expand_like(abar_t, x, dtype)
    a_prev = _expand_like(abar_prev, x, dtype)
    eta_t = _expand_like(eta, x, dtype)

    x0_hat = (x - torch.sqrt(1 - a_t) * e) / torch.sqrt(a_t)
    if clip_sample is not None:
        x0_hat = x0_hat.clamp(-clip_sample, clip_sample)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta_t * torch.sqrt(variance)
    # Mathematically >= 0 for eta <= 1; clamp so rounding cannot turn it into NaN.
    direction_coef = torch.sqrt((1 - a_prev - std**2).clamp(min=0))
    mean = torch.sqrt(a_prev) * x0_hat + direction_coef * e
    return mean, std


# --------------------------------------------------------------------------------------------
# log-prob and sampling
# --------------------------------------------------------------------------------------------


# Adapted from DanceGRPO fastvideo/train_grpo_flux.py::flux_step (Apache-2.0)
def gaussian_log_prob(
    x_next: Tensor,
    mean: Tensor,
    std: ScheduleValue,
    reduce: str = "mean",
    validate: bool = True,
) -> Tensor:
    """Log-density of ``x_next`` under N(mean, std^2), reduced over all non-batch dims: (B,).

    ``reduce="mean"`` (DanceGRPO's choice, which keeps ratios near 1 and makes a 1e-4 clip
    range sensible) or ``"sum"`` (the true joint log-density). ``std`` may be a scalar, (B,),
    or broadcastable to ``mean``. ``validate`` checks std > 0; on an accelerator that costs a
    host sync, so hot loops with known-positive std may turn it off.
    """
    if reduce not in LOG_PROB_REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; choose one of {LOG_PROB_REDUCTIONS}")
    if x_next.shape != mean.shape:
        raise ValueError(f"x_next shape {tuple(x_next.shape)} differs from mean shape {tuple(mean.shape)}")
    dtype = _compute_dtype(x_next, mean, std if isinstance(std, Tensor) else None)
    m = mean.to(dtype)
    s = _expand_like(std, m, dtype)
    if validate and not bool((s > 0).all()):
        raise ValueError(
            "gaussian_log_prob needs std > 0 everywhere, got a std <= 0 (or NaN): a deterministic "
            "step (eta = 0, or sigma_next == sigma) has no density; sample with eta > 0"
        )
    diff = x_next.to(dtype) - m
    log_prob = -(diff**2) / (2 * s**2) - torch.log(s) - _HALF_LOG_TWO_PI
    if log_prob.ndim <= 1:
        return log_prob
    dims = tuple(range(1, log_prob.ndim))
    return log_prob.mean(dim=dims) if reduce == "mean" else log_prob.sum(dim=dims)


def sample_step(
    mean: Tensor,
    std: ScheduleValue,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Draw ``mean + std * noise``; noise is standard normal from ``generator`` unless given.

    The sum is formed in the compute dtype and returned in ``dtype`` (default: mean's dtype);
    pass the latent dtype to store actions the way the model consumes them.
    """
    compute = _compute_dtype(mean)
    m = mean.to(compute)
    s = _expand_like(std, m, compute)
    if noise is None:
        noise = torch.randn(m.shape, generator=generator, device=m.device, dtype=compute)
    elif noise.shape != m.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from mean shape {tuple(m.shape)}")
    return (m + s * noise.to(compute)).to(dtype or mean.dtype)


def sde_step_with_log_prob(
    mean: Tensor,
    std: ScheduleValue,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: str = "mean",
    dtype: torch.dtype | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """The next latent and its log-prob (B,) under N(mean, std^2).

    Rollout mode (``prev_sample`` None): sample it with :func:`sample_step` (cast to ``dtype``,
    default mean's dtype) and score the sample *as stored*. Training mode (``prev_sample``
    given): score the stored action. Both modes go through the same :func:`gaussian_log_prob`
    call on the same values, so the same inputs give bit-identical log-probs (ratio == 1 at
    the first update). The action is detached: gradients flow only through ``mean``/``std``.
    ``validate`` is passed to :func:`gaussian_log_prob` (a host sync on an accelerator).
    """
    if prev_sample is None:
        prev_sample = sample_step(mean, std, noise=noise, generator=generator, dtype=dtype)
    elif noise is not None:
        raise ValueError("pass either noise (rollout mode) or prev_sample (training mode), not both")
    prev_sample = prev_sample.detach()
    return prev_sample, gaussian_log_prob(prev_sample, mean, std, reduce=reduce, validate=validate)
