"""Rollouts run in eval mode, updates in train mode: a policy whose forward depends on the mode
(dropout, running-statistics norms) is refused before any work, and one that does not gives a
first-update ratio of exactly 1 also once LoRA's B weights are no longer zero (issue 15, item 5)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dancegrpo.models import load_model
from dancegrpo.models.train_mode import check_mode_independent, mode_dependence
from dancegrpo.trainer import Trainer
from tiny_models import brightness, trainer_config

MODULES = [  # (module, input shape)
    (nn.Dropout(0.1), (4, 8)), (nn.Dropout(0.0), (4, 8)), (nn.Dropout2d(0.5), (2, 4, 3, 3)),
    (nn.AlphaDropout(0.2), (4, 8)), (nn.BatchNorm1d(8), (4, 8)), (nn.BatchNorm1d(8, track_running_stats=False), (4, 8)),
    (nn.InstanceNorm1d(8, track_running_stats=True), (2, 8, 5)), (nn.InstanceNorm1d(8), (2, 8, 5)),
    (nn.GroupNorm(2, 8), (4, 8)), (nn.LayerNorm(8), (4, 8)), (nn.RReLU(), (4, 8)), (nn.RReLU(0.2, 0.2), (4, 8)),
    (nn.Linear(8, 8), (4, 8)),
]


@pytest.mark.parametrize("module,shape", MODULES, ids=[f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(MODULES)])
def test_flagged_modules_are_exactly_those_whose_output_changes_with_the_mode(module, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 1  # batch stats != running (0, 1)
    module.eval()
    with torch.no_grad():
        evaluated = module(x)
        module.train()
        torch.manual_seed(0)
        trained = module(x)
    assert (not torch.equal(trained, evaluated)) == (mode_dependence(module) is not None)


def test_multihead_attention_dropout_is_flagged():
    x = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))
    for dropout in (0.0, 0.1):
        mha = nn.MultiheadAttention(8, 2, dropout=dropout)
        with torch.no_grad():
            evaluated = mha.eval()(x, x, x)[0]
            trained = mha.train()(x, x, x)[0]
        assert (not torch.equal(trained, evaluated)) == (mode_dependence(mha) is not None)


def test_only_modules_the_policy_switches_are_checked():
    frozen = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()  # e.g. a text encoder, always in eval
    policy = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    root = nn.ModuleDict({"text_encoder": frozen, "transformer": policy})
    check_mode_independent(policy, root)  # the dropout is never switched to train mode
    assert policy.training and not frozen.training  # flags restored
    policy.append(nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"1 module\(s\): transformer.2 BatchNorm1d\(track_running_stats=True\)"):
        check_mode_independent(policy, root)


def test_dropout_in_the_denoiser_is_refused_by_the_trainer_with_its_name(tiny_config):
    adapter = load_model("toy_flux", tiny_config["model"]["path"])
    adapter.transformer.transformer_blocks[0].attn.to_out[1].p = 0.1  # diffusers' attention dropout
    with pytest.raises(ValueError, match=r"transformer.transformer_blocks.0.attn.to_out.1 Dropout\(p=0.1\).*"
                                         r"first-update ratio must be exactly 1"):
        Trainer(tiny_config, adapter=adapter)


def test_lora_dropout_is_refused_when_the_options_are_read(tiny_flux):
    ckpt, cache = tiny_flux
    with pytest.raises(ValueError, match=r"lora.dropout = 0.1 must be 0: GRPO's first update needs"):
        load_model("flux", str(ckpt), {"prompt_cache": str(cache), "height": 16, "width": 24,
                                       "lora": {"rank": 2, "alpha": 4, "dropout": 0.1}})


def test_lora_adapter_saved_with_dropout_is_refused_by_the_trainer(tiny_flux, tmp_path):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model
    ckpt, cache = tiny_flux
    base = FluxTransformer2DModel.from_pretrained(str(ckpt), subfolder="transformer")
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"], lora_dropout=0.1)) \
        .save_pretrained(str(tmp_path / "adapter"))  # another tool's adapter: its config keeps the dropout
    options = {"prompt_cache": str(cache), "height": 16, "width": 24,
               "lora": {"rank": 2, "alpha": 4, "init_from": str(tmp_path / "adapter")}}
    with pytest.raises(ValueError, match=r"transformer_blocks.0.attn.to_q.lora_dropout.default Dropout\(p=0.1\)"):
        Trainer(trainer_config(tmp_path / "run", "flux", ckpt, options), rewards={"brightness": brightness})


def test_lora_first_update_ratio_is_exactly_one_at_the_second_iteration(tiny_flux, tmp_path):
    ckpt, cache = tiny_flux
    options = {"prompt_cache": str(cache), "height": 16, "width": 24, "lora": {"rank": 2, "alpha": 4}}
    config = trainer_config(tmp_path / "run", "flux", ckpt, options, iterations=2)
    config["trainer"]["lr"] = 1e-2
    trainer = Trainer(copy.deepcopy(config), rewards={"brightness": brightness})
    trainer.step()
    lora_b = [p for name, p in trainer.policy.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # B left zero: LoRA now changes the output
    metrics = trainer.step()  # one update: every ratio of the iteration is a first-update ratio
    assert metrics["updates"] == 1 and metrics["grad_norm"] > 0
    assert metrics["first_update_logp_max_dev"] == 0.0
    assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0
