"""Samplers: a schedule plus the step rule, indexed by per-sample step numbers.

A sampler turns "sample b is at step i" into the model's time input and, given the
model output, into the Gaussian of the next latent. Steps are LongTensors of shape (B,)
so one batch may mix steps; the math itself lives in `sde`.

An optional SDE window [start, end) restricts noise to those steps; the rest are
deterministic ODE steps (eta 0), as in MixGRPO / Flow-GRPO-Fast. The final sample is then a
function of the initial noise and the window's noise only, so the policy gradient needs
only the window's steps: fewer trained steps, and less variance from steps that merely
refine detail.
"""
from __future__ import annotations

import torch

from . import sde
from .ops.schedule import step_table
from .ops.validation import require_positive_std
from .cuda_graph import check_cuda_graph


class _StepNoise:
    """Which steps inject noise, and eta per step."""

    def _init_noise(self, num_steps: int, eta: float, sde_window, device) -> None:
        start, end = sde_window if sde_window is not None else (0, num_steps)
        if not 0 <= start < end <= num_steps:
            raise ValueError(f"sde_window {sde_window} must be [start, end) with 0 <= start < end <= {num_steps}")
        self.eta = eta
        self._tables: dict = {}  # (dtype, device) -> [coefficient table, std, validated]
        #: how many coefficient tables were built (one per dtype and device; see step_coefficients)
        self.table_builds = 0
        self.stochastic = torch.zeros(num_steps, dtype=torch.bool, device=device)
        if eta > 0:
            self.stochastic[start:end] = True
        #: the steps that have a log-prob, i.e. the ones GRPO can train on
        self.stochastic_steps: list[int] = self.stochastic.nonzero().flatten().tolist()

    def _init_graph(self, cuda_graph: bool, device) -> None:
        if cuda_graph:
            check_cuda_graph(device)
        #: replay each rollout chunk's whole denoising loop from a CUDA graph (dancegrpo.cuda_graph)
        self.cuda_graph = bool(cuda_graph)

    def eta_at(self, step: torch.Tensor, eta: float | None = None) -> torch.Tensor:
        eta = self.eta if eta is None else eta
        return torch.where(self.stochastic[step], eta, 0.0)

    def _to_noise(self, device) -> None:
        self.stochastic = self.stochastic.to(device)
        self._tables = {}

    # ------------------------------------------------------------ fused-step coefficients
    def step_coefficients(self, dtype: torch.dtype = torch.float32, device=None, validate: bool = True) -> torch.Tensor:
        """The fused SDE step's coefficient table of this sampler: (num_steps, 4) float64 on `device`.

        Row i holds (coef_x, coef_v, std, log std) of step i at the sampler's eta (the mean of
        step i is coef_x * x + coef_v * model_output; see dancegrpo.ops.schedule), computed in
        the compute dtype `dtype` (float32, or float64 for float64 latents) by the formulas of
        dancegrpo.ops.schedule. Built once per (dtype, device) on the CPU, where std > 0 is
        checked once for every step (ValueError naming the steps; skipped with validate=False),
        then copied to `device` (default: the sampler's): every later call is a dictionary
        lookup, with no host work and no host sync, as a CUDA-graph capture needs.
        """
        entry = self._tables.get((dtype, device))  # the hot path: a lookup with the caller's own key
        if entry is not None and (entry[2] or not validate):
            return entry[0]
        device = torch.device(device) if device is not None else self._device()
        key = (dtype, device)
        entry = self._tables.get(key)
        if entry is None:
            table, std = step_table(self.prediction, self.num_steps, dtype, torch.device("cpu"),
                                    eta=self.eta, **self._table_schedule())
            entry = self._tables[key] = [table.to(device), std, False]
            self.table_builds += 1
        if validate and not entry[2]:
            require_positive_std(entry[1])
            entry[2] = True
        return entry[0]


# Adapted from DanceGRPO fastvideo/train_grpo_flux.py::run_sample_step (Apache-2.0)
def floor_model_time(sigmas: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """The denoiser's time input for noise levels `sigmas` (any shape, float32): `sigmas`
    itself when `resolution` is None, else ``floor(sigmas * resolution) / resolution``
    computed in the dtype of `sigmas`, which for float32 sigmas and resolution 1000 is the
    authors' release ``int(sigma * 1000)`` (divided by 1000 again for FLUX).

    Raises ValueError for a resolution < 1.
    """
    if resolution is None:
        return sigmas
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"model_time_resolution = {resolution!r} must be an integer >= 1 (or None)")
    return torch.floor(sigmas * resolution) / resolution


class FlowSampler(_StepNoise):
    """Rectified flow on a time-shifted sigma schedule (FLUX, HunyuanVideo, SkyReels).

    `model_time_resolution` (None or N >= 1): the model's time input is sigma, or sigma floored
    to a multiple of 1/N (`floor_model_time`); the step rule always uses the exact sigmas.
    """

    prediction = "flow"

    def __init__(self, num_steps: int, shift: float, eta: float, form: str = "dancegrpo", device=None,
                 sde_window=None, cuda_graph: bool = False, model_time_resolution: int | None = None):
        self.num_steps = num_steps
        self._init_graph(cuda_graph, device)
        self._init_noise(num_steps, eta, sde_window, device)
        self.form = form
        self.sigmas = sde.flow_sigmas(num_steps, shift, device=device)
        self._sigmas_host = self.sigmas.cpu()  # for the step table, read here, never in a rollout
        self.model_time_resolution = model_time_resolution
        self.model_times = floor_model_time(self.sigmas, model_time_resolution)

    def model_time(self, step: torch.Tensor) -> torch.Tensor:
        """(B,) float32 time input of the denoiser at steps `step` (B,): see the class note."""
        return self.model_times[step]

    def _device(self) -> torch.device:
        return self.sigmas.device

    def _table_schedule(self) -> dict:
        sigmas = self._sigmas_host
        return dict(sigma=sigmas[:-1], sigma_next=sigmas[1:], form=self.form,
                    sigma_max=sigmas[1] if self.form == "flow_grpo" else None)

    def mean_std(self, model_output, sample, step: torch.Tensor, eta: float | None = None):
        return sde.flow_step_mean_std(
            model_output, sample, self.sigmas[step], self.sigmas[step + 1],
            self.eta_at(step, eta), form=self.form, sigma_max=self.sigmas[1])

    def to(self, device) -> "FlowSampler":
        self.sigmas, self.model_times = self.sigmas.to(device), self.model_times.to(device)
        self._to_noise(device)
        return self


class DDIMSampler(_StepNoise):
    """DDIM with eta for epsilon prediction (Stable Diffusion)."""

    prediction = "ddim"

    def __init__(self, num_steps: int, eta: float, alphas_cumprod: torch.Tensor | None = None,
                 steps_offset: int = 1, device=None, sde_window=None, cuda_graph: bool = False):
        self.num_steps = num_steps
        self._init_graph(cuda_graph, device)
        self._init_noise(num_steps, eta, sde_window, device)
        alphas_cumprod = sde.ddim_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        self.timesteps = sde.ddim_timesteps(num_steps, len(alphas_cumprod), steps_offset=steps_offset).to(device)
        abar_t, abar_prev = sde.ddim_schedule(num_steps, alphas_cumprod, self.timesteps)
        self.abar_t, self.abar_prev = abar_t.to(device), abar_prev.to(device)
        self._abar_host = (self.abar_t.cpu(), self.abar_prev.cpu())  # for the step table (see FlowSampler)

    def model_time(self, step: torch.Tensor) -> torch.Tensor:
        return self.timesteps[step]

    def _device(self) -> torch.device:
        return self.abar_t.device

    def _table_schedule(self) -> dict:
        return dict(abar_t=self._abar_host[0], abar_prev=self._abar_host[1])

    def mean_std(self, model_output, sample, step: torch.Tensor, eta: float | None = None):
        return sde.ddim_step_mean_std(model_output, sample, self.abar_t[step], self.abar_prev[step],
                                      self.eta_at(step, eta))

    def to(self, device) -> "DDIMSampler":
        for name in ("timesteps", "abar_t", "abar_prev"):
            setattr(self, name, getattr(self, name).to(device))
        self._to_noise(device)
        return self


def build_sampler(prediction: str, num_steps: int, eta: float, shift: float = 1.0,
                  form: str = "dancegrpo", device=None, sde_window=None, cuda_graph: bool = False,
                  model_time_resolution: int | None = None):
    """The sampler of a model's prediction type. ``cuda_graph`` (CUDA only, else ValueError) makes
    rollouts replay each chunk's denoising loop from a CUDA graph (see dancegrpo.cuda_graph).
    `model_time_resolution` applies to flow models only (DDIM's time input is already an integer
    timestep): ValueError for "ddim"."""
    if prediction == "flow":
        return FlowSampler(num_steps, shift, eta, form, device=device, sde_window=sde_window, cuda_graph=cuda_graph,
                           model_time_resolution=model_time_resolution)
    if prediction == "ddim":
        if model_time_resolution is not None:
            raise ValueError(f"sampler.model_time_resolution = {model_time_resolution} applies to flow models only: "
                             "this model is DDIM, whose time input is already an integer timestep; remove it")
        return DDIMSampler(num_steps, eta, device=device, sde_window=sde_window, cuda_graph=cuda_graph)
    raise ValueError(f"unknown model prediction type {prediction!r}: expected 'flow' or 'ddim'")
