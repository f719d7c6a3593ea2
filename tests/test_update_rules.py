"""The trainer's update rules against values computed outside the trainer (issue 15 item 12).

A tiny linear "denoiser" (velocity = W x + b + sigma * e(prompt)) goes through the real
Trainer: rollout, plan, fused log-prob and loss, backward, clipping, AdamW, schedule, EMA. The
reference gradient is written out here from the formulas (DanceGRPO step mean and std, the
Gaussian log-density from torch.distributions, the clipped surrogate with its branches spelled
out, the KL of two Gaussians with one std) in float64 with autograd, and compared with the
gradient the trainer leaves on its parameters.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dancegrpo import update as update_module
from dancegrpo.models import repeat_cond
from dancegrpo.rollout import Rollout, run_rollout
from dancegrpo.trainer import Trainer
from dancegrpo.update import lr_lambda

DIM = 6
SHIFT, ETA = 3.0, 0.7


class TinyDenoiser(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(0.3 * torch.randn(DIM, DIM, generator=g))
        self.bias = nn.Parameter(0.1 * torch.randn(DIM, generator=g))

    def forward(self, x, t, e):
        return x @ self.weight.T + self.bias + t[:, None] * e


class TinyAdapter(nn.Module):
    """The adapter protocol around TinyDenoiser: latents (DIM,), a prompt's embedding depends on its length."""

    prediction = "flow"

    def __init__(self, seed: int = 0):
        super().__init__()
        self.transformer = TinyDenoiser(seed)

    @property
    def trainable(self):
        return self.transformer

    def latent_shape(self):
        return (DIM,)

    def encode_prompts(self, prompts):
        lengths = torch.tensor([float(len(p)) for p in prompts])
        return {"e": torch.sin(lengths[:, None] * torch.arange(1, DIM + 1)) * 0.5}

    def predict(self, latents, t, cond):
        return self.transformer(latents, t, cond["e"])

    def decode(self, latents):
        return latents.reshape(len(latents), 1, 1, DIM)


def spread(images, prompts):
    """A reward with distinct values within every group."""
    return images.flatten(1).sum(1)


def config(tmp_path, **sections) -> dict:
    cfg = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 0, "device": "cpu"},
        "model": {"name": "toy_flux", "path": ""},
        "sampler": {"num_steps": 2, "eta": ETA, "shift": SHIFT},
        "data": {"train_prompts": "toy:train", "eval_prompts": ""},
        "rewards": [{"name": "mine"}],
        "grpo": {"group_size": 4, "prompts_per_iteration": 2, "tau": 1.0, "clip_range": 2e-3, "adv_clip_max": 1.0},
        "trainer": {"iterations": 3, "lr": 1e-2, "weight_decay": 0.0, "updates_per_iteration": 1,
                    "micro_batch_size": 8, "grad_clip": None, "checkpoint_every": 100},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def make_trainer(tmp_path, reward=spread, **sections) -> Trainer:
    return Trainer(config(tmp_path, **sections), rewards={"mine": reward}, adapter=TinyAdapter())


def params_of(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ------------------------------------------------------------------ the reference, by hand

def hand_sigmas(num_steps: int) -> list[float]:
    """linspace(1, 0, T + 1) time-shifted: shift*t / (1 + (shift - 1)*t), in float64."""
    return [SHIFT * t / (1 + (SHIFT - 1) * t) for t in (1 - i / num_steps for i in range(num_steps + 1))]


def hand_step(W, b, x, e, s, s_next):
    """DanceGRPO's SDE step (paper Eq. / release flux_step): its mean and std."""
    v = W @ x + b + s * e
    x0 = x - s * v
    score = -(x - (1 - s) * x0) / s ** 2
    mean = x + (s_next - s) * v - 0.5 * ETA ** 2 * score * (s_next - s)
    return mean, ETA * math.sqrt(s - s_next)


def hand_loss(params, ref, latents, old, adv, valid, e, pairs, clip, adv_clip, kl_coef):
    """Mean over the update's valid (sample, step) pairs of the clipped surrogate plus kl_coef * KL."""
    sig = hand_sigmas(latents.shape[1] - 1)
    terms = []
    for i, step in pairs:
        if not valid[i]:
            continue
        x, x_next = latents[i, step].double(), latents[i, step + 1].double()
        mean, std = hand_step(params["weight"], params["bias"], x, e[i].double(), sig[step], sig[step + 1])
        logp = torch.distributions.Normal(mean, std).log_prob(x_next).mean()
        ratio = torch.exp(logp - old[i, step].double())
        a = max(-adv_clip, min(adv_clip, float(adv[i])))
        # max(-A rho, -A clip(rho)): for A >= 0 the ratio is capped at 1 + clip, for A < 0 floored at 1 - clip
        if a >= 0:
            surrogate = -a * (1 + clip) if ratio.item() > 1 + clip else -a * ratio
        else:
            surrogate = -a * (1 - clip) if ratio.item() < 1 - clip else -a * ratio
        ref_mean, _ = hand_step(ref["weight"], ref["bias"], x, e[i].double(), sig[step], sig[step + 1])
        kl = ((mean - ref_mean) ** 2 / (2 * std ** 2)).mean()
        terms.append(surrogate + kl_coef * kl)
    return torch.stack([torch.as_tensor(t, dtype=torch.float64) for t in terms]).mean()


def hand_gradient(start, ref, *args, **kwargs) -> dict[str, torch.Tensor]:
    params = {n: p.double().requires_grad_(True) for n, p in start.items()}
    hand_loss(params, {n: p.double() for n, p in ref.items()}, *args, **kwargs).backward()
    return {n: p.grad for n, p in params.items()}


# ------------------------------------------------------------------ one update, split two ways

PROMPTS = ["a red circle", "two blue squares"]
ADVANTAGES = torch.tensor([2.0, -0.5, 0.3, -1.7, 0.9, -0.2, 1.4, -2.2])  # some beyond adv_clip_max = 1
VALID = torch.tensor([True, True, True, True, True, True, True, False])  # the last one's reward failed
# log(ratio) per (sample, step) at the update, against clip_range 2e-3: inside, clipped, and clipped only
# up to 2 x clip_range (3e-3), on both sides, for positive and negative advantages.
RATIO_OFFSETS = torch.tensor([[3e-3, 1e-3], [-3e-3, 6e-3], [-6e-3, 0.0], [-1e-3, -3e-3],
                              [3e-3, -1e-3], [6e-3, -6e-3], [0.0, 3e-3], [5e-3, -5e-3]])
SPLITS = {"[8]": [list(range(8))], "[3,3,2]": [[0, 1, 2], [3, 4, 5], [6, 7]]}


def one_update(tmp_path, split, kl_coef=0.0, grad_clip=None, perturb=0.0):
    """The gradient (and grad-norm metric) of one trainer update over 8 samples x 2 steps, the
    samples in micro-batches `split`; plus the inputs for the hand reference."""
    trainer = make_trainer(tmp_path, grpo={"kl_coef": kl_coef}, trainer={"grad_clip": grad_clip})
    reference = params_of(trainer.policy)
    if perturb:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in trainer.policy.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    start = params_of(trainer.policy)
    cond = repeat_cond(trainer.adapter.encode_prompts(PROMPTS), 4)
    init = torch.randn(8, DIM, generator=torch.Generator().manual_seed(1))
    rollout = run_rollout(trainer.adapter, trainer.sampler, cond, init, 8, generator=torch.Generator().manual_seed(2))
    old = rollout.log_probs - RATIO_OFFSETS  # log-ratios RATIO_OFFSETS at the first update
    chunks = [torch.tensor(rows) for rows in SPLITS[split]]
    stats = trainer._update(Rollout(rollout.latents, old, chunks), ADVANTAGES, VALID, cond,
                            torch.Generator().manual_seed(4))
    grads = {n: p.grad.detach().clone() for n, p in trainer.policy.named_parameters()}
    inputs = dict(latents=rollout.latents, old=old, adv=ADVANTAGES, valid=VALID, e=cond["e"],
                  pairs=[(i, s) for i in range(8) for s in range(2)], clip=2e-3, adv_clip=1.0, kl_coef=kl_coef)
    return grads, stats, start, reference, inputs


def assert_grads_close(got, want, rtol=1e-4, atol=1e-6):
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kl_coef, perturb", [(0.0, 0.0), (0.5, 0.05)])
@pytest.mark.parametrize("split", list(SPLITS))
def test_update_gradient_equals_the_hand_gradient_for_any_micro_batch_split(tmp_path, split, kl_coef, perturb):
    """Micro-batch losses weighted by their share of the update's valid pairs; advantage and
    ratio clipping as in the formula; the KL term added with a plus sign and its weight."""
    grads, _, start, reference, inputs = one_update(tmp_path, split, kl_coef=kl_coef, perturb=perturb)
    want = hand_gradient(start, reference, **inputs)
    assert all(w.abs().max() > 1e-3 for w in want.values())  # a real gradient, not zeros
    assert_grads_close(grads, want)


def test_the_setup_exercises_ratio_and_advantage_clipping(tmp_path):
    """Guards the gradient test above: some ratios are clipped and some advantages exceed adv_clip_max."""
    _, stats, _, _, inputs = one_update(tmp_path, "[8]")
    assert 0 < stats["clip_fraction"] < 1
    assert (ADVANTAGES.abs() > inputs["adv_clip"]).any() and (ADVANTAGES.abs() < inputs["adv_clip"]).any()


def test_gradient_clipping_scales_the_norm_to_grad_clip_and_reports_the_raw_norm(tmp_path):
    _, _, start, reference, inputs = one_update(tmp_path / "probe", "[8]")
    want = hand_gradient(start, reference, **inputs)
    norm = math.sqrt(sum(float(g.square().sum()) for g in want.values()))
    # Above the norm: untouched.
    grads, stats, *_ = one_update(tmp_path / "loose", "[3,3,2]", grad_clip=2 * norm)
    assert_grads_close(grads, want)
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-4)
    # Below the norm: the same direction, norm grad_clip; the metric is the norm before clipping.
    grads, stats, *_ = one_update(tmp_path / "tight", "[3,3,2]", grad_clip=0.25 * norm)
    clipped = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    assert clipped == pytest.approx(0.25 * norm, rel=1e-5)
    assert_grads_close(grads, {n: g * 0.25 for n, g in want.items()})
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-4)


# ------------------------------------------------------------------ KL towards the reference

def distance_to_reference_after_two_steps(tmp_path) -> tuple[float, float, list[float]]:
    """Zero advantages (a constant reward), kl_coef 1, weights perturbed from the reference.
    adam_eps far above every gradient entry makes AdamW's step (lr / eps) * gradient: plain
    gradient descent, which on the convex KL shortens the distance to its minimiser."""
    trainer = make_trainer(tmp_path, reward=lambda images, prompts: torch.ones(len(images)),
                           grpo={"kl_coef": 1.0}, trainer={"lr": 1.0, "adam_eps": 100.0})
    reference = params_of(trainer.policy)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))

    def distance():
        return math.sqrt(sum(float((p.detach() - reference[n]).square().sum())
                             for n, p in trainer.policy.named_parameters()))
    before = distance()
    kls = []
    for _ in range(2):
        metrics = trainer.step()
        assert metrics["reward/zero_advantage_groups"] == 2 and metrics["updates"] == 1
        kls.append(metrics["kl"])
    return before, distance(), kls


def test_kl_with_zero_advantages_moves_the_policy_towards_the_reference(tmp_path):
    before, after, kls = distance_to_reference_after_two_steps(tmp_path)
    assert after < before * 0.999
    assert all(kl > 0 for kl in kls)


def test_the_kl_check_fails_with_the_kl_term_subtracted(tmp_path, monkeypatch):
    """The check above can fail: with the KL's sign flipped (loss - kl_coef * kl) the policy
    moves away from the reference."""
    real = update_module.grpo.kl_penalty
    monkeypatch.setattr(update_module.grpo, "kl_penalty", lambda *a, **k: -real(*a, **k))
    before, after, _ = distance_to_reference_after_two_steps(tmp_path)
    assert after > before


# ------------------------------------------------------------------ EMA

@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("updates", [1, 2])
def test_ema_after_updates_is_the_exponential_average_of_the_weights(tmp_path, updates):
    """ema_decay 0.9: after w0 -> w1 the EMA is 0.9 w0 + 0.1 w1; after w2 it is 0.9 of that + 0.1 w2."""
    trainer = make_trainer(tmp_path, trainer={"ema_decay": 0.9, "updates_per_iteration": updates})
    weights = [params_of(trainer.policy)]  # w0, then the weights after each optimizer step
    real_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        weights.append(params_of(trainer.policy))
        return out
    trainer.optimizer.step = recording_step
    trainer.step()
    assert len(weights) == 1 + updates
    expected = {1: lambda w: 0.9 * w[0] + 0.1 * w[1],
                2: lambda w: 0.81 * w[0] + 0.09 * w[1] + 0.1 * w[2]}[updates]
    for name in weights[0]:
        assert not torch.equal(weights[0][name], weights[1][name])
        want = expected([w[name].double() for w in weights])
        torch.testing.assert_close(trainer.ema[name].double(), want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ learning-rate schedule

@pytest.mark.parametrize("schedule, factors", [
    # warmup 2, 6 iterations: (it + 1) / 2 while warming up, then the decay over the 4 others
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, 0.8535533905932737, 0.5, 0.14644660940672624]),  # (1 + cos(pi k / 4)) / 2
])
def test_lr_schedule_factors_equal_the_hand_values(schedule, factors):
    factor = lr_lambda(schedule, warmup=2, total=6)
    assert [factor(it) for it in range(6)] == pytest.approx(factors, rel=1e-12)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_each_iteration_updates_with_its_scheduled_lr_and_logs_that_lr(tmp_path):
    trainer = make_trainer(tmp_path, trainer={"lr": 0.01, "lr_schedule": "linear", "warmup_iterations": 1,
                                              "iterations": 3})
    used = []
    real_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return real_step(*args, **kwargs)
    trainer.optimizer.step = recording_step
    logged = [trainer.step()["lr"] for _ in range(3)]
    # warmup 1 then linear over the 2 others: factors 1, 1, 0.5
    assert used == pytest.approx([0.01, 0.01, 0.005], rel=1e-12)
    assert logged == pytest.approx(used, rel=1e-12)
