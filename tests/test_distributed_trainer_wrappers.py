"""The trainer's per-block wrappers in one process: activation checkpointing and compiled blocks change
memory and speed, not results, also for LoRA; settings that need several processes are refused with
the launch command."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from dancegrpo.distributed import blocks
from dancegrpo.distributed.blocks import checkpointed_blocks, transformer_blocks
from dancegrpo.trainer import Trainer
from tiny_models import trainer_config


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


def test_lora_with_checkpointing_and_compiled_blocks_gives_the_same_step(tiny_flux, tmp_path, monkeypatch):
    # The wrappers go on the peft model's base transformer (LoRA layers inside its blocks); the
    # trainer still trains the LoRA weights alone. Compiled with the aot_eager backend: the same
    # per-block torch.compile as the default (inductor), without minutes of C++ builds on a CPU.
    monkeypatch.setattr(blocks, "compile_blocks", functools.partial(blocks.compile_blocks, backend="aot_eager"))
    ckpt, cache = tiny_flux
    options = {"prompt_cache": str(cache), "height": 16, "width": 24, "lora": {"rank": 2, "alpha": 4}}
    config = trainer_config(tmp_path / "run", "flux", ckpt, options)
    config["rewards"] = [{"name": "tiny_models:brightness"}]
    results = []
    for parallel in ({}, {"activation_checkpointing": "selective", "compile_blocks": True}):
        torch.manual_seed(0)  # peft draws LoRA's initial A from the global generator
        trainer = Trainer({**copy.deepcopy(config), "parallel": parallel})
        before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
        metrics = trainer.step()
        assert metrics["first_update_logp_max_dev"] == 0.0 and metrics["grad_norm"] > 0
        results.append((before, trainer.policy.state_dict()))
    denoiser = trainer.adapter.denoiser
    assert checkpointed_blocks(denoiser) == list(range(len(transformer_blocks(denoiser))))
    assert all(block._compiled_call_impl is not None for block in transformer_blocks(denoiser))
    assert all("lora_" in name for name in results[1][1])  # the LoRA weights alone are trained
    (plain_before, plain), (wrapped_before, wrapped) = results
    assert wrapped.keys() == plain.keys()
    for name, value in wrapped.items():
        torch.testing.assert_close(wrapped_before[name], plain_before[name], rtol=0, atol=0)
        torch.testing.assert_close(value, plain[name], rtol=0, atol=1e-6)
    assert any(not torch.equal(plain[k], plain_before[k]) for k in plain)


@pytest.mark.parametrize("world,model,parallel,match", [
    ("2", {"name": "flux"}, ["parallel.sp_size=2"],
     r"parallel.sp_size = 2 with model.name = 'flux': Ulysses sequence parallelism exists for hunyuan_video, "
     r"skyreels_i2v, wan_t2v, wan_i2v only"),
    ("1", {"name": "flux", "options": {"gradient_checkpointing": True}}, ["parallel.activation_checkpointing=full"],
     r"model.options.gradient_checkpointing = true with parallel.activation_checkpointing = 'full': both "
     r"checkpoint the same blocks"),
])
def test_options_that_do_not_go_together_are_refused_before_loading(tiny_config, tmp_path, monkeypatch, world, model,
                                                                     parallel, match):
    monkeypatch.setenv("WORLD_SIZE", world)  # refused before torchrun's process group is even joined
    config = copy.deepcopy(tiny_config)
    config["model"] = {**model, "path": str(tmp_path / "not_read")}  # no such folder: nothing is loaded
    with pytest.raises(ValueError, match=match):
        Trainer(config, overrides=parallel)
