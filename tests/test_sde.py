"""Tests for dancegrpo.sde against independent references.

References: diffusers' FlowMatchEulerDiscreteScheduler and DDIMScheduler, torch.distributions
.Normal, plain-Python per-element re-derivations, and sampling statistics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from dancegrpo import sde

SD14_DDIM = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# rectified flow vs diffusers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps,shift", [(16, 3.0), (10, 1.0), (7, 5.0)])
def test_flow_sigmas_match_diffusers_when_given_the_unshifted_grid(num_steps, shift):
    """What is compared: diffusers with ``shift`` configured, use_dynamic_shifting=False, and
    ``set_timesteps(sigmas=linspace(1, 0, N+1)[:-1])`` shifts those N sigmas itself and appends
    the terminal 0, giving N+1 sigmas that must equal ``flow_sigmas(N, shift)``.

    (diffusers' default ``set_timesteps(N)`` builds another schedule: N points from 1 down to
    shift(1/1000), shifted a second time, so it is deliberately not the reference here.)
    """
    sched = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1].tolist())
    ours = sde.flow_sigmas(num_steps, shift)
    assert ours.dtype == torch.float32 and ours.shape == (num_steps + 1,)
    torch.testing.assert_close(ours, sched.sigmas, atol=1e-6, rtol=0)
    assert ours[0] == 1.0 and ours[-1] == 0.0


def test_flow_step_eta0_equals_diffusers_euler_step():
    num_steps, shift = 8, 3.0
    sched = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1].tolist())
    sigmas = sde.flow_sigmas(num_steps, shift)
    g = _gen(0)
    x = torch.randn(2, 4, 6, 6, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=g)
        ref = sched.step(v, t, x).prev_sample
        mean, std = sde.flow_step_mean_std(v, x, sigmas[i], sigmas[i + 1], eta=0.0)
        torch.testing.assert_close(mean, ref, atol=1e-5, rtol=0)
        assert torch.all(std == 0)
        x = ref


def test_flow_dancegrpo_step_matches_naive_definition_eta_positive():
    """Independent plain-float re-derivation of the DanceGRPO step for eta > 0."""
    g = _gen(1)
    x = torch.randn(2, 3, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, generator=g, dtype=torch.float64)
    s, s_next, eta = 0.7, 0.55, 0.3
    mean, std = sde.flow_step_mean_std(v, x, s, s_next, eta)
    assert mean.dtype == torch.float64
    for idx in np.ndindex(2, 3):
        xi, vi = float(x[idx]), float(v[idx])
        x0 = xi - s * vi
        score = -(xi - (1 - s) * x0) / (s * s)
        expected = xi + (s_next - s) * vi - 0.5 * eta * eta * score * (s_next - s)
        assert math.isclose(float(mean[idx]), expected, rel_tol=0, abs_tol=1e-12)
    assert math.isclose(float(std), eta * math.sqrt(s - s_next), rel_tol=1e-12)


# --------------------------------------------------------------------------------------------
# flow_grpo form
# --------------------------------------------------------------------------------------------


def _naive_flow_grpo(x: float, v: float, s: float, s_next: float, eta: float, s_max: float):
    """Flow-GRPO Euler-Maruyama step written out per element in Python floats."""
    denom = 1.0 - (s_max if s == 1.0 else s)
    sd = eta * math.sqrt(s / denom)
    dt = s_next - s
    drift = v + sd * sd / (2 * s) * (x + (1 - s) * v)
    return x + drift * dt, sd * math.sqrt(-dt)


@pytest.mark.parametrize("step", [0, 3])
def test_flow_grpo_form_matches_naive_rederivation(step):
    sigmas = sde.flow_sigmas(10, 3.0).double()
    s, s_next, s_max = float(sigmas[step]), float(sigmas[step + 1]), float(sigmas[1])
    eta = 0.7
    g = _gen(2)
    x = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)
    mean, std = sde.flow_step_mean_std(v, x, s, s_next, eta, form="flow_grpo", sigma_max=s_max)
    for idx in np.ndindex(*x.shape):
        exp_mean, exp_std = _naive_flow_grpo(float(x[idx]), float(v[idx]), s, s_next, eta, s_max)
        assert math.isclose(float(mean[idx]), exp_mean, rel_tol=0, abs_tol=1e-12)
        assert math.isclose(float(std), exp_std, rel_tol=1e-12)
    assert float(std) > 0  # at sigma == 1 too, thanks to sigma_max


def test_flow_grpo_eta0_is_euler():
    g = _gen(3)
    x, v = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mean, _ = sde.flow_step_mean_std(v, x, 0.6, 0.4, 0.0, form="flow_grpo")
    torch.testing.assert_close(mean, x - 0.2 * v, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# DDIM vs diffusers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [50, 7, 3])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_and_alphas_match_diffusers(num_steps, spacing):
    sched = DDIMScheduler(**SD14_DDIM, timestep_spacing=spacing)
    sched.set_timesteps(num_steps)
    ours = sde.ddim_timesteps(num_steps, 1000, steps_offset=1, spacing=spacing)
    assert ours.dtype == torch.long
    assert torch.equal(ours, sched.timesteps)
    torch.testing.assert_close(sde.ddim_alphas_cumprod(), sched.alphas_cumprod, atol=0, rtol=0)


def test_ddim_linear_beta_schedule_matches_diffusers():
    sched = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    ours = sde.ddim_alphas_cumprod(1000, 0.0001, 0.02, "linear")
    torch.testing.assert_close(ours, sched.alphas_cumprod, atol=0, rtol=0)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_schedule_and_eta0_step_match_diffusers(set_alpha_to_one):
    num_steps = 10
    cfg = dict(SD14_DDIM, set_alpha_to_one=set_alpha_to_one)
    sched = DDIMScheduler(**cfg)
    sched.set_timesteps(num_steps)
    timesteps = sde.ddim_timesteps(num_steps)
    abar_t, abar_prev = sde.ddim_schedule(num_steps, sde.ddim_alphas_cumprod(), timesteps, set_alpha_to_one)
    g = _gen(4)
    x = torch.randn(2, 4, 5, 5, generator=g)
    for i, t in enumerate(sched.timesteps):
        prev_t = int(t) - 1000 // num_steps
        ref_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        assert float(abar_t[i]) == float(sched.alphas_cumprod[t])
        assert float(abar_prev[i]) == float(ref_prev)
        eps = torch.randn(x.shape, generator=g)
        ref = sched.step(eps, t, x, eta=0.0).prev_sample
        mean, std = sde.ddim_step_mean_std(eps, x, abar_t[i], abar_prev[i], eta=0.0)
        torch.testing.assert_close(mean, ref, atol=1e-5, rtol=1e-5)
        assert torch.all(std == 0)
        x = ref


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_step_mean_and_std_match_diffusers(eta):
    num_steps = 10
    sched = DDIMScheduler(**SD14_DDIM)
    sched.set_timesteps(num_steps)
    abar_t, abar_prev = sde.ddim_schedule(num_steps, sde.ddim_alphas_cumprod(), sde.ddim_timesteps(num_steps))
    g = _gen(5)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for i, t in enumerate(sched.timesteps):
        eps = torch.randn(x.shape, generator=g)
        mean, std = sde.ddim_step_mean_std(eps, x, abar_t[i], abar_prev[i], eta=eta)
        ref_mean = sched.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        ref_mean_plus_std = sched.step(eps, t, x, eta=eta, variance_noise=torch.ones_like(x)).prev_sample
        torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mean + std, ref_mean_plus_std, atol=1e-5, rtol=1e-5)
        prev_t = int(t) - 1000 // num_steps
        ref_std = eta * sched._get_variance(int(t), prev_t) ** 0.5
        torch.testing.assert_close(std, ref_std.to(std.dtype), atol=1e-7, rtol=1e-5)
        assert float(std) > 0
        x = ref_mean + std * torch.randn(x.shape, generator=g)


def test_ddim_clip_sample_matches_diffusers():
    sched = DDIMScheduler(**dict(SD14_DDIM, clip_sample=True, clip_sample_range=1.0))
    sched.set_timesteps(10)
    abar_t, abar_prev = sde.ddim_schedule(10, sde.ddim_alphas_cumprod(), sde.ddim_timesteps(10))
    g = _gen(6)
    x, eps = 3 * torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    i, t = 2, sched.timesteps[2]
    ref = sched.step(eps, t, x, eta=0.0).prev_sample
    mean, _ = sde.ddim_step_mean_std(eps, x, abar_t[i], abar_prev[i], eta=0.0, clip_sample=1.0)
    torch.testing.assert_close(mean, ref, atol=1e-5, rtol=1e-5)
    unclipped, _ = sde.ddim_step_mean_std(eps, x, abar_t[i], abar_prev[i], eta=0.0)
    assert not torch.allclose(unclipped, ref, atol=1e-3)


# --------------------------------------------------------------------------------------------
# log-prob
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sample_std", [False, True])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_gaussian_log_prob_matches_torch_normal(dtype, per_sample_std, reduce):
    g = _gen(7)
    B = 3
    mean = torch.randn(B, 2, 4, 4, generator=g).to(dtype)
    x = (mean.float() + 0.5 * torch.randn(mean.shape, generator=g)).to(dtype)
    std = torch.tensor([0.2, 0.5, 1.3]) if per_sample_std else 0.4
    ours = sde.gaussian_log_prob(x, mean, std, reduce=reduce)
    ref_std = std.view(B, 1, 1, 1) if per_sample_std else torch.tensor(std)
    ref_elem = torch.distributions.Normal(mean.float(), ref_std).log_prob(x.float())
    ref = ref_elem.mean(dim=(1, 2, 3)) if reduce == "mean" else ref_elem.sum(dim=(1, 2, 3))
    assert ours.dtype == torch.float32 and ours.shape == (B,)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_log_prob_gradient_matches_autograd_of_normal():
    g = _gen(8)
    mean = torch.randn(2, 6, generator=g, requires_grad=True)
    x = torch.randn(2, 6, generator=g)
    std = torch.tensor([0.3, 0.9])
    sde.gaussian_log_prob(x, mean, std).sum().backward()
    ours = mean.grad.clone()
    mean.grad = None
    torch.distributions.Normal(mean, std[:, None]).log_prob(x).mean(dim=1).sum().backward()
    torch.testing.assert_close(ours, mean.grad)


# --------------------------------------------------------------------------------------------
# sampling statistics and rollout/training consistency
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dancegrpo", "flow_grpo"])
def test_sampled_next_latents_have_the_formula_mean_and_std(form):
    """4 groups x 20000 elements with different sigmas; the std estimate has ~0.5% relative
    standard error, so the 2% tolerance fails for a 5% error in std."""
    n = 20000
    sigma = torch.tensor([1.0, 0.8, 0.5, 0.2])
    sigma_next = torch.tensor([0.9, 0.6, 0.45, 0.0])
    eta, s_max = 0.3, 0.9
    g = _gen(9)
    x = torch.randn(4, n, generator=g)
    v = torch.randn(4, n, generator=g)
    mean, std = sde.flow_step_mean_std(v, x, sigma, sigma_next, eta, form=form, sigma_max=s_max)
    x_next, log_prob = sde.sde_step_with_log_prob(mean, std, generator=g)
    for b in range(4):
        s, sn = float(sigma[b]), float(sigma_next[b])
        if form == "dancegrpo":
            exp_std = eta * math.sqrt(s - sn)
        else:
            exp_std = _naive_flow_grpo(0.0, 0.0, s, sn, eta, s_max)[1]
        resid = x_next[b] - mean[b]
        assert abs(float(resid.mean())) < 4 * exp_std / math.sqrt(n)
        assert abs(float(resid.std()) / exp_std - 1) < 0.02
        # E[log N(x; m, s)] = -0.5*log(2*pi*e*s^2): ties sampling and log-prob together.
        exp_lp = -0.5 * math.log(2 * math.pi * math.e * exp_std**2)
        assert abs(float(log_prob[b]) - exp_lp) < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_rollout_and_training_log_probs_are_bit_identical(dtype, reduce):
    g = _gen(10)
    latents = torch.randn(3, 4, 8, 8, generator=g).to(dtype)
    velocity = torch.randn(latents.shape, generator=g).to(dtype)
    sigma = torch.tensor([1.0, 0.6, 0.3])
    sigma_next = torch.tensor([0.9, 0.5, 0.1])
    mean, std = sde.flow_step_mean_std(velocity, latents, sigma, sigma_next, eta=0.3)
    prev, lp_rollout = sde.sde_step_with_log_prob(mean, std, generator=g, reduce=reduce, dtype=dtype)
    assert prev.dtype == dtype and lp_rollout.dtype == torch.float32
    # training mode recomputes mean/std from the same inputs and scores the stored action
    mean2, std2 = sde.flow_step_mean_std(velocity, latents, sigma, sigma_next, eta=0.3)
    prev2, lp_train = sde.sde_step_with_log_prob(mean2, std2, prev_sample=prev, reduce=reduce)
    assert torch.equal(prev2, prev)
    assert torch.equal(lp_rollout, lp_train)


def test_sample_step_uses_given_noise_and_generator():
    mean = torch.zeros(2, 3)
    noise = torch.ones(2, 3)
    torch.testing.assert_close(sde.sample_step(mean, torch.tensor([2.0, 3.0]), noise=noise),
                               torch.tensor([[2.0] * 3, [3.0] * 3]))
    a = sde.sample_step(mean, 1.0, generator=_gen(11))
    b = sde.sample_step(mean, 1.0, generator=_gen(11))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# per-sample broadcasting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dancegrpo", "flow_grpo"])
def test_per_sample_flow_sigmas_equal_looping_per_sample(form):
    g = _gen(12)
    x = torch.randn(3, 2, 4, 4, generator=g)
    v = torch.randn(x.shape, generator=g)
    sigma = torch.tensor([1.0, 0.7, 0.25])
    sigma_next = torch.tensor([0.9, 0.5, 0.0])
    eta = torch.tensor([0.3, 0.5, 1.0])
    mean, std = sde.flow_step_mean_std(v, x, sigma, sigma_next, eta, form=form, sigma_max=0.9)
    for b in range(3):
        m_b, s_b = sde.flow_step_mean_std(v[b:b + 1], x[b:b + 1], float(sigma[b]), float(sigma_next[b]),
                                          float(eta[b]), form=form, sigma_max=0.9)
        torch.testing.assert_close(mean[b:b + 1], m_b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(std[b].reshape(()), s_b.reshape(()), atol=1e-7, rtol=1e-6)


def test_per_sample_ddim_equals_looping_per_sample():
    abar_t, abar_prev = sde.ddim_schedule(50, sde.ddim_alphas_cumprod(), sde.ddim_timesteps(50))
    idx = torch.tensor([0, 17, 49])
    g = _gen(13)
    x, eps = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    mean, std = sde.ddim_step_mean_std(eps, x, abar_t[idx], abar_prev[idx], eta=1.0)
    for b, i in enumerate(idx.tolist()):
        m_b, s_b = sde.ddim_step_mean_std(eps[b:b + 1], x[b:b + 1], float(abar_t[i]), float(abar_prev[i]),
                                          eta=1.0)
        torch.testing.assert_close(mean[b:b + 1], m_b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(std[b].reshape(()), s_b.reshape(()), atol=1e-7, rtol=1e-6)


def test_bf16_inputs_are_computed_in_float32():
    g = _gen(14)
    x, v = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    m16, _ = sde.flow_step_mean_std(v.bfloat16(), x.bfloat16(), 0.5, 0.4, 0.3)
    m32, _ = sde.flow_step_mean_std(v.bfloat16().float(), x.bfloat16().float(), 0.5, 0.4, 0.3)
    assert m16.dtype == torch.float32
    assert torch.equal(m16, m32)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_unknown_form_is_rejected_with_allowed_forms():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"'ddpm'.*dancegrpo.*flow_grpo"):
        sde.flow_step_mean_std(x, x, 0.5, 0.4, 0.3, form="ddpm")


def test_log_prob_rejects_nonpositive_std():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="eta > 0"):
        sde.gaussian_log_prob(x, x, 0.0)
    with pytest.raises(ValueError, match="std > 0"):
        sde.gaussian_log_prob(x, x, torch.tensor([0.5, -0.1]))
    mean, std = sde.flow_step_mean_std(x, x, 0.5, 0.4, eta=0.0)
    with pytest.raises(ValueError, match="eta > 0"):
        sde.sde_step_with_log_prob(mean, std, generator=_gen(0))


def test_flow_grpo_needs_sigma_max_only_at_sigma_one():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sigma_max"):
        sde.flow_step_mean_std(x, x, torch.tensor([1.0, 0.5]), torch.tensor([0.9, 0.4]), 0.7,
                               form="flow_grpo")
    mean, std = sde.flow_step_mean_std(x, x, 0.5, 0.4, 0.7, form="flow_grpo")
    assert float(std) > 0


def test_other_argument_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduce"):
        sde.gaussian_log_prob(x, x, 1.0, reduce="max")
    with pytest.raises(ValueError, match="spacing"):
        sde.ddim_timesteps(10, spacing="karras")
    with pytest.raises(ValueError, match="beta_schedule"):
        sde.ddim_alphas_cumprod(beta_schedule="cosine")
    with pytest.raises(ValueError, match="per-sample"):
        sde.flow_step_mean_std(x, x, torch.tensor([0.5, 0.5, 0.5]), 0.4, 0.3)
