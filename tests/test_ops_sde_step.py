"""fused_sde_step on every CPU backend against the torch reference evaluated in float64.

Tolerances come from a first-order float32 error model rather than from fixed numbers. The
mean a*x + b*v rounds with an error of a few EPS32 times |a*x| + |b*v| (the reference's
regrouped terms round the same way), and the log-prob scores (action - mean)^2 / std^2, so
its error is bounded by 8 EPS32 (mean(|action - mean| * terms) / std^2 + |logp| + 1). This
grows as std shrinks, as it must: the reference in float32 has the same error. A bfloat16
action is the float32 value rounded to bfloat16, so it may differ from the float64 value by
half a bfloat16 ulp plus that float32 error. A wrong formula, coefficient or reduction gives
errors orders of magnitude above these bounds.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

from dancegrpo import ops, sde
from dancegrpo.sampler import DDIMSampler, FlowSampler
from ops_helpers import ErrorModel, backends_under_test, ddim_case, flow_case, reference_log_prob

BACKENDS = backends_under_test()
SHAPES = [(3, 5), (2, 3, 61, 47)]  # 5 and 8601 elements per sample: below and across block/chunk sizes
CASES = [("flow", "dancegrpo"), ("flow", "flow_grpo"), ("ddim", None)]


SEED = int(os.environ.get("DANCEGRPO_TEST_SEED", "0"))


def _seed(*labels) -> int:
    return zlib.crc32(repr(labels).encode()) % 1000  # stable across processes, unlike hash()


# The torch backend is the reference itself (checked bit for bit against dancegrpo.sde below,
# and dancegrpo.sde against diffusers in test_sde.py); the float64 comparisons are for kernels.
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    return request.param


def make_case(kind, form, std_scale, batch, gen):
    return flow_case(batch, form, std_scale, gen) if kind == "flow" else ddim_case(batch, std_scale, gen)


def make_inputs(shape, dtype, seed, model_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(model_dtype or dtype)
    noise = torch.randn(shape, generator=gen).to(dtype)
    return x, v, noise, gen


def assert_log_prob_close(got, v, x, action, case):
    truth = reference_log_prob(v, x, action, case, torch.float64)
    mean64, _ = ops.reference.step_mean_std(v.double(), x.double(), **case)
    bound = ErrorModel(v, x, action, case).log_prob_bound(action.double() - mean64, truth)
    err = (got.double() - truth).abs()
    assert bool((err <= bound).all()), f"log-prob error {(err / bound).max():.3g} x the bound"


def assert_action_close(got, v, x, noise, case):
    """got: the stored action; within float32 rounding (+ half a 16-bit ulp) of the float64 one."""
    next64, _ = ops.fused_sde_step(v.double(), x.double(), **case, noise=noise.double(), backend="torch")
    bound = ErrorModel(v, x, next64, case).action_bound(noise)
    if got.dtype in (torch.bfloat16, torch.float16):
        mantissa = 7 if got.dtype == torch.bfloat16 else 10
        top = torch.maximum(got.double().abs(), next64.abs()).clamp(min=1e-30)
        bound = bound + 0.5 * 2.0 ** (torch.floor(torch.log2(top)) - mantissa)
    err = (got.double() - next64).abs()
    assert bool((err <= bound).all()), f"action error {(err / bound).max():.3g} x the bound"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,form", CASES)
@pytest.mark.parametrize("std_scale", ["small", "normal", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_matches_reference(kernel_backend, shape, kind, form, std_scale, dtype):
    x, v, noise, gen = make_inputs(shape, dtype, seed=SEED + _seed(kind, form, std_scale))
    case = make_case(kind, form, std_scale, shape[0], gen)
    got_next, got_logp = ops.fused_sde_step(v, x, **case, noise=noise, backend=kernel_backend)

    assert got_next.dtype == dtype and got_next.shape == x.shape
    assert got_logp.dtype == torch.float32 and got_logp.shape == (shape[0],)
    assert_action_close(got_next, v, x, noise, case)
    assert_log_prob_close(got_logp, v, x, got_next, case)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,form", CASES)
@pytest.mark.parametrize("std_scale", ["small", "normal", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_log_prob_and_gradient_match_reference(kernel_backend, shape, kind, form, std_scale, dtype):
    x, v, noise, gen = make_inputs(shape, dtype, seed=SEED + 7 + _seed(kind, form, std_scale))
    case = make_case(kind, form, std_scale, shape[0], gen)
    prev, _ = ops.fused_sde_step(v, x, **case, noise=noise, backend="torch")
    weights = torch.randn(shape[0], generator=gen)

    v_fused = v.clone().requires_grad_()
    _, logp = ops.fused_sde_step(v_fused, x, **case, prev_sample=prev, backend=kernel_backend)
    (grad,) = torch.autograd.grad((logp * weights).sum(), v_fused)
    assert_log_prob_close(logp.detach(), v, x, prev, case)

    v_ref = v.double().requires_grad_()
    (truth,) = torch.autograd.grad((reference_log_prob(v_ref, x, prev, case) * weights.double()).sum(), v_ref)
    assert grad.dtype == dtype
    bound = ErrorModel(v, x, prev, case).grad_bound(weights, truth)
    if dtype == torch.bfloat16:  # the float32 gradient rounded to bfloat16: half an ulp more
        bound = bound + truth.abs() * 2.0**-8
    err = (grad.double() - truth).abs()
    assert bool((err <= bound).all()), f"gradient error {(err / bound).max():.3g} x the bound"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind,form", CASES)
def test_rollout_and_training_log_probs_are_bit_identical(backend, dtype, kind, form):
    """The PPO ratio at the first update is exactly 1 only if both modes agree to the last bit."""
    shape = (3, 4, 33, 65)  # 8580 elements: more than one reduction chunk / block per sample
    x, v, noise, gen = make_inputs(shape, dtype, seed=3)
    case = make_case(kind, form, "normal", shape[0], gen)
    next_sample, logp_rollout = ops.fused_sde_step(v, x, **case, noise=noise, backend=backend)
    _, logp_train = ops.fused_sde_step(v, x, **case, prev_sample=next_sample, backend=backend)
    assert torch.equal(logp_rollout, logp_train)


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_output_with_float32_latents(kernel_backend, model_dtype):
    """Autocast: a 16-bit model output with float32 latents; upcast exactly, computed in float32."""
    x, v, noise, gen = make_inputs((2, 3, 17, 19), torch.float32, seed=11, model_dtype=model_dtype)
    case = flow_case(2, "dancegrpo", "normal", gen)
    got_next, got_logp = ops.fused_sde_step(v, x, **case, noise=noise, backend=kernel_backend)
    assert got_next.dtype == torch.float32
    assert_action_close(got_next, v, x, noise, case)
    assert_log_prob_close(got_logp, v.float(), x, got_next, case)
    v_grad = v.clone().requires_grad_()
    _, logp = ops.fused_sde_step(v_grad, x, **case, prev_sample=got_next, backend=kernel_backend)
    (grad,) = torch.autograd.grad(logp.sum(), v_grad)
    v_ref = v.double().requires_grad_()
    (truth,) = torch.autograd.grad(reference_log_prob(v_ref, x, got_next, case).sum(), v_ref)
    assert grad.dtype == model_dtype
    torch.testing.assert_close(grad.double(), truth, rtol=2.0**-7, atol=1e-4 * truth.abs().max().item())


def test_float64_matches_reference_tightly(kernel_backend):
    x, v, noise, gen = make_inputs((2, 3, 9, 11), torch.float64, seed=5)
    case = ddim_case(2, "normal", gen)
    got_next, got_logp = ops.fused_sde_step(v, x, **case, noise=noise, backend=kernel_backend)
    ref_next, ref_logp = ops.fused_sde_step(v, x, **case, noise=noise, backend="torch")
    assert got_logp.dtype == torch.float64
    torch.testing.assert_close(got_next, ref_next, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got_logp, ref_logp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stored_action_is_rounded_to_nearest_even_like_torch(backend, dtype):
    """With mean = 0 the action is std * noise in float32, then rounded to the latent dtype:
    it must equal torch's own rounding of that product over the whole 16-bit range."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    noise = bits.view(dtype)
    finite = torch.isfinite(noise.float())
    noise = noise[finite][: 31 * 2048].reshape(31, 2048)
    x = torch.zeros_like(noise)
    v = torch.zeros_like(noise)
    # ddim with abar_t == abar_prev... would give std 0; a flow step with eta sets std = eta*sqrt(-dt).
    sigma, sigma_next, eta = 0.75, 0.5, 1.0 / 3.0
    std = torch.tensor(eta) * torch.sqrt(torch.tensor(sigma - sigma_next))  # float32, as the coefficients
    got, _ = ops.fused_sde_step(v, x, prediction="flow", sigma=sigma, sigma_next=sigma_next, eta=eta, noise=noise,
                                backend=backend, validate=True)
    coef_x = 1 + 0.5 * torch.tensor(eta) ** 2 * torch.tensor(sigma_next - sigma) / torch.tensor(sigma)
    assert coef_x != 0  # mean = coef_x * 0 + coef_v * 0 = 0 exactly
    expected = (0.0 + std * noise.float()).to(dtype)  # 0.0 +: the mean is +0, so -0 noise gives +0
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_torch_backend_equals_the_trainer_math_bit_for_bit():
    """backend="torch" is exactly sampler.mean_std + sde.sde_step_with_log_prob (today's trainer path)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    v = torch.randn(4, 3, 8, 8, generator=gen)
    noise = torch.randn(4, 3, 8, 8, generator=gen)
    step = torch.tensor([0, 3, 5, 8])
    for sampler in (FlowSampler(10, 3.0, 0.5, "dancegrpo"), FlowSampler(10, 3.0, 0.5, "flow_grpo"),
                    DDIMSampler(10, 1.0)):
        mean, std = sampler.mean_std(v, x, step)
        ref_next, ref_logp = sde.sde_step_with_log_prob(mean, std, noise=noise)
        got_next, got_logp = ops.sampler_step(sampler, v, x, step, noise=noise, backend="torch")
        assert torch.equal(got_next, ref_next) and torch.equal(got_logp, ref_logp)
        _, ref_train = sde.sde_step_with_log_prob(mean, std, prev_sample=ref_next)
        _, got_train = ops.sampler_step(sampler, v, x, step, prev_sample=ref_next, backend="torch")
        assert torch.equal(got_train, ref_train)


def test_sampler_step_matches_fused_call(kernel_backend):
    gen = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(3, 2, 5, 7, generator=gen) for _ in range(3))
    step = torch.tensor([0, 4, 9])
    for sampler in (FlowSampler(10, 3.0, 0.5, "flow_grpo"), DDIMSampler(10, 1.0)):
        got_next, got_logp = ops.sampler_step(sampler, v, x, step, noise=noise, backend=kernel_backend)
        mean, std = sampler.mean_std(v, x, step)
        torch.testing.assert_close(got_next, mean + std * noise, rtol=1e-5, atol=1e-5)
        case = ({"prediction": "flow", "sigma": sampler.sigmas[step], "sigma_next": sampler.sigmas[step + 1],
                 "eta": sampler.eta, "form": sampler.form, "sigma_max": sampler.sigmas[1]}
                if sampler.prediction == "flow" else
                {"prediction": "ddim", "abar_t": sampler.abar_t[step], "abar_prev": sampler.abar_prev[step],
                 "eta": sampler.eta})
        assert_log_prob_close(got_logp, v, x, got_next, case)


# ------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kind", ["flow", "ddim"])
def test_eta_zero_has_no_log_prob_and_says_so(backend, kind):
    x, v, noise, gen = make_inputs((2, 3, 4), torch.float32, seed=0)
    case = flow_case(2, "dancegrpo", "normal", gen) if kind == "flow" else ddim_case(2, "normal", gen)
    case["eta"] = torch.tensor([0.5, 0.0])
    with pytest.raises(ValueError, match=r"std must be > 0.*eta = 0.*sample\(s\) \[1\]"):
        ops.fused_sde_step(v, x, **case, noise=noise, backend=backend)
    with pytest.raises(ValueError, match="std must be > 0"):
        ops.fused_sde_step(v, x, **case, prev_sample=noise, backend=backend)


def test_bad_inputs_give_clear_errors(backend):
    x, v, noise, gen = make_inputs((2, 3, 4), torch.float32, seed=0)
    case = flow_case(2, "dancegrpo", "normal", gen)
    with pytest.raises(ValueError, match=r"model_output shape \(2, 3, 5\) differs from sample shape \(2, 3, 4\)"):
        ops.fused_sde_step(torch.randn(2, 3, 5), x, **case, noise=noise, backend=backend)
    with pytest.raises(ValueError, match="noise shape"):
        ops.fused_sde_step(v, x, **case, noise=noise[:1], backend=backend)
    with pytest.raises(ValueError, match="exactly one of noise"):
        ops.fused_sde_step(v, x, **case, noise=noise, prev_sample=noise, backend=backend)
    with pytest.raises(ValueError, match="exactly one of noise"):
        ops.fused_sde_step(v, x, **case, backend=backend)
    with pytest.raises(TypeError, match="must be float32, float64, bfloat16 or float16, got torch.int64"):
        ops.fused_sde_step(v, x.long(), **case, noise=noise, backend=backend)
    with pytest.raises(TypeError, match="model_output dtype torch.float64 does not fit sample dtype torch.float32"):
        ops.fused_sde_step(v.double(), x, **case, noise=noise, backend=backend)
    with pytest.raises(TypeError, match="noise dtype torch.bfloat16 differs from sample dtype torch.float32"):
        ops.fused_sde_step(v, x, **case, noise=noise.bfloat16(), backend=backend)
    with pytest.raises(ValueError, match=r"sigma has shape \(3,\); pass a scalar or one value per sample"):
        ops.fused_sde_step(v, x, **dict(case, sigma=torch.rand(3)), noise=noise, backend=backend)
    with pytest.raises(ValueError, match="unknown prediction 'eps'"):
        ops.fused_sde_step(v, x, **dict(case, prediction="eps"), noise=noise, backend=backend)
    with pytest.raises(ValueError, match="unknown flow step form 'ddpm'"):
        ops.fused_sde_step(v, x, **dict(case, form="ddpm"), noise=noise, backend=backend)
    with pytest.raises(ValueError, match="sample requires grad"):
        ops.fused_sde_step(v, x.requires_grad_(), **case, prev_sample=noise, backend=backend)
    with pytest.raises(ValueError, match="sigma == 1 divides by 1 - sigma; pass sigma_max"):
        ops.fused_sde_step(v, x.detach(), **dict(case, form="flow_grpo", sigma=1.0, sigma_max=None), noise=noise,
                           backend=backend)
