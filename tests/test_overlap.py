"""Reward scoring overlapped with sampling: the same iteration, bit for bit, faults included."""
from __future__ import annotations

import logging
import math
import threading

import pytest
import torch

from dancegrpo.config import ConfigError
from dancegrpo.trainer import Trainer


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def _pixel_hash(images: torch.Tensor) -> torch.Tensor:
    """A per-sample integer that depends only on that sample's pixels."""
    return (images * 1000).long().sum(dim=(1, 2, 3))


def holes(images, prompts):
    """NaN or inf for some samples, chosen by their own pixels (not by batch position)."""
    scores = brightness(images, prompts)
    scores[_pixel_hash(images) % 3 == 0] = float("nan")
    scores[_pixel_hash(images) % 3 == 1] = float("inf")
    return scores


def raises_on_some_samples(images, prompts):
    if (_pixel_hash(images) % 4 == 0).any():
        raise RuntimeError("reward server refused a sample")
    return brightness(images, prompts)


def _run_iteration(config: dict, overlap: bool, rewards: dict) -> dict:
    """One iteration (the user rewards join the configured ones); returns its metrics, the
    advantages and validity the update saw, the rollout latents and the weights after it."""
    config = {**config, "trainer": {**config["trainer"], "overlap_rewards": overlap}}
    trainer = Trainer(config, rewards=rewards)
    seen = {}
    update = trainer._update

    def recording_update(rollout, advantages, valid, cond, plan_gen):
        seen.update(advantages=advantages.clone(), valid=valid.clone(), latents=rollout.latents.clone())
        return update(rollout, advantages, valid, cond, plan_gen)

    trainer._update = recording_update
    metrics = trainer.step()
    weights = {name: p.detach().clone() for name, p in trainer.policy.named_parameters()}
    return dict(metrics=metrics, weights=weights, **seen)


def _assert_same_iteration(sync: dict, overlapped: dict) -> None:
    assert torch.equal(sync["latents"], overlapped["latents"])
    assert torch.equal(sync["valid"], overlapped["valid"])
    torch.testing.assert_close(overlapped["advantages"], sync["advantages"], rtol=0, atol=0, equal_nan=True)
    for key, value in sync["metrics"].items():
        if key.startswith("time/"):
            continue
        other = overlapped["metrics"][key]
        assert other == value or (math.isnan(value) and math.isnan(other)), key
    assert sync["weights"].keys() == overlapped["weights"].keys()
    for name, value in sync["weights"].items():
        assert torch.equal(value, overlapped["weights"][name]), name


def test_overlapped_iteration_equals_synchronous_bit_for_bit(tiny_config):
    calls = []

    def recording_brightness(images, prompts):
        calls.append((len(images), threading.current_thread() is threading.main_thread()))
        return brightness(images, prompts)

    tiny_config["rewards"] = [{"name": "toy_geneval"}]
    rewards = {"brightness": recording_brightness}
    sync = _run_iteration(tiny_config, overlap=False, rewards=rewards)
    assert calls == [(8, True)]  # the whole batch at once, after the rollout
    calls.clear()
    overlapped = _run_iteration(tiny_config, overlap=True, rewards=rewards)
    assert calls == [(3, False), (3, False), (2, False)]  # one call per rollout chunk, on the worker
    assert sync["metrics"]["updates"] == 2 and sync["advantages"].abs().sum() > 0
    _assert_same_iteration(sync, overlapped)


def test_toy_reward_with_threshold_and_weight_is_identical(tiny_config):
    tiny_config["trainer"]["micro_batch_size"] = 5  # chunks of 5 and 3
    runs = []
    for overlap in (False, True):
        config = {**tiny_config, "trainer": {**tiny_config["trainer"], "overlap_rewards": overlap},
                  "rewards": [{"name": "toy_geneval", "options": {"soft_shapes": True}},
                              {"name": "rewards_for_tests:mean_brightness", "weight": 0.5, "threshold": 0.5}]}
        trainer = Trainer(config)
        metrics = trainer.step()
        runs.append((metrics, {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}))
    (sync_metrics, sync_weights), (over_metrics, over_weights) = runs
    assert {k: v for k, v in sync_metrics.items() if not k.startswith("time/")} == \
        {k: v for k, v in over_metrics.items() if not k.startswith("time/")}
    assert all(torch.equal(sync_weights[n], over_weights[n]) for n in sync_weights)


def test_non_finite_rewards_are_dropped_and_counted_as_synchronously(tiny_config, caplog):
    rewards = {"holes": holes, "brightness": brightness}
    with caplog.at_level(logging.WARNING, logger="dancegrpo.rewards"):
        sync = _run_iteration(tiny_config, overlap=False, rewards=rewards)
        sync_log = [r.getMessage() for r in caplog.records]
        caplog.clear()
        overlapped = _run_iteration(tiny_config, overlap=True, rewards=rewards)
        overlapped_log = [r.getMessage() for r in caplog.records]
    faults = sync["metrics"]["reward/holes_faults"]
    assert 0 < faults < 8 and sync["metrics"]["reward/brightness_faults"] == 0
    assert int((~sync["valid"]).sum()) == faults
    assert sync_log == overlapped_log and any("non-finite" in line for line in sync_log)
    _assert_same_iteration(sync, overlapped)


def test_a_reward_raising_on_one_chunk_fails_the_whole_batch_as_synchronously(tiny_config, caplog):
    outcomes = []

    def flaky(images, prompts):
        try:
            result = raises_on_some_samples(images, prompts)
        except RuntimeError:
            outcomes.append("raised")
            raise
        outcomes.append("scored")
        return result

    rewards = {"flaky": flaky, "brightness": brightness}
    with caplog.at_level(logging.ERROR, logger="dancegrpo.rewards"):
        sync = _run_iteration(tiny_config, overlap=False, rewards=rewards)
        sync_log = [r.getMessage() for r in caplog.records]
        caplog.clear()
        outcomes.clear()
        overlapped = _run_iteration(tiny_config, overlap=True, rewards=rewards)
        overlapped_log = [r.getMessage() for r in caplog.records]
    assert "raised" in outcomes and "scored" in outcomes  # some chunks scored fine, one did not
    assert sync["metrics"]["reward/flaky_faults"] == 8 and sync["metrics"]["updates"] == 0
    assert sync_log == overlapped_log == ["reward 'flaky' failed on a batch of 8: reward server refused a sample"]
    _assert_same_iteration(sync, overlapped)


def test_decode_failure_propagates(tiny_config):
    tiny_config["trainer"]["overlap_rewards"] = True
    trainer = Trainer(tiny_config)

    def broken_decode(latents):
        raise RuntimeError("decoder out of memory")

    trainer.adapter.decode = broken_decode
    with pytest.raises(RuntimeError, match="decoder out of memory"):
        trainer.step()


def test_overlap_flag_must_be_a_boolean(tiny_config):
    tiny_config["trainer"]["overlap_rewards"] = "yes"
    with pytest.raises(ConfigError, match="trainer.overlap_rewards"):
        Trainer(tiny_config)
