"""The trainer end to end on a tiny random toy_flux: exact ratios, resume, faults, outputs."""
import json
import math

import pytest
import torch

from dancegrpo.checkpoint import latest_checkpoint
from dancegrpo.config import ConfigError
from dancegrpo.metrics import read_metrics
from dancegrpo.models import repeat_cond
from dancegrpo.rollout import run_rollout, step_log_prob
from dancegrpo.trainer import Trainer
from dancegrpo.update import plan_updates


def test_recomputed_log_probs_equal_rollout_bit_for_bit(tiny_config):
    trainer = Trainer(tiny_config)
    prompts = ["a red circle", "a blue square left of a green triangle"]
    cond = repeat_cond(trainer.adapter.encode_prompts(prompts), 4)
    init = torch.randn(8, *trainer.adapter.latent_shape())
    rollout = run_rollout(trainer.adapter, trainer.sampler, cond, init, chunk_size=3,
                          generator=torch.Generator().manual_seed(0))
    assert [len(c) for c in rollout.chunks] == [3, 3, 2]
    for rows in rollout.chunks:
        for step in range(trainer.sampler.num_steps):
            logp, _, _ = step_log_prob(trainer.adapter, trainer.sampler, rollout.latents, rows, step,
                                       {k: v[rows] for k, v in cond.items()})  # with grad, as in training
            assert torch.equal(logp.detach(), rollout.log_probs[rows, step])


def test_first_update_ratio_is_exactly_one_and_metrics_are_sane(tiny_config):
    trainer = Trainer(tiny_config)
    metrics = trainer.step()
    assert metrics["first_update_logp_max_dev"] == 0.0
    assert metrics["updates"] == 2 and metrics["skipped_updates"] == 0
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert 0.0 <= metrics["reward/rewards_for_tests:mean_brightness_mean"] <= 1.0


def test_plan_updates_covers_ceil_tau_steps_per_chunk():
    chunks = list(torch.arange(10).split(3))
    plan = plan_updates(chunks, list(range(10)), tau=0.6, num_updates=4, generator=torch.Generator().manual_seed(1))
    pairs = [(tuple(rows.tolist()), step) for update in plan.updates for rows, step in update]
    assert len(plan.updates) == 4 and len(pairs) == 4 * 6 == len(set(pairs))
    for chunk in chunks:
        steps = [s for rows, s in pairs if rows == tuple(chunk.tolist())]
        assert len(steps) == 6 and all(0 <= s < 10 for s in steps)


def test_plan_updates_only_picks_trainable_steps():
    chunks = list(torch.arange(8).split(4))
    plan = plan_updates(chunks, [2, 3, 4], tau=0.5, num_updates=1, generator=torch.Generator().manual_seed(0))
    steps = [step for update in plan.updates for _, step in update]
    assert len(steps) == 2 * 2 and set(steps) <= {2, 3, 4}
    with pytest.raises(ValueError, match="eta > 0"):
        plan_updates(chunks, [], tau=0.5, num_updates=1, generator=torch.Generator())


def test_sde_window_rollout_is_ode_outside_and_trains_only_inside(tiny_config):
    tiny_config["sampler"].update(num_steps=5, sde_window=[1, 3])
    trainer = Trainer(tiny_config)
    assert trainer.sampler.stochastic_steps == [1, 2]
    cond = repeat_cond(trainer.adapter.encode_prompts(["a red circle", "a blue square"]), 2)
    init = torch.randn(4, *trainer.adapter.latent_shape())
    rollout = run_rollout(trainer.adapter, trainer.sampler, cond, init, chunk_size=4,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for step in range(5):
            steps = torch.full((4,), step)
            out = trainer.adapter.predict(rollout.latents[:, step], trainer.sampler.model_time(steps), cond)
            ode_mean, _ = trainer.sampler.mean_std(out, rollout.latents[:, step], steps, eta=0.0)
            deterministic = torch.equal(rollout.latents[:, step + 1], ode_mean)
            assert deterministic == (step not in (1, 2)), step
            assert rollout.log_probs[:, step].isnan().all() == (step not in (1, 2))
    metrics = trainer.step()
    assert metrics["first_update_logp_max_dev"] == 0.0 and metrics["updates"] >= 1
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


def test_sde_window_outside_the_schedule_is_refused(tiny_config):
    tiny_config["sampler"].update(num_steps=4, sde_window=[2, 6])
    with pytest.raises(ConfigError, match="sde_window"):
        Trainer(tiny_config)


def test_resume_equals_uninterrupted_run(tiny_config, tmp_path):
    tiny_config["trainer"]["iterations"] = 4
    tiny_config["trainer"]["ema_decay"] = 0.9
    tiny_config["data"]["eval_prompts"] = ""
    straight = Trainer(tiny_config)
    straight.train(progress=False)

    tiny_config["run"]["output_dir"] = str(tmp_path / "resumed")
    first = Trainer(tiny_config)
    first.train(iterations=2, progress=False)   # "killed" after iteration 2's checkpoint
    torch.manual_seed(12345)                    # whatever the process did in between
    second = Trainer(tiny_config)
    second.train(resume=True, progress=False)

    key = "reward/rewards_for_tests:mean_brightness_mean"
    rewards = [m[key] for m in straight.metrics]
    assert rewards == [m[key] for m in first.metrics + second.metrics]
    for (name, a), (_, b) in zip(straight.policy.state_dict().items(), second.policy.state_dict().items()):
        assert torch.equal(a, b), name
    for name in straight.ema:
        assert torch.equal(straight.ema[name], second.ema[name]), name
    resumed_rows = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4]


def test_user_reward_callable_gets_pixels_and_prompts(tiny_config):
    seen = {}

    def brightness(images, prompts):
        seen["shape"], seen["prompts"] = tuple(images.shape), list(prompts)
        seen["range"] = (images.min().item(), images.max().item())
        return images.mean(dim=(1, 2, 3))

    tiny_config["rewards"] = [{"name": "brightness"}]
    trainer = Trainer(tiny_config, rewards={"brightness": brightness})
    metrics = trainer.step()
    assert seen["shape"] == (8, 3, 32, 32) and len(seen["prompts"]) == 8
    assert seen["prompts"][0] == seen["prompts"][3] != seen["prompts"][4]  # group-major
    assert 0.0 <= seen["range"][0] and seen["range"][1] <= 1.0
    assert "reward/brightness_mean" in metrics


def test_nan_rewards_are_counted_and_dropped(tiny_config):
    def flaky(images, prompts):
        scores = images.mean(dim=(1, 2, 3))
        scores[1] = float("nan")
        scores[6] = float("inf")
        return scores

    tiny_config["rewards"] = [{"name": "flaky"}]
    trainer = Trainer(tiny_config, rewards={"flaky": flaky})
    metrics = trainer.step()
    assert metrics["reward/flaky_faults"] == 2
    assert math.isfinite(metrics["loss"])
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())


def test_reward_that_raises_skips_the_update_without_crashing(tiny_config):
    def broken(images, prompts):
        raise RuntimeError("reward server down")

    tiny_config["rewards"] = [{"name": "broken"}]
    trainer = Trainer(tiny_config, rewards={"broken": broken})
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    metrics = trainer.step()
    assert metrics["reward/broken_faults"] == 8 and metrics["updates"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_best_of_n_recomputes_old_log_probs_exactly(tiny_config):
    tiny_config["grpo"].update(group_size=6, best_of_n_keep=2)
    metrics = Trainer(tiny_config).step()
    assert metrics["first_update_logp_max_dev"] == 0.0 and metrics["updates"] >= 1


def test_kl_penalty_is_zero_at_start_and_grows(tiny_config):
    tiny_config["grpo"]["kl_coef"] = 0.1
    trainer = Trainer(tiny_config)
    first = trainer.step()
    second = trainer.step()
    assert first["kl"] >= 0.0 and second["kl"] > 0.0


def test_training_run_writes_everything_a_user_looks_at(tiny_config, tmp_path):
    tiny_config["trainer"].update(iterations=2, keep_last=1)
    tiny_config["rewards"] = [{"name": "toy_geneval"}]
    trainer = Trainer(tiny_config)
    trainer.train(progress=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "reward_curve.png", "samples_before_after.png", "summary.json"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert any((run / "tensorboard").iterdir())
    assert latest_checkpoint(run).name.endswith("2") and len(list((run / "checkpoints").iterdir())) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert "eval/toy_geneval_accuracy" in summary["base"] and "eval/toy_geneval_accuracy" in summary["final"]
    assert "->" in trainer.summary


def test_bad_config_is_refused_before_any_work(tiny_config):
    tiny_config["grpo"]["tau"] = 1.5
    tiny_config["model"]["path"] = "/nonexistent/checkpoint"  # would fail later if work had started
    with pytest.raises(ConfigError, match="grpo.tau"):
        Trainer(tiny_config)


def test_evaluation_is_deterministic_and_uses_fixed_noise(tiny_config):
    trainer = Trainer(tiny_config)
    a = trainer.evaluate(return_images=True)
    b = trainer.evaluate(return_images=True)
    assert torch.equal(a["images"], b["images"])
