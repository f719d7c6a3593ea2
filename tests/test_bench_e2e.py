"""bench.e2e and its reference loop run with the committed quickstart recipe (an SDE window),
and the reference loop samples and trains like the published structure on the window's steps."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import yaml

from bench import e2e
from bench.machine import REPO
from bench.reference_loop import reference_iteration
from dancegrpo.trainer import Trainer

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_e2e_runs_the_committed_quickstart_recipe(tmp_path, tiny_checkpoint):
    recipe = yaml.safe_load(QUICKSTART.read_text())
    start, end = recipe["sampler"]["sde_window"]
    # What the test is about: a window that leaves ODE steps (the case that once broke the reference loop).
    assert 0 <= start < end <= recipe["sampler"]["num_steps"] and end - start < recipe["sampler"]["num_steps"]
    out = tmp_path / "e2e.csv"
    # The recipe file itself; only its size is shrunk (tiny model, 2 prompts x 2 samples, one thread).
    row = e2e.main(["--config", str(QUICKSTART), "--iterations", "1", "--warmup", "0", "--csv", str(out),
                    "--set", f"model.path={tiny_checkpoint}", "--set", "grpo.prompts_per_iteration=2",
                    "--set", "grpo.group_size=2", "--set", "run.num_threads=1",
                    "--set", "trainer.ema_decay=null"])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["samples_per_iteration"] == "4"
    assert float(row["ours_s_per_it"]) > 0 and float(row["reference_s_per_it"]) > 0
    assert float(row["speedup"]) == pytest.approx(float(row["reference_s_per_it"]) / float(row["ours_s_per_it"]),
                                                  rel=1e-2)


def test_reference_loop_samples_every_step_and_trains_only_the_window(tiny_config):
    tiny_config["sampler"].update(num_steps=5, sde_window=[1, 4])   # steps 1, 2, 3 stochastic; 0 and 4 ODE
    tiny_config["grpo"].update(tau=0.5, group_size=2, prompts_per_iteration=2)
    tiny_config["trainer"].update(updates_per_iteration=2)
    tiny_config["data"]["eval_prompts"] = None
    trainer = Trainer(tiny_config)
    calls = []                                  # (step, batch size, with gradient) per model call
    predict = trainer.adapter.predict

    def recording_predict(x, t, cond):
        step = int((trainer.sampler.sigmas[:-1] - t[0]).abs().argmin())
        calls.append((step, x.shape[0], torch.is_grad_enabled()))
        return predict(x, t, cond)

    trainer.adapter.predict = recording_predict
    before = [p.detach().clone() for p in trainer.params]
    result = reference_iteration(trainer, 0)
    num_samples = 4
    rollout = [c for c in calls if not c[2]]
    training = [c for c in calls if c[2]]
    # Rollout: one sample per call, all 5 steps of each sample in order.
    assert rollout == [(s, 1, False) for _ in range(num_samples) for s in range(5)]
    # Training: batch 1, ceil(0.5 * 3) = 2 distinct stochastic steps per sample, never an ODE step.
    per_sample = [training[2 * i: 2 * i + 2] for i in range(num_samples)]
    assert len(training) == num_samples * math.ceil(0.5 * 3)
    for pair in per_sample:
        steps = {s for s, b, _ in pair}
        assert len(steps) == 2 and steps <= {1, 2, 3} and all(b == 1 for _, b, _ in pair)
    assert math.isfinite(result["loss"]) and math.isfinite(result["reward_mean"])
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.params))   # it did update


def test_reference_loop_ode_steps_are_the_sampler_mean(tiny_config):
    """With the window covering no step but the first, the trajectory after it is deterministic:
    the same initial noise and first-step noise give the same final latent in two runs, and that
    final latent equals the eta = 0 mean chain applied to the recorded step-1 latent."""
    tiny_config["sampler"].update(num_steps=4, sde_window=[0, 1])
    tiny_config["grpo"].update(tau=1.0, group_size=2, prompts_per_iteration=1)
    tiny_config["trainer"].update(updates_per_iteration=1)
    tiny_config["data"]["eval_prompts"] = None
    trainer = Trainer(tiny_config)
    seen = []
    predict = trainer.adapter.predict

    def recording_predict(x, t, cond):
        out = predict(x, t, cond)
        if not torch.is_grad_enabled():
            seen.append((x.detach().clone(), t.detach().clone(), out.detach().clone()))
        return out

    trainer.adapter.predict = recording_predict
    reference_iteration(trainer, 0)
    sigmas = trainer.sampler.sigmas.double()
    for i in range(2):                                   # per sample: model inputs at steps 1..3
        for s in (1, 2):
            x, t, v = seen[4 * i + s]
            x_next = seen[4 * i + s + 1][0]
            # An ODE step of rectified flow: x + (sigma_{s+1} - sigma_s) v, in float64 here.
            expected = x.double() + (sigmas[s + 1] - sigmas[s]) * v.double()
            assert float(t[0]) == pytest.approx(float(sigmas[s]))
            torch.testing.assert_close(x_next.double(), expected, rtol=1e-5, atol=1e-5)
