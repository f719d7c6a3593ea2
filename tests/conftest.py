"""Shared fixtures: a tiny random toy_flux checkpoint on disk and a small run config."""
from __future__ import annotations

import copy

import pytest
import torch

from dancegrpo.models.toy_flux import build_toy_flux

TINY_TRANSFORMER = dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
TINY_TEXT = dict(dim=16, num_heads=2, ff_dim=32)


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-weight toy_flux written in its real on-disk layout."""
    path = tmp_path_factory.mktemp("tiny_toy_flux")
    build_toy_flux(seed=0, transformer_overrides=TINY_TRANSFORMER, text_overrides=TINY_TEXT).save_pretrained(path)
    return path


BASE_CONFIG = {
    "run": {"output_dir": "", "seed": 0, "device": "cpu"},
    "model": {"name": "toy_flux", "path": ""},
    "sampler": {"num_steps": 4, "eta": 0.7, "shift": 3.0},
    "data": {"train_prompts": "toy:train", "eval_prompts": "toy:eval", "eval_num_prompts": 4},
    "rewards": [{"name": "rewards_for_tests:mean_brightness"}],
    "grpo": {"group_size": 4, "prompts_per_iteration": 2, "tau": 0.5, "clip_range": 1e-3},
    "trainer": {"iterations": 3, "lr": 1e-3, "updates_per_iteration": 2, "micro_batch_size": 3,
                "checkpoint_every": 1, "keep_last": 10},
}


@pytest.fixture
def tiny_config(tmp_path, tiny_checkpoint):
    """A fast config dict on the tiny checkpoint; tests edit their copy."""
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["run"]["output_dir"] = str(tmp_path / "run")
    cfg["model"]["path"] = str(tiny_checkpoint)
    return cfg


FLUX_SEQ = 24  # T5 sequence length of the tiny FLUX prompt cache (FLUX.1-dev: 512)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """(checkpoint folder, prompt cache folder) of a tiny random FLUX.1-dev in the diffusers layout,
    its prompt cache written by `dancegrpo preprocess` (fp32; tiny_models.PROMPTS)."""
    from dancegrpo.cli import main
    from tiny_models import PROMPTS, build_flux, write_prompts
    root = tmp_path_factory.mktemp("flux")
    ckpt = build_flux(root / "ckpt")
    prompts = write_prompts(root / "prompts.txt", PROMPTS)
    assert main(["preprocess", "--model", "flux", "--path", str(ckpt), "--prompts", str(prompts),
                 "--out", str(root / "cache"), "--dtype", "float32", "--option", f"max_sequence_length={FLUX_SEQ}",
                 "--no-progress"]) == 0
    return ckpt, root / "cache"
