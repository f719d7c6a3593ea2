"""rollout.ode_sample, the deterministic (eta = 0) sampler used for evaluation, against closed forms.

References: a constant velocity field, whose Euler ODE lands exactly at x_T - v whatever the
schedule, and the exact epsilon of a known x0, with which deterministic DDIM stays on the line
x_t = sqrt(abar) x0 + sqrt(1 - abar) eps0 at every step (hand-derived, float64).
"""
from __future__ import annotations

import math

import torch

from dancegrpo import sde
from dancegrpo.rollout import ode_sample
from dancegrpo.sampler import DDIMSampler, FlowSampler


class _FieldAdapter:
    """The adapter protocol's `predict`, driven by a function of (latents, time input, cond)."""

    def __init__(self, field):
        self.field, self.calls = field, []

    def predict(self, latents, t, cond):
        self.calls.append(t.clone())
        return self.field(latents, t, cond)


def test_flow_ode_sample_with_constant_velocity_lands_at_x_minus_v():
    g = torch.Generator().manual_seed(15)
    x_T, v = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    adapter = _FieldAdapter(lambda x, t, cond: cond["v"])  # each row's own velocity: checks the cond split
    sampler = FlowSampler(12, shift=3.0, eta=0.0)
    x_0 = ode_sample(adapter, sampler, {"v": v}, x_T, chunk_size=2)
    torch.testing.assert_close(x_0, x_T - v, atol=1e-5, rtol=0)
    sigmas = sde.flow_sigmas(12, shift=3.0)
    # chunks of 2 then 1 rows, each through all 12 steps at time input sigma_i
    expected = [sigmas[i].expand(n) for n in (2, 1) for i in range(12)]
    assert len(adapter.calls) == len(expected)
    for got, want in zip(adapter.calls, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ddim_ode_sample_with_true_eps_recovers_the_known_x0_line():
    """SD v1.4's schedule (set_alpha_to_one False): the last step ends at abar = alphas_cumprod[0]."""
    num_steps = 20
    ac = sde.ddim_alphas_cumprod().double()
    g = torch.Generator().manual_seed(16)
    x0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    eps0 = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t_first = int(sde.ddim_timesteps(num_steps)[0])
    x_T = math.sqrt(ac[t_first]) * x0 + math.sqrt(1 - ac[t_first]) * eps0

    def true_eps(x, t, cond):
        a = ac[t].reshape(-1, 1, 1)
        return (x - a.sqrt() * x0[cond["row"]]) / (1 - a).sqrt()

    sampler = DDIMSampler(num_steps, eta=0.0, alphas_cumprod=ac)
    out = ode_sample(_FieldAdapter(true_eps), sampler, {"row": torch.arange(2)}, x_T, chunk_size=1)
    a_final = float(ac[0])
    expected = math.sqrt(a_final) * x0 + math.sqrt(1 - a_final) * eps0
    torch.testing.assert_close(out, expected, atol=1e-8, rtol=1e-8)
