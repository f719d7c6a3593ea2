"""Device placement on the CPU (issue 14): every entry point runs one iteration under
`device_guard.DeviceGuard`, which fails a random draw whose device is not its generator's, a
project tensor factory without `device=`, and counts host syncs on the hot path.

The guard's own tests come first: each shows a fault of the kind a CUDA run met (the
`randperm` of plan_updates with a CUDA generator) being caught on the CPU.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml

from dancegrpo import grpo
from dancegrpo.cli import main
from dancegrpo.trainer import Trainer
from dancegrpo.update import plan_updates
from device_guard import REPO, DeviceGuard, instrument_trainer
from tiny_models import (PROMPTS, brightness, build_flux, build_hunyuan_video, build_qwen_image, build_sd14, build_sd35,
                         build_skyreels_i2v, build_wan_t2v, trainer_config, write_images, write_prompts)

# Host syncs an iteration's update phase may make, besides the one non-finite-gradient check per
# update: the plan, the valid mask, the chunks' rows, the statistics (see Trainer._update).
UPDATE_SYNCS_PER_ITERATION = 4
# Best-of-N: the finite-reward checks of grpo.best_of_n_indices and grpo.aggregate_advantages, once
# each per iteration; recomputing the kept samples' log-probs (chunks x steps) adds none.
BEST_OF_N_SYNCS = 2


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in extra.items():
        if isinstance(values, dict):
            out.setdefault(section, {}).update(values)
        else:
            out[section] = values
    return out


def _run_guarded(fn):
    with DeviceGuard() as guard, instrument_trainer(guard):
        result = fn()
    return guard, result


# ------------------------------------------------------------------------ the guard can fail

def test_guard_flags_a_generator_draw_that_names_no_device():
    """The fault a CUDA run met first: randperm draws on the CPU unless told otherwise."""
    g = torch.Generator("cpu").manual_seed(0)
    with DeviceGuard() as guard:
        torch.randperm(5, generator=g)
        torch.rand(3, generator=g, device="cpu")
        torch.empty(3, device="cpu").normal_(generator=g)
    assert [(v.rule, v.call, v.site.function) for v in guard.violations] == [
        ("draw", "randperm", "test_guard_flags_a_generator_draw_that_names_no_device")]


def test_guard_flags_a_draw_on_another_device_than_its_generator():
    g = torch.Generator("cpu").manual_seed(0)
    with DeviceGuard() as guard:
        torch.rand(2, generator=g, device="meta")  # torch itself accepts this pairing; a CUDA one would not
    assert len(guard.violations) == 1 and "draws on meta with a cpu generator" in guard.violations[0].detail


def test_guard_flags_project_factories_and_generators_without_device():
    """A factory is checked where project code calls it: code compiled under dancegrpo/ is."""
    source = ("import torch\n"
              "def make(device):\n"
              "    good = torch.zeros(2, device=device), torch.arange(3, device=device)\n"
              "    bad = torch.zeros(2), torch.arange(3), torch.tensor([1.0])\n"
              "    return torch.Generator(), torch.Generator(device)\n")
    namespace = {}
    exec(compile(source, str(REPO / "dancegrpo" / "_probe.py"), "exec"), namespace)
    with DeviceGuard() as guard:
        namespace["make"](torch.device("cpu"))
        torch.zeros(2)  # test code: not project code, not checked
    found = sorted((v.rule, v.call, v.site.line) for v in guard.violations)
    assert found == [("factory", "torch.arange", 4), ("factory", "torch.tensor", 4), ("factory", "torch.zeros", 4),
                     ("generator", "torch.Generator", 5)]
    assert torch.Generator is torch._C.Generator  # restored on exit


def test_guard_counts_host_syncs_only_inside_a_phase():
    x = torch.arange(4.0)
    with DeviceGuard() as guard:
        x.sum().item()  # outside any phase
        with guard.phase("update"):
            x.sum().item()
            bool(x.max() > 0)
            x.tolist()
            x[x > 1]  # boolean-mask indexing runs nonzero
            x[torch.tensor([0, 2])]  # an index tensor is not a sync
            torch.optim.SGD([torch.nn.Parameter(x.clone())], lr=0.1).step()  # torch-internal reads: not counted
    assert sorted(call for _, call, _ in guard.syncs) == ["__bool__", "__getitem__", "item", "tolist"]
    assert guard.sync_count("update") == 4 and guard.sync_count("rollout") == 0


# ------------------------------------------------------------------------ plan_updates

def test_plan_updates_draws_on_the_generators_device_and_keeps_the_cpu_plan():
    """The same plan as the former host formula on the CPU (exact resume and the quickstart
    figures depend on it), with every draw on the generator's device."""
    chunks = list(torch.arange(11).split(3))
    with DeviceGuard() as guard:
        plan = plan_updates(chunks, [1, 2, 4, 5, 7], tau=0.6, num_updates=3,
                            generator=torch.Generator("cpu").manual_seed(7))
    guard.assert_clean()
    got = [[(int(rows[0]), step) for rows, step in update] for update in plan.updates]

    g = torch.Generator().manual_seed(7)  # the former formula, written out independently
    picks = grpo.subsample_timesteps(len(chunks), 5, 0.6, generator=g)
    pairs = [(int(chunks[c][0]), [1, 2, 4, 5, 7][int(k)]) for c in range(len(chunks)) for k in picks[c]]
    pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=g).tolist()]
    bounds = [round(u * len(pairs) / 3) for u in range(4)]
    assert got == [pairs[bounds[u]:bounds[u + 1]] for u in range(3)]


# ------------------------------------------------------------------------ the trainer

def _mostly_nan(images, prompts):
    """Brightness, but NaN for every third sample: the update must select the valid ones."""
    values = images.flatten(1).mean(1)
    return torch.where(torch.arange(len(values), device=values.device) % 3 == 0, float("nan"), values)


VARIANTS = {
    "plain": {},
    "best_of_n": {"grpo": {"best_of_n_keep": 1}},
    "kl_ema": {"grpo": {"kl_coef": 0.1}, "trainer": {"ema_decay": 0.9}},
    "overlap_rewards": {"trainer": {"overlap_rewards": True}},
    "sum_window_flow_grpo": {"grpo": {"logprob_reduce": "sum"},
                             "sampler": {"num_steps": 5, "sde_window": [1, 4], "sde_form": "flow_grpo"}},
    "invalid_rewards": {"rewards": [{"name": "test_device_placement:_mostly_nan"}]},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_iteration_obeys_the_device_rules(tiny_config, variant):
    cfg = _merge(tiny_config, VARIANTS[variant])
    cfg["trainer"]["iterations"] = 1
    if variant != "plain":  # evaluation runs once, in "plain" (before and after training)
        cfg["data"]["eval_prompts"] = ""
    guard, metrics = _run_guarded(lambda: Trainer(cfg).train(progress=False))
    guard.assert_clean()
    last = metrics[-1]
    assert last["first_update_logp_max_dev"] == 0.0 and last["updates"] >= 1 and math.isfinite(last["loss"])
    if variant == "invalid_rewards":
        assert last["reward/test_device_placement:_mostly_nan_faults"] == 3  # rows 0, 3, 6 of 8
    assert guard.sync_count("rollout") == 0, guard.sync_sites("rollout")
    assert guard.sync_count("update") <= UPDATE_SYNCS_PER_ITERATION + last["updates"], guard.sync_sites("update")
    assert guard.sync_count("best_of_n") <= BEST_OF_N_SYNCS, guard.sync_sites("best_of_n")


def test_hot_path_syncs_do_not_grow_with_micro_batches_or_steps(tiny_config):
    """2 chunks x 4 steps against 8 chunks x 6 steps: the same number of host syncs."""
    counts = []
    for micro_batch, steps in ((4, 4), (1, 6)):
        cfg = _merge(tiny_config, {"sampler": {"num_steps": steps}, "trainer": {"micro_batch_size": micro_batch},
                                   "data": {"eval_prompts": ""}})
        guard, metrics = _run_guarded(lambda: Trainer(cfg).step())
        guard.assert_clean()
        assert metrics["updates"] == cfg["trainer"]["updates_per_iteration"]
        counts.append((guard.sync_count("rollout"), guard.sync_count("update")))
    assert counts[0] == counts[1] == (0, UPDATE_SYNCS_PER_ITERATION + tiny_config["trainer"]["updates_per_iteration"])


# ------------------------------------------------------------------------ sample, eval, preprocess

def test_sample_and_eval_commands_obey_the_device_rules(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["trainer"]["iterations"] = 1
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with DeviceGuard() as guard, instrument_trainer(guard):
        Trainer(cfg).train(progress=False)
        assert main(["sample", "--config", str(config), "--prompt", "a red circle", "--out",
                     str(tmp_path / "samples"), "--checkpoint", cfg["run"]["output_dir"]]) == 0
        assert main(["eval", "--config", str(config), "--checkpoint", cfg["run"]["output_dir"],
                     "--out", str(tmp_path / "eval")]) == 0
    guard.assert_clean()
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1 and (tmp_path / "eval" / "eval.csv").is_file()


# ------------------------------------------------------------------------ bench scripts

def test_bench_scripts_obey_the_device_rules(tiny_config, tmp_path):
    """bench.gradient_snr and bench.toy_diagnostics on the tiny trainer, bench.throughput --tiny on FLUX.
    (bench.reference_loop, bench.e2e and bench.gpu are checked by their own tests.)"""
    from bench import throughput
    from bench.gradient_snr import half_gradient_cosines
    from bench.toy_diagnostics import group_spread
    cfg = _merge(tiny_config, {"data": {"eval_prompts": ""}})
    with DeviceGuard() as guard:
        trainer = Trainer(cfg)
        cosines = half_gradient_cosines(trainer.ctx, num_prompts=2)
        spread = group_spread(trainer.ctx, group_size=2)
        rows = throughput.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--iterations", "1", "--warmup",
                                "0", "--peak-tflops", "0.5", "--model", "flux", "--settings", "none",
                                "--csv", str(tmp_path / "throughput.csv")])
    guard.assert_clean()
    assert set(cosines) == {*trainer.sampler.stochastic_steps, "all"} and all(abs(c) <= 1 for c in cosines.values())
    assert all(math.isfinite(v) for v in spread.values()) and len(rows) == 1


# ------------------------------------------------------------------------ real adapters (tiny checkpoints)

VIDEO = {"height": 32, "width": 48, "frames": 5}
VIDEO_TEXT = ["max_sequence_length=48", "template_crop_start=auto"]
# name -> (adapter, checkpoint builder, adapter options, preprocess options, prediction)
ADAPTERS = {
    "sd14": ("sd14", build_sd14, {"height": 16, "width": 16}, [], "ddim"),
    "flux": ("flux", build_flux, {"height": 16, "width": 24}, ["max_sequence_length=24"], "flow"),
    "flux_lora": ("flux", build_flux, {"height": 16, "width": 24, "lora": {"rank": 2, "alpha": 4}},
                  ["max_sequence_length=24"], "flow"),
    "hunyuan_video": ("hunyuan_video", build_hunyuan_video, VIDEO, VIDEO_TEXT, "flow"),
    "skyreels_i2v": ("skyreels_i2v", build_skyreels_i2v, VIDEO, ["height=32", "width=48", *VIDEO_TEXT], "flow"),
    "sd35": ("sd35", build_sd35, {"height": 16, "width": 32, "max_sequence_length": 16}, ["max_sequence_length=16"],
             "flow"),
    "qwen_image": ("qwen_image", build_qwen_image, {"height": 16, "width": 24}, ["max_sequence_length=32"], "flow"),
    "wan_t2v": ("wan_t2v", build_wan_t2v, {"height": 32, "width": 32, "frames": 5}, ["max_sequence_length=24"],
                "flow"),
}


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_real_adapter_preprocess_and_iteration_obey_the_device_rules(adapter, tmp_path):
    """`dancegrpo preprocess` and one training iteration of each real adapter's tiny checkpoint."""
    name, build, options, encoder_options, prediction = ADAPTERS[adapter]
    ckpt = build(tmp_path / "ckpt")
    prompts = (write_images(tmp_path / "data", PROMPTS) if name == "skyreels_i2v"
               else write_prompts(tmp_path / "prompts.txt", PROMPTS))
    options = {"prompt_cache": str(tmp_path / "cache"), **options}
    with DeviceGuard() as guard, instrument_trainer(guard):
        assert main(["preprocess", "--model", name, "--path", str(ckpt), "--prompts", str(prompts), "--out",
                     options["prompt_cache"], "--dtype", "float32", "--no-progress",
                     *[arg for option in encoder_options for arg in ("--option", option)]]) == 0
        cfg = trainer_config(tmp_path / "run", name, ckpt, options, prediction=prediction)
        metrics = Trainer(cfg, rewards={"brightness": brightness}).train(progress=False)
    guard.assert_clean()
    assert metrics[-1]["first_update_logp_max_dev"] == 0.0 and metrics[-1]["updates"] == 1
    assert guard.sync_count("rollout") == 0, guard.sync_sites("rollout")
    assert guard.sync_count("update") <= UPDATE_SYNCS_PER_ITERATION + 1, guard.sync_sites("update")
