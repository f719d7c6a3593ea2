"""The trainer's per-block wrappers in one process: activation checkpointing changes memory, not results;
settings that need several processes are refused with the launch command."""
from __future__ import annotations

import copy

import pytest
import torch

from dancegrpo.distributed.blocks import checkpointed_blocks
from dancegrpo.trainer import Trainer


def _step_weights(config: dict) -> tuple[Trainer, dict[str, torch.Tensor]]:
    trainer = Trainer(config)
    trainer.step()
    return trainer, {k: v.clone() for k, v in trainer.policy.state_dict().items()}


@pytest.mark.parametrize("mode,every_n", [("full", 2), ("selective", 1)])
def test_activation_checkpointing_gives_the_same_step(tiny_config, mode, every_n):
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["eval_prompts"] = ""
    _, plain = _step_weights(cfg)
    cfg["parallel"] = {"activation_checkpointing": mode, "checkpoint_every_n_blocks": every_n}
    trainer, wrapped = _step_weights(cfg)
    blocks = len(trainer.policy.transformer_blocks) + len(trainer.policy.single_transformer_blocks)
    assert checkpointed_blocks(trainer.policy) == list(range(0, blocks, every_n))
    assert wrapped.keys() == plain.keys()  # no wrapper modules: checkpoints keep their keys
    for name, value in wrapped.items():
        torch.testing.assert_close(value, plain[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("override,name", [("parallel.fsdp=true", "parallel.fsdp.enabled"),
                                           ("parallel.sp_size=2", "parallel.sp_size")])
def test_multi_process_settings_on_one_process_name_the_launcher(tiny_config, monkeypatch, override, name):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=rf"{name} needs several processes: launch with torchrun"):
        Trainer(tiny_config, overrides=[override])
