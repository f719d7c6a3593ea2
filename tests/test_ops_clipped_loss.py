"""fused_clipped_loss on every CPU backend against grpo.clipped_ratio_loss (the reference).

Same dtype: loss, statistics and gradient agree to float32 rounding (the kernels sum in a
different order and may round exp differently by an ulp): rtol 1e-5. The reference's
subgradient conventions (maximum splits ties, clamp passes its bounds) are matched exactly,
which the tie cases below check with exact values.
"""
from __future__ import annotations

import pytest
import torch

from dancegrpo import grpo, ops
from ops_helpers import backends_under_test

BACKENDS = backends_under_test()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def inputs(n, dtype, seed, spread=1e-3, adv_scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(n, generator=gen, dtype=torch.float64)
    new = old + spread * torch.randn(n, generator=gen, dtype=torch.float64)
    adv = adv_scale * torch.randn(n, generator=gen, dtype=torch.float64)
    return new.to(dtype), old.to(dtype), adv.to(dtype)


def run(fn, new, old, adv, clip_range, adv_clip_max, **kw):
    new = new.clone().requires_grad_()
    out = fn(new, old, adv, clip_range, adv_clip_max, **kw)
    (grad,) = torch.autograd.grad(out.loss, new)
    return out, grad


def assert_matches_reference(new, old, adv, clip_range, adv_clip_max, backend, rtol=1e-5):
    got, got_grad = run(ops.fused_clipped_loss, new, old, adv, clip_range, adv_clip_max, backend=backend)
    ref, ref_grad = run(grpo.clipped_ratio_loss, new, old, adv, clip_range, adv_clip_max)
    # The loss is a mean of terms of size |A|*r that can cancel: its error scales with that size.
    scale = (adv.double().abs() * ref.ratio.double()).mean().item() + 1e-6
    assert got.loss.dtype == ref.loss.dtype and got.loss.shape == ()
    torch.testing.assert_close(got.loss, ref.loss, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(got.ratio, ref.ratio, rtol=rtol, atol=0)
    for field in ("ratio_mean", "ratio_min", "ratio_max"):
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=rtol, atol=0)
    torch.testing.assert_close(got.clip_fraction, ref.clip_fraction, rtol=0, atol=1.5 / new.numel())
    assert got_grad.dtype == new.dtype
    grad_rtol = 2.0**-7 if new.dtype == torch.bfloat16 else rtol
    torch.testing.assert_close(got_grad.double(), ref_grad.double(), rtol=grad_rtol,
                               atol=grad_rtol * ref_grad.abs().max().item() + 1e-12)
    assert not got.ratio.requires_grad and not got.clip_fraction.requires_grad
    return got, got_grad


@pytest.mark.parametrize("n", [1, 7, 1023, 1025, 5000])  # around the block (1024) and chunk (4096) sizes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("adv_clip_max", [None, 2.0])
def test_matches_reference(backend, n, dtype, adv_clip_max):
    # bf16 log-probs near 1 are 1/128 apart: spread them and clip so that ratios straddle the range
    spread, clip_range = (3e-2, 1e-2) if dtype == torch.bfloat16 else (1e-3, 1e-3)
    new, old, adv = inputs(n, dtype, seed=n, spread=spread)
    got, _ = assert_matches_reference(new, old, adv, clip_range, adv_clip_max, backend)
    if n >= 1023:
        assert 0.1 < got.clip_fraction.item() < 0.9  # both branches are exercised


def test_float64_is_tight(backend):
    new, old, adv = inputs(3001, torch.float64, seed=1)
    assert_matches_reference(new, old, adv, 1e-3, 5.0, backend, rtol=1e-12)


def test_equal_log_probs_give_ratio_one_and_the_policy_gradient(backend):
    """First update: ratio exactly 1, in range, so the maximum ties and the gradient is -A/N."""
    new, _, adv = inputs(37, torch.float32, seed=2)
    out, grad = run(ops.fused_clipped_loss, new, new.clone(), adv, 1e-4, 5.0, backend=backend)
    assert torch.equal(out.ratio, torch.ones(37))
    assert out.clip_fraction.item() == 0 and out.ratio_min.item() == 1 and out.ratio_max.item() == 1
    torch.testing.assert_close(grad, -adv.clamp(-5, 5) / 37, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, -adv.clamp(-5, 5).mean(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_all_equal_advantages(backend, value):
    new, old, _ = inputs(300, torch.float32, seed=3, spread=1e-2)
    adv = torch.full((300,), value)
    got, grad = assert_matches_reference(new, old, adv, 1e-3, 5.0, backend)
    if value == 0.0:
        assert got.loss.item() == 0 and bool((grad == 0).all())


def test_clipped_elements_get_no_gradient(backend):
    # ratio e^{+0.1} with A > 0: the clipped branch -A*(1+eps) is larger, so no gradient;
    # ratio e^{-0.1} with A > 0: the unclipped branch is larger and carries -A*r/N.
    new = torch.tensor([0.1, -0.1, 0.1, -0.1])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    out, grad = run(ops.fused_clipped_loss, new, torch.zeros(4), adv, 1e-2, None, backend=backend)
    r = torch.exp(new)
    expected = torch.tensor([0.0, -r[1] / 4, r[2] / 4, 0.0])
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=0)
    assert out.clip_fraction.item() == 1.0


def test_bad_inputs_give_clear_errors(backend):
    new, old, adv = inputs(5, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"must have the same shape \(N,\)"):
        ops.fused_clipped_loss(new, old[:4], adv, 1e-3, backend=backend)
    with pytest.raises(ValueError, match=r"new_logp must be 1-D \(N,\), got shape \(5, 1\)"):
        ops.fused_clipped_loss(new[:, None], old, adv, 1e-3, backend=backend)
    with pytest.raises(TypeError, match="advantages must be float32, float64, bfloat16 or float16, got torch.int64"):
        ops.fused_clipped_loss(new, old, adv.long(), 1e-3, backend=backend)
    with pytest.raises(ValueError, match="clip_range must be a finite float > 0, got 0.0"):
        ops.fused_clipped_loss(new, old, adv, 0.0, backend=backend)
    with pytest.raises(ValueError, match="adv_clip_max must be a float > 0 or None, got -1"):
        ops.fused_clipped_loss(new, old, adv, 1e-3, -1, backend=backend)
    with pytest.raises(ValueError, match="N = 0"):
        ops.fused_clipped_loss(new[:0], old[:0], adv[:0], 1e-3, backend=backend)
