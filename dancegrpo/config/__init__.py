"""Typed, validated configuration: YAML recipes loaded into nested dataclasses.

Everything is checked on load, before any work starts. All problems found are reported
together in one `ConfigError`, each naming the dotted field path (``grpo.tau``), the bad
value and what is allowed.

- `schema`: the sections (`RunConfig` ... `ParallelConfig`, `Config`) and their own checks;
- `checks`: checks across sections, and the step counts they share with the trainer;
- `loader`: YAML / mappings into the dataclasses, `section.field=value` overrides, saving.
"""
from .checks import stochastic_step_count, trainable_pairs, trainable_step_count, trained_step_count
from .loader import config_to_dict, from_dict, load_config, save_config
from .schema import (Config, ConfigError, DataConfig, FSDPConfig, GRPOConfig, ModelConfig, ParallelConfig,
                     RewardConfig, RunConfig, SamplerConfig, TrainerConfig)

__all__ = [
    "ConfigError", "RunConfig", "ModelConfig", "SamplerConfig", "DataConfig", "RewardConfig", "GRPOConfig",
    "TrainerConfig", "FSDPConfig", "ParallelConfig", "Config", "from_dict", "load_config", "config_to_dict",
    "save_config", "stochastic_step_count", "trainable_step_count", "trained_step_count", "trainable_pairs",
]
