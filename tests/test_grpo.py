"""Tests for dancegrpo.grpo against independent references.

References: naive per-group Python loops (statistics.stdev), plain autograd of the loss
written out here, torch.distributions for the KL, and analytic gradients.
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from dancegrpo.grpo import (
    ClippedLossOutput,
    GroupIds,
    aggregate_advantages,
    best_of_n_indices,
    binary_reward,
    clip_advantages,
    clipped_ratio_loss,
    group_advantages,
    initial_noise,
    kl_penalty,
    shared_group_noise,
    subsample_timesteps,
)

# ---------------------------------------------------------------- naive references


def naive_advantages_by_id(rewards, ids, valid=None, eps=1e-8):
    """Per-group Python loop over the samples carrying each id (any order, any group sizes)."""
    rewards, ids = [float(x) for x in rewards], [int(i) for i in ids]
    valid = [True] * len(rewards) if valid is None else [bool(v) for v in valid]
    out = [0.0] * len(rewards)
    for group in set(ids):
        members = [i for i in range(len(rewards)) if ids[i] == group and valid[i]]
        values = [rewards[i] for i in members]
        if len(values) < 2 or max(values) == min(values):
            continue
        mean, std = statistics.fmean(values), statistics.stdev(values)
        for i in members:
            out[i] = (rewards[i] - mean) / (std + eps)
    return torch.tensor(out, dtype=torch.float64)


def naive_group_advantages(rewards, group_size, valid=None, eps=1e-8):
    """Per-group Python loop over the valid members, unbiased std (statistics.stdev)."""
    rewards = [float(x) for x in rewards]
    valid = [True] * len(rewards) if valid is None else [bool(v) for v in valid]
    out = [0.0] * len(rewards)
    for start in range(0, len(rewards), group_size):
        members = [i for i in range(start, start + group_size) if valid[i]]
        values = [rewards[i] for i in members]
        if len(values) < 2 or max(values) == min(values):
            continue
        mean = statistics.fmean(values)
        std = statistics.stdev(values)
        for i in members:
            out[i] = (rewards[i] - mean) / (std + eps)
    return torch.tensor(out, dtype=torch.float64)


def naive_loss(logp_new, logp_old, adv, clip_range, adv_clip_max=None):
    """Element-by-element Python computation of the clipped surrogate loss."""
    total = 0.0
    for ln, lo, a in zip(logp_new.tolist(), logp_old.tolist(), adv.tolist()):
        if adv_clip_max is not None:
            a = min(max(a, -adv_clip_max), adv_clip_max)
        rho = math.exp(ln - lo)
        rho_c = min(max(rho, 1 - clip_range), 1 + clip_range)
        total += max(-a * rho, -a * rho_c)
    return total / len(adv)


def torch_loss_reference(logp_new, logp_old, adv, clip_range):
    """The plain torch definition, for autograd."""
    rho = torch.exp(logp_new - logp_old)
    return torch.maximum(-adv * rho, -adv * torch.clamp(rho, 1 - clip_range, 1 + clip_range)).mean()


# ---------------------------------------------------------------- group_advantages


@pytest.mark.parametrize("group_size", [1, 2, 3, 5, 12])
def test_group_advantages_matches_naive_loop(group_size):
    gen = torch.Generator().manual_seed(group_size)
    rewards = torch.randn(4 * group_size, generator=gen) * 3.0 + 1.5
    got = group_advantages(rewards, group_size)
    assert got.dtype == torch.float32 and got.shape == rewards.shape
    expected = naive_group_advantages(rewards, group_size)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_group_advantages_uses_unbiased_std_like_torch():
    rewards = torch.tensor([1.0, 2.0, 4.0, 8.0])
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-8)  # torch default: n - 1
    torch.testing.assert_close(group_advantages(rewards, 4), expected)


def test_group_advantages_all_equal_group_is_exactly_zero():
    # 0.1 is not representable, so the float mean of a constant group can be off by an ulp;
    # the result must still be exactly 0, not NaN and not ulp / eps.
    rewards = torch.tensor([0.1] * 12 + [0.3, 0.7, 0.2, 0.9] * 3, dtype=torch.float32)
    adv = group_advantages(rewards, 12)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:12], torch.zeros(12))
    assert adv[12:].abs().max() > 0.5


def test_group_advantages_invalid_mask_excludes_samples():
    gen = torch.Generator().manual_seed(0)
    group_size = 6
    rewards = torch.rand(5 * group_size, generator=gen)
    valid = torch.rand(rewards.shape, generator=gen) > 0.3
    valid[6:12] = True
    valid[12:18] = False  # whole group invalid
    valid[18:24] = False
    valid[19] = True  # only one valid sample left
    rewards[~valid] = float("nan")  # invalid entries may hold garbage
    rewards[14] = float("inf")
    got = group_advantages(rewards, group_size, valid=valid)
    assert torch.isfinite(got).all()
    assert torch.equal(got[~valid], torch.zeros(int((~valid).sum())))
    assert torch.equal(got[12:24], torch.zeros(12))
    expected = naive_group_advantages(rewards, group_size, valid.tolist())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_group_advantages_nan_without_mask_raises():
    rewards = torch.arange(8, dtype=torch.float32)
    rewards[2] = float("nan")
    rewards[5] = float("inf")
    with pytest.raises(ValueError, match=r"2 non-finite.*\[2, 5\].*valid"):
        group_advantages(rewards, 4)
    # A mask that does not cover the bad entry is no better.
    valid = torch.ones(8, dtype=torch.bool)
    valid[2] = False
    with pytest.raises(ValueError, match=r"1 non-finite.*\[5\]"):
        group_advantages(rewards, 4, valid=valid)


def test_group_advantages_bad_batch_size_raises():
    with pytest.raises(ValueError, match=r"10.*4"):
        group_advantages(torch.zeros(10), 4)


def test_group_advantages_float64_input_keeps_precision():
    rewards = torch.tensor([1.0, 1.0 + 1e-12, 1.0 - 1e-12, 1.0], dtype=torch.float64)
    got = group_advantages(rewards, 4)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, naive_group_advantages(rewards, 4), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- aggregate_advantages


def test_aggregate_advantages_is_weighted_sum_of_naive():
    gen = torch.Generator().manual_seed(1)
    group_size = 4
    rewards = {
        "hps": torch.rand(16, generator=gen) * 0.1 + 0.25,
        "clip": torch.rand(16, generator=gen) * 0.2 + 0.3,
        "motion": torch.randn(16, generator=gen) * 50.0,
    }
    weights = {"hps": 1.0, "clip": 0.5, "motion": -0.25}
    got = aggregate_advantages(rewards, weights, group_size)
    expected = sum(weights[k] * naive_group_advantages(v, group_size) for k, v in rewards.items())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_aggregate_advantages_scale_invariant():
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(12, generator=gen)
    b = torch.rand(12, generator=gen)
    weights = {"a": 1.0, "b": 1.0}
    base = aggregate_advantages({"a": a, "b": b}, weights, 6)
    scaled = aggregate_advantages({"a": a, "b": b * 1000.0}, weights, 6)
    torch.testing.assert_close(scaled, base, rtol=1e-4, atol=1e-4)
    # Whereas summing raw rewards first would let the scaled reward dominate.
    raw_sum = group_advantages(a + b * 1000.0, 6)
    torch.testing.assert_close(raw_sum, group_advantages(b, 6), rtol=1e-3, atol=1e-3)


def test_aggregate_advantages_with_valid_mask():
    rewards = {
        "x": torch.tensor([1.0, float("nan"), 3.0, 4.0]),
        "y": torch.tensor([0.5, 0.1, 0.2, 0.9]),
    }
    valid = torch.tensor([True, False, True, True])
    got = aggregate_advantages(rewards, {"x": 2.0, "y": 1.0}, 4, valid=valid)
    expected = 2.0 * naive_group_advantages(rewards["x"], 4, valid) + naive_group_advantages(
        rewards["y"], 4, valid
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_aggregate_advantages_missing_weight_lists_names():
    rewards = {"hps": torch.rand(4), "clip": torch.rand(4), "pick": torch.rand(4)}
    with pytest.raises(ValueError, match=r"\['clip', 'pick'\]"):
        aggregate_advantages(rewards, {"hps": 1.0}, 2)


def test_aggregate_advantages_names_reward_with_nan():
    rewards = {"hps": torch.rand(4), "clip": torch.tensor([0.1, float("nan"), 0.2, 0.3])}
    with pytest.raises(ValueError, match=r"'clip'.*\[1\]"):
        aggregate_advantages(rewards, {"hps": 1.0, "clip": 1.0}, 2)


def test_clip_advantages():
    adv = torch.tensor([-10.0, -5.0, -1.0, 0.0, 2.0, 7.5])
    expected = torch.tensor([-5.0, -5.0, -1.0, 0.0, 2.0, 5.0])
    torch.testing.assert_close(clip_advantages(adv, 5.0), expected)
    with pytest.raises(ValueError):
        clip_advantages(adv, 0.0)


# ---------------------------------------------------------------- clipped_ratio_loss


def _random_loss_inputs(m, seed, spread=0.3):
    gen = torch.Generator().manual_seed(seed)
    logp_old = torch.randn(m, generator=gen) - 2.0
    logp_new = logp_old + spread * torch.randn(m, generator=gen)
    adv = torch.randn(m, generator=gen) * 2.0
    return logp_new, logp_old, adv


@pytest.mark.parametrize("clip_range", [1e-4, 0.2])
def test_clipped_ratio_loss_value_matches_naive(clip_range):
    logp_new, logp_old, adv = _random_loss_inputs(64, seed=3)
    out = clipped_ratio_loss(logp_new, logp_old, adv, clip_range)
    assert isinstance(out, ClippedLossOutput)
    assert out.loss.dim() == 0
    expected = naive_loss(logp_new, logp_old, adv, clip_range)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    rho = torch.exp(logp_new.double() - logp_old.double())
    torch.testing.assert_close(out.ratio.double(), rho, rtol=1e-5, atol=0)
    assert out.ratio_mean.item() == pytest.approx(rho.mean().item(), rel=1e-5)
    assert out.ratio_min.item() == pytest.approx(rho.min().item(), rel=1e-5)
    assert out.ratio_max.item() == pytest.approx(rho.max().item(), rel=1e-5)
    frac = ((rho - 1).abs() > clip_range).double().mean().item()
    assert out.clip_fraction.item() == pytest.approx(frac)


def test_clipped_ratio_loss_grad_matches_autograd_of_plain_definition():
    logp_new, logp_old, adv = _random_loss_inputs(64, seed=4)
    clip_range = 0.2
    x = logp_new.clone().requires_grad_(True)
    clipped_ratio_loss(x, logp_old, adv, clip_range).loss.backward()
    y = logp_new.clone().requires_grad_(True)
    torch_loss_reference(y, logp_old, adv, clip_range).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-8)


def test_clipped_ratio_loss_grad_analytic():
    clip_range = 0.2
    # log-ratios far from the clip edges: 0.5 -> rho 1.65 (> 1.2), -0.5 -> rho 0.61 (< 0.8)
    log_ratio = torch.tensor([0.0, 0.1, -0.1, 0.5, 0.5, -0.5, -0.5])
    adv = torch.tensor([1.0, -2.0, 3.0, 2.0, -2.0, 2.0, -2.0])
    # binding = the clipped branch is the max: A > 0 and rho above, or A < 0 and rho below
    binding = torch.tensor([False, False, False, True, False, False, True])
    logp_old = torch.full((7,), -3.0)
    logp_new = (logp_old + log_ratio).requires_grad_(True)
    clipped_ratio_loss(logp_new, logp_old, adv, clip_range).loss.backward()
    rho = torch.exp(log_ratio.double())
    expected = torch.where(binding, torch.zeros(7, dtype=torch.float64), -adv.double() * rho / 7)
    torch.testing.assert_close(logp_new.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_clipped_ratio_loss_only_logp_new_gets_grad():
    logp_new, logp_old, adv = _random_loss_inputs(8, seed=5)
    logp_new.requires_grad_(True)
    logp_old.requires_grad_(True)
    adv.requires_grad_(True)
    out = clipped_ratio_loss(logp_new, logp_old, adv, 0.1)
    out.loss.backward()
    assert logp_new.grad is not None
    assert logp_old.grad is None and adv.grad is None
    assert not out.ratio.requires_grad and not out.clip_fraction.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipped_ratio_loss_ratio_exactly_one_at_start(dtype):
    logp_new, _, adv = _random_loss_inputs(32, seed=6)
    logp = logp_new.to(dtype)
    x = logp.clone().requires_grad_(True)
    out = clipped_ratio_loss(x, logp.clone(), adv, 1e-4)
    assert torch.equal(out.ratio, torch.ones(32))
    assert out.clip_fraction.item() == 0.0
    assert out.ratio_min.item() == 1.0 and out.ratio_max.item() == 1.0
    # at rho = 1 the loss is -mean(A) and its gradient is -A / M
    assert out.loss.item() == pytest.approx(-adv.mean().item(), rel=1e-6, abs=1e-7)
    out.loss.backward()
    assert x.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 grad is rounded to 8 bits of mantissa
    torch.testing.assert_close(x.grad.float(), -adv / 32, rtol=tol, atol=tol * 1e-2)


def test_clipped_ratio_loss_clip_fraction_crafted():
    clip_range = 0.2
    # |rho - 1| per element: 0, 0.1, 0.3, 0.19, 0.21, 0.5, 0.05 -> 3 of 7 outside the range
    rho = torch.tensor([1.0, 1.1, 0.7, 1.19, 0.79, 1.5, 0.95])
    logp_old = torch.zeros(7)
    out = clipped_ratio_loss(torch.log(rho), logp_old, torch.ones(7), clip_range)
    assert out.clip_fraction.item() == pytest.approx(3 / 7)


def test_clipped_ratio_loss_adv_clip_max():
    logp_new, logp_old, _ = _random_loss_inputs(16, seed=7)
    adv = torch.linspace(-20.0, 20.0, 16)
    out = clipped_ratio_loss(logp_new, logp_old, adv, 0.2, adv_clip_max=5.0)
    expected = naive_loss(logp_new, logp_old, adv, 0.2, adv_clip_max=5.0)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    same = clipped_ratio_loss(logp_new, logp_old, adv.clamp(-5.0, 5.0), 0.2)
    assert out.loss.item() == pytest.approx(same.loss.item(), rel=1e-6)
    unclipped = clipped_ratio_loss(logp_new, logp_old, adv, 0.2)
    assert unclipped.loss.item() != pytest.approx(out.loss.item(), rel=1e-3)


def test_clipped_ratio_loss_bf16_inputs():
    # bf16 log-probs are upcast before the difference, so the result must match a float64
    # computation on the same (bf16-rounded) values to float32 precision; the gradient
    # comes back in bf16, compared with a 1e-2 relative tolerance (bf16 has 8 mantissa bits).
    logp_new, logp_old, adv = _random_loss_inputs(64, seed=8, spread=0.2)
    ln, lo = logp_new.bfloat16(), logp_old.bfloat16()
    x = ln.clone().requires_grad_(True)
    out = clipped_ratio_loss(x, lo, adv, 0.2)
    assert out.loss.dtype == torch.float32
    expected = naive_loss(ln.double(), lo.double(), adv.double(), 0.2)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    out.loss.backward()
    y = ln.double().clone().requires_grad_(True)
    torch_loss_reference(y, lo.double(), adv.double(), 0.2).backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-2, atol=1e-4)


def test_clipped_ratio_loss_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        clipped_ratio_loss(torch.zeros(4), torch.zeros(4), torch.zeros(2), 0.1)


# ---------------------------------------------------------------- kl_penalty


@pytest.mark.parametrize("std_kind", ["float", "scalar_tensor", "per_sample"])
def test_kl_penalty_matches_torch_distributions(std_kind):
    gen = torch.Generator().manual_seed(9)
    mean_new = torch.randn(3, 4, 5, generator=gen)
    mean_ref = torch.randn(3, 4, 5, generator=gen)
    if std_kind == "float":
        std, std_b = 0.3, torch.full((3, 1, 1), 0.3)
    elif std_kind == "scalar_tensor":
        std, std_b = torch.tensor(0.7), torch.full((3, 1, 1), 0.7)
    else:
        std = torch.tensor([0.2, 0.5, 1.3])
        std_b = std.view(3, 1, 1)
    p = torch.distributions.Normal(mean_new.double(), std_b.double().expand(3, 4, 5))
    q = torch.distributions.Normal(mean_ref.double(), std_b.double().expand(3, 4, 5))
    expected = torch.distributions.kl_divergence(p, q).mean(dim=(1, 2))
    got = kl_penalty(mean_new, mean_ref, std)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_kl_penalty_zero_when_means_equal():
    m = torch.randn(2, 8)
    assert torch.equal(kl_penalty(m, m.clone(), 0.5), torch.zeros(2))


def test_kl_penalty_rejects_zero_std():
    with pytest.raises(ValueError, match="std"):
        kl_penalty(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


# ---------------------------------------------------------------- subsample_timesteps


@pytest.mark.parametrize(
    "tau, num_steps, k",
    [
        (1.0, 16, 16), (0.6, 16, 10), (0.6, 25, 15), (0.6, 50, 30),
        (0.5, 7, 4), (0.01, 16, 1), (0.3, 10, 3),
        # float products that overshoot an integer: 0.28 * 25 == 7.000000000000001
        (0.28, 25, 7), (0.56, 50, 28), (0.55, 100, 55),
    ],
)
def test_subsample_timesteps_count(tau, num_steps, k):
    assert k == math.ceil(round(tau * num_steps, 6))  # the intended count, independently
    steps = subsample_timesteps(6, num_steps, tau, generator=torch.Generator().manual_seed(0))
    assert steps.shape == (6, k) and steps.dtype == torch.int64


def test_subsample_timesteps_rows_are_sorted_distinct_in_range_and_differ():
    steps = subsample_timesteps(32, 16, 0.6, generator=torch.Generator().manual_seed(1))
    assert (steps >= 0).all() and (steps < 16).all()
    assert (steps[:, 1:] > steps[:, :-1]).all()  # strictly increasing: sorted and distinct
    assert len({tuple(row) for row in steps.tolist()}) > 1


def test_subsample_timesteps_uniform_coverage():
    # Every step is picked with probability k / T (10/16) per row.
    steps = subsample_timesteps(4000, 16, 0.6, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(steps.flatten(), minlength=16).double() / 4000
    expected = torch.full((16,), 10 / 16, dtype=torch.float64)
    torch.testing.assert_close(counts, expected, atol=0.04, rtol=0)


def test_subsample_timesteps_reproducible():
    a = subsample_timesteps(5, 25, 0.6, generator=torch.Generator().manual_seed(3))
    b = subsample_timesteps(5, 25, 0.6, generator=torch.Generator().manual_seed(3))
    c = subsample_timesteps(5, 25, 0.6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("tau", [0.0, 1.5, -0.1, float("nan")])
def test_subsample_timesteps_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        subsample_timesteps(2, 16, tau)


# ---------------------------------------------------------------- shared_group_noise


def test_shared_group_noise_structure_and_distribution():
    noise = shared_group_noise(5, 4, (3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert noise.shape == (20, 3, 16, 16) and noise.dtype == torch.float32
    groups = noise.view(5, 4, -1)
    assert torch.equal(groups, groups[:, :1].expand_as(groups))
    firsts = groups[:, 0]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not torch.equal(firsts[i], firsts[j])
    # 5 * 768 draws of N(0, 1): mean within ~5 sigma of 0, std near 1
    assert abs(firsts.mean().item()) < 5 / math.sqrt(firsts.numel())
    assert firsts.std().item() == pytest.approx(1.0, abs=0.05)


def test_shared_group_noise_reproducible_and_dtype():
    a = shared_group_noise(2, 3, (4,), generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    b = shared_group_noise(2, 3, (4,), generator=gen, dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b, a.bfloat16())


def test_initial_noise_shared_or_independent():
    shared = initial_noise(2, 3, (4,), shared=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(shared, shared_group_noise(2, 3, (4,), generator=torch.Generator().manual_seed(5)),
                               rtol=0, atol=0)
    independent = initial_noise(2, 3, (4,), shared=False, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(independent, torch.randn((6, 4), generator=torch.Generator().manual_seed(5)),
                               rtol=0, atol=0)
    assert not torch.equal(independent[0], independent[1])  # group members differ


# ---------------------------------------------------------------- best_of_n_indices


def naive_best_of_n(rewards, group_size, keep):
    out = []
    values = rewards.tolist()
    for start in range(0, len(values), group_size):
        idx = list(range(start, start + group_size))
        ranked = sorted(idx, key=lambda i: -values[i])  # Python sort is stable
        out.extend(ranked[:keep] + ranked[group_size - keep :])
    return out


@pytest.mark.parametrize("group_size, keep", [(24, 4), (12, 6), (8, 1), (5, 2)])
def test_best_of_n_indices_matches_naive(group_size, keep):
    gen = torch.Generator().manual_seed(group_size)
    # Rounded to one decimal so that ties occur and the tie-break is exercised.
    rewards = torch.round(torch.rand(3 * group_size, generator=gen) * 10) / 10
    got = best_of_n_indices(rewards, group_size, keep)
    assert got.dtype == torch.int64 and got.shape == (3 * 2 * keep,)
    assert got.tolist() == naive_best_of_n(rewards, group_size, keep)
    # The result is a group-major batch of group size 2 * keep.
    assert (got.view(3, 2 * keep) // group_size == torch.arange(3).unsqueeze(1)).all()


def test_best_of_n_indices_errors():
    with pytest.raises(ValueError, match=r"2 \* keep = 10.*8"):
        best_of_n_indices(torch.rand(16), 8, 5)
    with pytest.raises(ValueError, match="divisible"):
        best_of_n_indices(torch.rand(10), 4, 1)
    bad = torch.rand(8)
    bad[6] = float("nan")
    with pytest.raises(ValueError, match=r"\[6\]"):
        best_of_n_indices(bad, 4, 1)


# ---------------------------------------------------------------- binary_reward


def test_binary_reward_thresholds_and_nan():
    hps = torch.tensor([0.25, 0.28, 0.2801, 0.31, float("nan")])
    out = binary_reward(hps, 0.28)
    assert out.dtype == torch.float32
    assert out[:4].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert math.isnan(out[4].item())
    clip = torch.tensor([0.38, 0.39, 0.391, 0.5], dtype=torch.float64)
    assert binary_reward(clip, 0.39).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_binary_reward_bf16_input_compares_at_full_precision():
    # bf16(0.28) rounds to 0.2800293; comparing in bf16 would also round the threshold.
    r = torch.tensor([0.2800293], dtype=torch.bfloat16)
    expected = 1.0 if r.double().item() > 0.28 else 0.0
    assert binary_reward(r, 0.28).tolist() == [expected]


# ---------------------------------------------------------------- groups by id


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_advantages_by_id_match_a_loop_over_ids_for_uneven_shuffled_groups(dtype):
    gen = torch.Generator().manual_seed(3)
    sizes = [5, 1, 3, 7, 2]  # unequal groups, one of a single sample (advantage 0)
    ids = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    perm = torch.randperm(len(ids), generator=gen)
    ids = ids[perm]
    rewards = torch.randn(len(ids), generator=gen, dtype=dtype)
    valid = torch.rand(len(ids), generator=gen) > 0.2
    rewards[~valid] = float("nan")  # invalid samples may hold NaN
    got = group_advantages(rewards, GroupIds(ids, len(sizes)), valid=valid)
    want = naive_advantages_by_id(rewards.tolist(), ids.tolist(), valid.tolist())
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert got.dtype == dtype


def test_advantages_by_id_of_a_group_major_batch_equal_the_positional_ones():
    gen = torch.Generator().manual_seed(4)
    rewards = {"a": torch.randn(12, generator=gen), "b": torch.rand(12, generator=gen)}
    weights = {"a": 1.0, "b": 0.5}
    ids = torch.arange(12) // 4
    by_position = aggregate_advantages(rewards, weights, 4)
    by_id = aggregate_advantages(rewards, weights, GroupIds(ids, 3))
    assert torch.equal(by_id, by_position)  # equal groups take the group-major path: the same floats
    # Moving samples around moves their advantages with them (members keep their relative order:
    # as when a group's halves sit on two ranks and are gathered rank by rank).
    halves = torch.cat([torch.arange(12).view(3, 4)[:, :2].reshape(-1), torch.arange(12).view(3, 4)[:, 2:].reshape(-1)])
    moved = aggregate_advantages({k: v[halves] for k, v in rewards.items()}, weights, GroupIds(ids[halves], 3))
    assert torch.equal(moved, by_position[halves])
    perm = torch.randperm(12, generator=gen)
    shuffled = aggregate_advantages({k: v[perm] for k, v in rewards.items()}, weights, GroupIds(ids[perm], 3))
    torch.testing.assert_close(shuffled, by_position[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ids, count, match", [
    (torch.tensor([0, 1, 3]), 3, r"outside \[0, 3\) at indices \[2\]"),
    (torch.tensor([0, -1, 1]), 2, r"outside \[0, 2\) at indices \[1\]"),
    (torch.tensor([0, 1, 1], dtype=torch.int32), 2, "int64 tensor of shape"),
    (torch.tensor([0, 1]), 2, r"shape \(3,\)"),
])
def test_bad_group_ids_are_refused_naming_the_samples(ids, count, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.zeros(3), GroupIds(ids, count))
