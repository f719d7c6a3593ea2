"""The authors' release choices offered as options (issue 15 item 10): the trained-step count
(int(K * tau) over all steps but the last) and the denoiser time floored to 1/1000.

Reference values come from the release's own expressions written out here (int(15 * 0.6),
linspace + time shift in float32, int(sigma * 1000)), not from the code under test.
"""
import copy

import pytest
import torch

from dancegrpo import update as update_module
from dancegrpo.config import ConfigError, load_config
from dancegrpo.grpo import subsample_timesteps, trained_step_count
from dancegrpo.sampler import DDIMSampler, FlowSampler, build_sampler
from dancegrpo.trainer import Trainer


def release_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The release's sigma schedule: linspace(1, 0, T + 1), then shift*t / (1 + (shift-1)*t), float32."""
    t = torch.linspace(1, 0, num_steps + 1)
    return (shift * t) / (1 + (shift - 1) * t)


@pytest.mark.parametrize("num_steps, tau, rounding, k", [
    (16, 0.6, "ceil", 10),    # ours on the FLUX recipe: ceil(0.6 * 16) of all 16
    (15, 0.6, "floor", 9),    # the release's FLUX/Hunyuan/SkyReels: int(15 * 0.6) of the first 15
    (49, 1.0, "floor", 49),   # the release's SD: int((50 - 1) * 1.0)
    (100, 0.29, "floor", 28), # int() keeps the float error: 100 * 0.29 = 28.999999999999996
    (25, 0.6, "ceil", 15),    # ceil absorbs 15.000000000000002
    (4, 0.1, "floor", 0),
])
def test_trained_step_count(num_steps, tau, rounding, k):
    assert trained_step_count(num_steps, tau, rounding) == k


def test_subsample_timesteps_floor_rounding_and_refusal():
    steps = subsample_timesteps(5, 15, 0.6, generator=torch.Generator().manual_seed(0), rounding="floor")
    assert steps.shape == (5, 9) and (steps[:, 1:] > steps[:, :-1]).all() and (steps < 15).all()
    with pytest.raises(ValueError, match="selects floor"):
        subsample_timesteps(5, 4, 0.1, rounding="floor")
    with pytest.raises(ValueError, match="'ceil' or 'floor'"):
        subsample_timesteps(5, 4, 0.5, rounding="round")


def test_model_time_floored_to_the_release_values():
    sampler = FlowSampler(16, 3.0, 0.3, model_time_resolution=1000)
    sigmas = release_sigmas(16, 3.0)
    expected = torch.tensor([int(s * 1000) / 1000 for s in sigmas[:16]], dtype=torch.float32)
    got = sampler.model_time(torch.arange(16))
    assert torch.equal(got, expected)
    assert not torch.equal(got, sigmas[:16])  # the rounding changes the input (e.g. 0.97826 -> 0.978)
    torch.testing.assert_close(sampler.sigmas, sigmas, rtol=0, atol=1e-7)  # the step rule keeps exact sigmas
    assert torch.equal(FlowSampler(16, 3.0, 0.3).model_time(torch.arange(16)), sampler.sigmas[:16])


def test_model_time_resolution_is_refused_for_ddim_and_bad_values():
    with pytest.raises(ValueError, match="flow models only"):
        build_sampler("ddim", 10, 1.0, model_time_resolution=1000)
    assert isinstance(build_sampler("ddim", 10, 1.0), DDIMSampler)
    with pytest.raises(ValueError, match="integer >= 1"):
        FlowSampler(4, 3.0, 0.3, model_time_resolution=0)


def test_config_refuses_release_choices_that_leave_nothing_to_train(tiny_config):
    cfg = copy.deepcopy(tiny_config)
    cfg["sampler"]["sde_window"] = [3, 4]
    cfg["grpo"]["exclude_last_step"] = True
    with pytest.raises(ConfigError, match="grpo.exclude_last_step = true leaves no step"):
        load_config(cfg)
    cfg = copy.deepcopy(tiny_config)
    cfg["grpo"].update(tau=0.2, tau_rounding="floor")  # int(4 * 0.2) = 0
    with pytest.raises(ConfigError, match=r"grpo.tau = 0.2 with grpo.tau_rounding = floor"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="tau_rounding"):
        load_config(tiny_config, ["grpo.tau_rounding=round"])
    with pytest.raises(ConfigError, match="model_time_resolution"):
        load_config(tiny_config, ["sampler.model_time_resolution=0"])


class TimeSpy:
    """Wraps an adapter and records every time input the denoiser is given."""

    def __init__(self, adapter):
        self.adapter, self.times = adapter, []

    def __getattr__(self, name):
        return getattr(self.adapter, name)

    def predict(self, latents, t, cond):
        self.times.append(t.detach().clone())
        return self.adapter.predict(latents, t, cond)


def test_release_mode_trains_int_k_tau_of_all_but_last_with_floored_time_and_exact_first_ratio(
        tiny_config, monkeypatch):
    # 5 steps, release choices: trainable steps 0..3, int(4 * 0.6) = 2 per chunk, never step 4.
    tiny_config["sampler"].update(num_steps=5, model_time_resolution=1000)
    tiny_config["grpo"].update(tau=0.6, tau_rounding="floor", exclude_last_step=True)
    tiny_config["data"]["eval_prompts"] = ""
    plans = []
    real_plan = update_module.plan_updates

    def recording_plan(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        plans.append(plan)
        return plan
    monkeypatch.setattr(update_module, "plan_updates", recording_plan)
    trainer = Trainer(tiny_config)
    spy = TimeSpy(trainer.adapter)
    trainer.adapter = spy
    metrics = trainer.step()

    assert metrics["first_update_logp_max_dev"] == 0.0  # rollout and update saw the same time input
    pairs = [(tuple(rows.tolist()), step) for update in plans[0].updates for rows, step in update]
    per_chunk = {}
    for rows, step in pairs:
        per_chunk.setdefault(rows, []).append(step)
    assert len(per_chunk) == 3  # 8 samples in chunks of 3
    assert all(len(steps) == 2 and max(steps) <= 3 for steps in per_chunk.values())
    allowed = {int(s * 1000) / 1000 for s in release_sigmas(5, 3.0)[:5].tolist()}
    seen = {v for t in spy.times for v in t.tolist()}
    assert seen <= {torch.tensor(a, dtype=torch.float32).item() for a in allowed}
    assert len(seen) == 5


def test_default_mode_is_unchanged_ceil_of_all_steps(tiny_config, monkeypatch):
    tiny_config["data"]["eval_prompts"] = ""
    plans = []
    real_plan = update_module.plan_updates
    monkeypatch.setattr(update_module, "plan_updates",
                        lambda *a, **k: plans.append(real_plan(*a, **k)) or plans[-1])
    trainer = Trainer(tiny_config)  # 4 steps, tau 0.5: ceil(0.5 * 4) = 2 of steps 0..3
    trainer.step()
    steps = [step for update in plans[0].updates for _, step in update]
    assert len(steps) == 3 * 2 and set(steps) <= {0, 1, 2, 3}


RELEASE = ["grpo.exclude_last_step=true", "grpo.tau_rounding=floor"]


@pytest.mark.parametrize("recipe, ours, release_overrides, release", [
    ("configs/flux_hps.yaml", 10, RELEASE + ["sampler.model_time_resolution=1000"], 9),
    ("configs/hunyuan_t2v.yaml", 10, RELEASE + ["sampler.model_time_resolution=1000"], 9),
    ("configs/hunyuan_t2i.yaml", 10, RELEASE + ["sampler.model_time_resolution=1000"], 9),
    ("configs/skyreels_i2v.yaml", 10, RELEASE + ["sampler.model_time_resolution=1000"], 9),
    ("configs/sd14_hps.yaml", 30, RELEASE + ["grpo.tau=1.0"], 49),
])
def test_recipes_train_the_step_counts_their_comments_and_docs_state(recipe, ours, release_overrides, release):
    """docs/recipes.md and the recipe comments state these counts; the override line given there
    gives the release's count (int((T - 1) * timestep_fraction), written out by hand above)."""
    def count(cfg):
        steps = cfg.sampler.num_steps - (1 if cfg.grpo.exclude_last_step else 0)
        return trained_step_count(steps, cfg.grpo.tau, cfg.grpo.tau_rounding)
    assert count(load_config(recipe)) == ours
    assert count(load_config(recipe, release_overrides)) == release
