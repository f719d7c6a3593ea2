"""The `parallel:` config section: defaults are one process, bad values are named with what is allowed."""
from __future__ import annotations

import pytest

from dancegrpo.config import ConfigError, ParallelConfig, load_config

MINIMAL = {"data": {"train_prompts": "toy:train"}, "rewards": [{"name": "toy_reward"}]}


def test_defaults_are_single_process():
    parallel = load_config(MINIMAL).parallel
    assert parallel == ParallelConfig()
    assert (parallel.sp_size, parallel.fsdp.enabled, parallel.activation_checkpointing,
            parallel.compile_blocks, parallel.group_placement) == (1, False, "none", False, "rank")


@pytest.mark.parametrize("value", [True, False])
def test_fsdp_bool_is_shorthand_for_enabled(value):
    cfg = load_config({**MINIMAL, "parallel": {"fsdp": value}})
    assert cfg.parallel.fsdp.enabled is value and cfg.parallel.fsdp.param_dtype == "fp32"
    assert load_config(MINIMAL, [f"parallel.fsdp={str(value).lower()}"]).parallel.fsdp.enabled is value


def test_sub_dict_and_overrides():
    cfg = load_config({**MINIMAL, "parallel": {"fsdp": True}},
                      ["parallel.fsdp.param_dtype=bf16", "parallel.group_placement=spread", "parallel.sp_size=4"])
    assert (cfg.parallel.fsdp.enabled, cfg.parallel.fsdp.param_dtype) == (True, "bf16")
    assert (cfg.parallel.group_placement, cfg.parallel.sp_size) == ("spread", 4)


def test_every_bad_field_is_named_with_the_allowed_values():
    bad = {"sp_size": 0, "activation_checkpointing": "some", "checkpoint_every_n_blocks": 0,
           "group_placement": "everywhere", "fsdp": {"param_dtype": "fp16", "reduce_dtype": "fp8"}}
    with pytest.raises(ConfigError) as info:
        load_config({**MINIMAL, "parallel": bad})
    problems = info.value.problems
    assert len(problems) == 6
    expected = ["parallel.sp_size = 0", "parallel.activation_checkpointing = 'some'", "none, full, selective",
                "parallel.checkpoint_every_n_blocks = 0", "parallel.group_placement = 'everywhere'", "rank, spread",
                "parallel.fsdp.param_dtype = 'fp16'", "parallel.fsdp.reduce_dtype = 'fp8'", "fp32, bf16"]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="parallel.fsdp.cpu_ofload is not a known key.*cpu_offload"):
        load_config({**MINIMAL, "parallel": {"fsdp": {"cpu_ofload": True}}})


def test_hsdp_shard_size_is_validated_and_must_divide_the_world():
    from dancegrpo.distributed.fsdp import fsdp_mesh

    with pytest.raises(ConfigError, match=r"parallel\.fsdp\.shard_size = 0"):
        load_config({"data": {"train_prompts": "toy:train"}, "rewards": [{"name": "toy_reward"}],
                     "parallel": {"fsdp": {"enabled": True, "shard_size": 0}}})
    with pytest.raises(ValueError, match=r"shard_size = 3 does not divide the world size 8: choose one of \[1, 2, 4, 8\]"):
        fsdp_mesh("cpu", 8, 3)
