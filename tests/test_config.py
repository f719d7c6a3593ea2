"""Tests for dancegrpo.config: loading, validation messages, overrides, round trips."""
from __future__ import annotations

import copy
import dataclasses
import textwrap

import pytest
import yaml

from dancegrpo.config import (
    Config, ConfigError, DataConfig, GRPOConfig, ModelConfig, RewardConfig, config_to_dict,
    from_dict, load_config, save_config,
)

# Every field set to a non-default value, so a dropped or altered field shows up.
FULL_YAML = textwrap.dedent("""\
    run:
      output_dir: runs/full
      seed: 7
      device: cuda:1
      autocast_dtype: bf16
      num_threads: 3
    model:
      name: sd15
      path: /models/sd15
      options: {lora_rank: 8, targets: [to_q, to_v], nested: {a: 1}}
    sampler:
      num_steps: 20
      eta: 0.5
      shift: 1.5
      sde_form: flow_grpo
      eval_num_steps: 28
      sde_window: [0, 8]
      cuda_graph: false
      model_time_resolution: 1000
    data:
      train_prompts: prompts/train.txt
      eval_prompts: toy:eval
      eval_num_prompts: 64
    rewards:
      - name: hpsv2
        weight: 0.5
        threshold: 0.25
        options: {model: tiny}
      - name: mypkg.rewards:score
        weight: -1.0
        threshold: null
        options: {}
    grpo:
      group_size: 8
      prompts_per_iteration: 16
      tau: 1.0
      tau_rounding: floor
      exclude_last_step: true
      clip_range: 0.001
      adv_clip_max: 3.0
      best_of_n_keep: 4
      kl_coef: 0.01
      shared_group_noise: false
      logprob_reduce: sum
    trainer:
      iterations: 50
      lr: 3.0e-05
      weight_decay: 0.0
      betas: [0.8, 0.95]
      adam_eps: 1.0e-06
      grad_clip: null
      lr_schedule: cosine
      warmup_iterations: 5
      updates_per_iteration: 2
      micro_batch_size: 8
      ema_decay: 0.99
      checkpoint_every: 5
      keep_last: 3
      eval_every: 10
      log_every: 2
      overlap_rewards: true
    parallel:
      sp_size: 2
      fsdp: {enabled: true, param_dtype: bf16, reduce_dtype: fp32, cpu_offload: true, shard_size: 8}
      activation_checkpointing: selective
      checkpoint_every_n_blocks: 2
      compile_blocks: true
      group_placement: spread
    """)

MINIMAL = {"data": {"train_prompts": "toy:train"}, "rewards": [{"name": "toy_reward"}]}


def with_change(section: str | None, key: str, value) -> dict:
    """MINIMAL with one field set (section None = top level)."""
    data = copy.deepcopy(MINIMAL)
    target = data if section is None else data.setdefault(section, {})
    target[key] = value
    return data


def problems_of(source, overrides=()) -> tuple[str, list[str]]:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    return str(info.value), info.value.problems


@pytest.fixture
def full_yaml(tmp_path):
    path = tmp_path / "full.yaml"
    path.write_text(FULL_YAML)
    return path


# --- valid configs ------------------------------------------------------------------------

def test_full_yaml_loads_every_field_unchanged(full_yaml):
    cfg = load_config(full_yaml)
    # Independent reference: PyYAML's own reading of the same text.
    assert config_to_dict(cfg) == yaml.safe_load(FULL_YAML)
    assert cfg.rewards[1] == RewardConfig(name="mypkg.rewards:score", weight=-1.0)
    assert cfg.trainer.grad_clip is None and cfg.grpo.shared_group_noise is False


def test_round_trip_through_saved_yaml(full_yaml, tmp_path):
    cfg = load_config(full_yaml)
    saved = tmp_path / "run" / "config.yaml"
    save_config(cfg, saved)
    assert load_config(saved) == cfg
    assert load_config(config_to_dict(cfg)) == cfg
    assert load_config(cfg) == cfg


def test_defaults_match_the_documented_schema():
    cfg = load_config(MINIMAL)
    assert cfg == Config(data=DataConfig(train_prompts="toy:train"),
                         rewards=[RewardConfig(name="toy_reward")])
    assert (cfg.sampler.num_steps, cfg.sampler.eta, cfg.sampler.shift) == (16, 0.3, 3.0)
    assert (cfg.grpo.group_size, cfg.grpo.tau, cfg.grpo.clip_range) == (12, 0.6, 1e-4)
    assert cfg.trainer.betas == [0.9, 0.999] and cfg.trainer.grad_clip == 1.0
    assert cfg.run.device == "cpu" and cfg.model.name == "toy_flux"


def test_numbers_for_float_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train_prompts: x}\nrewards: [{name: r}]\n"
                    "trainer: {lr: 1e-5, adam_eps: 1E-7, betas: [0, 5e-1]}\nsampler: {eta: 1}\n")
    assert yaml.safe_load(path.read_text())["trainer"]["lr"] == "1e-5"  # the PyYAML quirk
    cfg = load_config(path)
    assert cfg.trainer.lr == 1e-5 and type(cfg.trainer.lr) is float
    assert cfg.trainer.adam_eps == 1e-7 and cfg.trainer.betas == [0.0, 0.5]
    assert cfg.sampler.eta == 1.0 and type(cfg.sampler.eta) is float


def test_empty_section_means_defaults_and_input_is_not_mutated():
    data = with_change(None, "grpo", None)
    before = copy.deepcopy(data)
    cfg = load_config(data, ["grpo.tau=0.5", "model.options.rank=4", "model.options.lora.alpha=2"])
    assert cfg.grpo == GRPOConfig(tau=0.5)
    assert cfg.model.options == {"rank": 4, "lora": {"alpha": 2}}
    assert data == before


def test_options_are_copied_not_shared():
    data = with_change("model", "options", {"layers": [1, 2]})
    cfg = load_config(data)
    section = from_dict(ModelConfig, data["model"], path="model")
    data["model"]["options"]["layers"].append(3)
    assert cfg.model.options == {"layers": [1, 2]} == section.options


# --- refused configs ----------------------------------------------------------------------

@pytest.mark.parametrize("data, expected", [
    (with_change(None, "trainr", {}),
     ["trainr", "did you mean 'trainer'", "run, model, sampler, data, rewards, grpo, trainer"]),
    (with_change("grpo", "gruop_size", 4),
     ["grpo.gruop_size", "did you mean 'group_size'", "valid keys of grpo", "tau", "kl_coef"]),
    (with_change("sampler", "num_steps", "ten"),
     ["sampler.num_steps = 'ten'", "expected an integer", "got str"]),
    (with_change("grpo", "tau", True), ["grpo.tau = True", "expected a number", "got bool"]),
    (with_change("grpo", "group_size", 4.0), ["grpo.group_size = 4.0", "expected an integer"]),
    (with_change("grpo", "shared_group_noise", "yes"),
     ["grpo.shared_group_noise = 'yes'", "boolean"]),
    (with_change("trainer", "lr", float("nan")), ["trainer.lr = nan", "finite"]),
    (with_change("trainer", "betas", 0.9), ["trainer.betas = 0.9", "a list of numbers"]),
    (with_change("trainer", "betas", [0.9, "x"]), ["trainer.betas.1 = 'x'", "a number"]),
    (with_change("model", "options", [1]), ["model.options = [1]", "a mapping"]),
    (with_change(None, "grpo", 5), ["grpo = 5", "a mapping"]),
    (with_change("grpo", "tau", 0), ["grpo.tau = 0", "must be in (0, 1]"]),
    (with_change("grpo", "tau", 1.5), ["grpo.tau = 1.5 is out of range: must be in (0, 1]"]),
    (with_change("grpo", "group_size", 1),
     ["grpo.group_size = 1", ">= 2", "group of 1 has no relative advantage"]),
    (with_change("grpo", "clip_range", 0), ["grpo.clip_range = 0", "> 0"]),
    (with_change("run", "device", "gpu"), ["run.device = 'gpu'", "'cpu', 'cuda' or 'cuda:N'"]),
    (with_change("run", "device", "cuda:x"), ["run.device = 'cuda:x'"]),
    (with_change("run", "autocast_dtype", "fp32"),
     ["run.autocast_dtype = 'fp32'", "none, bf16, fp16"]),
    (with_change("trainer", "lr_schedule", "step"),
     ["trainer.lr_schedule = 'step'", "constant, linear, cosine"]),
    (with_change("trainer", "betas", [0.9]), ["trainer.betas = [0.9]", "two values"]),
    (with_change("trainer", "betas", [0.9, 1.0]), ["trainer.betas", "[0, 1)"]),
    (with_change("trainer", "ema_decay", 1.0), ["trainer.ema_decay = 1.0", "(0, 1)"]),
    (with_change("trainer", "grad_clip", 0.0), ["trainer.grad_clip = 0.0", "> 0"]),
    (with_change("data", "train_prompts", ""), ["data.train_prompts = ''", "required"]),
    (with_change("grpo", "best_of_n_keep", 7),
     ["grpo.best_of_n_keep = 7", "2 * best_of_n_keep <= grpo.group_size = 12"]),
    (with_change("sampler", "eta", 0), ["sampler.eta = 0", "no step to train on", "eta > 0"]),
    (with_change("grpo", "tau", 1e-12),
     ["grpo.tau = 1e-12 selects no step", "0 of the 16 stochastic steps", "sampler.num_steps = 16", ">= 0.0625"]),
    (with_change("trainer", "updates_per_iteration", 961),
     ["trainer.updates_per_iteration = 961 is more than the 960 (micro-batch, step) pairs",
      "96 micro-batches", "10 trained steps", "at most 960"]),
    (with_change("trainer", "warmup_iterations", 101),
     ["trainer.warmup_iterations = 101 is more than trainer.iterations = 100"]),
    (with_change("run", "output_dir", " "), ["run.output_dir = ' '", "a folder path"]),
    (with_change(None, "rewards", [{"name": "a"}, {"name": "b"}, {"name": "a"}]),
     ["rewards.2.name = 'a'", "duplicates rewards.0.name", "unique"]),
    (with_change(None, "rewards", [{"weight": 2.0}]), ["rewards.0.name is required"]),
    (with_change(None, "rewards", [{"name": "pkg.mod:"}]),
     ["rewards.0.name = 'pkg.mod:'", "package.module:callable"]),
    (with_change(None, "rewards", [{"name": "r", "weight": 0}]),
     ["rewards.0.weight = 0", "non-zero"]),
    (with_change(None, "rewards", [{"name": "r", "wieght": 2}]),
     ["rewards.0.wieght", "did you mean 'weight'", "valid keys of rewards.0"]),
])
def test_refused_with_path_value_and_allowed(data, expected):
    message, problems = problems_of(data)
    assert len(problems) == 1, problems
    for text in expected:
        assert text in message


def test_valid_edge_values_are_accepted():
    data = copy.deepcopy(MINIMAL)
    data["grpo"] = {"tau": 1, "group_size": 2, "best_of_n_keep": 1}
    data["run"] = {"device": "cuda:12"}
    data["trainer"] = {"betas": [0, 0.999999], "warmup_iterations": 0, "eval_every": 0}
    data["rewards"] = [{"name": "a.b:c", "weight": -0.5, "threshold": 0}]
    cfg = load_config(data)
    assert cfg.grpo.tau == 1.0 and cfg.rewards[0].threshold == 0.0


def test_all_problems_reported_together():
    data = copy.deepcopy(MINIMAL)
    data["grpo"] = {"tau": 1.5, "group_size": "many", "clip_range": -1}
    data["run"] = {"device": "tpu", "colour": "red"}
    data["rewards"] = [{"name": "r"}, {"name": "r"}]
    message, problems = problems_of(data)
    assert len(problems) == 6, problems
    for path in ["grpo.tau", "grpo.group_size", "grpo.clip_range", "run.device",
                 "run.colour", "rewards.1.name"]:
        assert path in message
    assert "6 problems" in message


def test_bad_field_is_not_reported_twice():
    # A wrongly typed field must not also trip the range check of its default stand-in.
    _, problems = problems_of(with_change("data", "train_prompts", 5))
    assert problems == ["data.train_prompts = 5 has the wrong type: expected a string, got int"]
    _, problems = problems_of(with_change(None, "rewards", {"name": "r"}))
    assert len(problems) == 1 and problems[0].startswith("rewards = {'name': 'r'}")
    _, problems = problems_of(with_change(None, "rewards", ["r"]))
    assert problems == ["rewards.0 = 'r' has the wrong type: expected a mapping, got str"]
    # ... nor a cross-field check that compares against that stand-in.
    data = with_change("grpo", "group_size", "many")
    data["grpo"]["best_of_n_keep"] = 9
    _, problems = problems_of(data)
    assert len(problems) == 1 and problems[0].startswith("grpo.group_size = 'many'")


def test_from_dict_on_a_section_uses_the_given_path():
    with pytest.raises(ConfigError) as info:
        from_dict(GRPOConfig, {"tau": 2.0}, path="grpo")
    assert info.value.problems == ["grpo.tau = 2.0 is out of range: must be in (0, 1]"]
    assert from_dict(GRPOConfig, {"tau": "0.5"}) == GRPOConfig(tau=0.5)


# --- overrides ----------------------------------------------------------------------------

def test_overrides(full_yaml):
    cfg = load_config(full_yaml, [
        "trainer.lr=3e-5", "rewards.0.weight=2", "grpo.best_of_n_keep=null",
        "trainer.betas=[0.5, 0.6]", "run.device=cpu", "sampler.eval_num_steps=null",
        "model.options.nested.a=5", "data.eval_prompts=a=b.txt",
    ])
    reference = yaml.safe_load(FULL_YAML)
    reference["trainer"].update(lr=3e-5, betas=[0.5, 0.6])
    reference["rewards"][0]["weight"] = 2.0
    reference["grpo"]["best_of_n_keep"] = None
    reference["run"]["device"] = "cpu"
    reference["sampler"]["eval_num_steps"] = None
    reference["model"]["options"]["nested"]["a"] = 5
    reference["data"]["eval_prompts"] = "a=b.txt"  # only the first '=' splits
    assert config_to_dict(cfg) == reference


def test_overrides_create_missing_sections_and_apply_to_config_objects():
    cfg = load_config(MINIMAL, ["grpo.group_size=4", "rewards=[{name: a}, {name: b}]"])
    assert cfg.grpo.group_size == 4 and [r.name for r in cfg.rewards] == ["a", "b"]
    again = load_config(cfg, ["grpo.group_size=6"])
    assert again.grpo.group_size == 6 and cfg.grpo.group_size == 4


def test_overrides_are_validated():
    message, _ = problems_of(MINIMAL, ["grpo.tau=0"])
    assert "grpo.tau = 0" in message and "(0, 1]" in message


@pytest.mark.parametrize("override, expected", [
    ("trainer.lr", ["'trainer.lr'", "section.field=value"]),
    ("=3", ["'=3'", "section.field=value"]),
    ("trainer.lrr=3", ["trainer.lrr", "did you mean 'lr'", "valid keys of trainer"]),
    ("nosuch.x=1", ["nosuch", "valid keys at the top level"]),
    ("rewards.3.weight=1", ["rewards.3", "rewards has 1 entry"]),
    ("rewards.first.weight=1", ["rewards.first", "not a valid index"]),
    ("trainer.lr.x=1", ["trainer.lr is a number, not a section", "'x'"]),
    ("trainer.lr=[1", ["'trainer.lr=[1'", "not valid YAML"]),
])
def test_bad_overrides(override, expected):
    message, problems = problems_of(MINIMAL, [override])
    assert len(problems) == 1
    for text in expected:
        assert text in message


def test_bad_overrides_reported_together():
    _, problems = problems_of(MINIMAL, ["a=1", "b", "grpo.tau=0.5"])
    assert len(problems) == 2


# --- files --------------------------------------------------------------------------------

def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "recipe.yaml"
    message, _ = problems_of(path)
    assert str(path) in message and "does not exist" in message


def test_unparsable_or_non_mapping_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    message, _ = problems_of(bad)
    assert str(bad) in message and "not valid YAML" in message
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    message, _ = problems_of(str(listed))
    assert str(listed) in message and "mapping" in message


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(with_change("grpo", "tau", 3.0)))
    message, _ = problems_of(path)
    assert str(path) in message and "grpo.tau = 3.0" in message


def test_saved_yaml_is_plain(full_yaml, tmp_path):
    cfg = dataclasses.replace(load_config(full_yaml))
    cfg.model.options["pair"] = (1, 2)  # a tuple set in code must still serialise
    save_config(cfg, tmp_path / "out.yaml")
    text = (tmp_path / "out.yaml").read_text()
    assert "!!" not in text  # no Python-specific tags
    assert load_config(tmp_path / "out.yaml").model.options["pair"] == [1, 2]
