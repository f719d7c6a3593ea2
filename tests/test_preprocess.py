"""Prompt files, the sharded prompt cache, `dancegrpo preprocess` refusals, and the model recipes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from dancegrpo.cli import main
from dancegrpo.config import load_config
from dancegrpo.models import model_names
from dancegrpo.models.checkpoint_layout import CheckpointLayoutError
from dancegrpo.models.diffusers_generator import check_resolution, parse_options
from dancegrpo.models.flux import FluxGenerator
from dancegrpo.models.hunyuan_video import HunyuanVideoGenerator
from dancegrpo.models.prompt_cache import PromptCache, PromptCacheError, PromptCacheWriter
from dancegrpo.models.sd14 import SD14Generator
from dancegrpo.models.skyreels_i2v import SkyReelsI2VGenerator
from dancegrpo.preprocess import preprocess, read_prompt_file
from tiny_models import PROMPTS, build_sd14, write_prompts

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_prompt_files_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n  a dog  \na cat\n")
    assert read_prompt_file(text) == [{"prompt": "a cat"}, {"prompt": "a dog"}]
    jsonl = tmp_path / "sub" / "p.jsonl"
    (jsonl.parent / "img").mkdir(parents=True)
    for image in (jsonl.parent / "img" / "cat.png", tmp_path / "dog.png", jsonl.parent / "a.png", jsonl.parent / "b.png"):
        Image.new("RGB", (4, 4)).save(image)
    jsonl.write_text('{"prompt": "a cat", "image": "img/cat.png"}\n'
                     + json.dumps({"prompt": "a dog", "image": str(tmp_path / "dog.png")}) + "\n")
    entries = read_prompt_file(jsonl)
    assert entries[0]["image"] == str(jsonl.parent / "img" / "cat.png") and entries[1]["image"] == str(tmp_path / "dog.png")
    jsonl.write_text('{"prompt": "a cat"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2:12: JSONL prompt line is not valid JSON"):
        read_prompt_file(jsonl)
    jsonl.write_text('{"prompt": "a cat", "image": "a.png"}\n{"prompt": "a cat", "image": "b.png"}\n')
    with pytest.raises(ValueError, match="appears twice with different extras"):
        read_prompt_file(jsonl)
    jsonl.write_text('{"text": "a cat"}\n')
    with pytest.raises(ValueError, match=r"needs a \"prompt\" string"):
        read_prompt_file(jsonl)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_prompt_file(tmp_path / "missing.txt")


def test_cache_shards_round_trip_in_any_order(tmp_path):
    writer = PromptCacheWriter(tmp_path / "c", "flux", meta={"k": 1}, shard_size=2)
    values = {p: torch.randn(3, 4) for p in PROMPTS}
    for batch in (PROMPTS[:3], PROMPTS[2:]):  # overlapping batches: a duplicate is stored once
        writer.add(batch, {"a": torch.stack([values[p] for p in batch]),
                           "b": torch.tensor([len(p) for p in batch])})
    writer.close()
    cache = PromptCache(tmp_path / "c", ("flux",))
    assert len(cache) == 4 and len(cache.shards) == 2 and cache.meta == {"k": 1}
    order = [PROMPTS[3], PROMPTS[0], PROMPTS[3], PROMPTS[2]]
    got = cache.lookup(order)
    assert torch.equal(got["a"], torch.stack([values[p] for p in order]))
    assert got["b"].tolist() == [len(p) for p in order]
    assert (tmp_path / "c" / "prompts.txt").read_text().splitlines() == PROMPTS

    with pytest.raises(PromptCacheError, match="written for model 'flux', not 'sd14'"):
        PromptCache(tmp_path / "c", "sd14")
    with pytest.raises(PromptCacheError, match=r"'a green fox' not in the prompt cache"):
        cache.lookup(["a green fox"])
    with pytest.raises(ValueError, match="changed from"):
        writer.add(["x"], {"a": torch.randn(1, 5, 4), "b": torch.tensor([1])})
    (tmp_path / "c" / "shard_00001.safetensors").unlink()
    with pytest.raises(PromptCacheError, match="incomplete: missing shard_00001.safetensors"):
        PromptCache(tmp_path / "c")


def test_preprocess_refuses_missing_encoder_files_and_unknown_options(tmp_path):
    ckpt = build_sd14(tmp_path / "sd")
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:2])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_sequence_length'\]"):
        preprocess("sd14", ckpt, prompts, tmp_path / "c", options={"max_sequence_length": 8})
    with pytest.raises(ValueError, match="unknown model 'sdxl'"):
        preprocess("sdxl", ckpt, prompts, tmp_path / "c")
    shutil.rmtree(ckpt / "tokenizer")
    with pytest.raises(CheckpointLayoutError, match=r"missing tokenizer/\. Expected layout: model_index.json, "
                                                    r"text_encoder/\{config.json"):
        preprocess("sd14", ckpt, prompts, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before any work
    assert main(["preprocess", "--model", "sd14", "--path", str(ckpt), "--prompts", str(prompts),
                 "--out", str(tmp_path / "c"), "--option", "novalue"]) == 2


MODEL_CLASSES = {"sd14": SD14Generator, "flux": FluxGenerator, "hunyuan_video": HunyuanVideoGenerator,
                 "skyreels_i2v": SkyReelsI2VGenerator}
# The released checkpoints' VAE and transformer geometry (their config.json values).
VAE_2D = {"block_out_channels": [128, 256, 512, 512]}
VAE_3D = {"spatial_compression_ratio": 8, "temporal_compression_ratio": 4}


@pytest.mark.parametrize("recipe", ["sd14_hps", "flux_hps", "hunyuan_t2v", "hunyuan_t2i", "skyreels_i2v"])
def test_recipes_validate_and_fit_the_real_checkpoints(recipe):
    text = (CONFIGS / f"{recipe}.yaml").read_text()
    cfg = load_config(str(CONFIGS / f"{recipe}.yaml"))
    assert cfg.model.name in model_names()
    cls = MODEL_CLASSES[cfg.model.name]
    options = parse_options(cls.options_class, cls.model_name, cfg.model.options)
    if cls is SD14Generator:
        check_resolution("sd14", options.height, options.width, 8, "VAE factor 8")
    elif cls is FluxGenerator:
        cls.check_before_loading(Path("."), options, {"patch_size": 1}, VAE_2D)
    else:
        cls.check_before_loading(Path("."), options, {"patch_size": 2}, VAE_3D)
    # Every setting carries a comment naming its source.
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":") and not stripped.startswith("- name"):
            assert "#" in line, f"{recipe}.yaml: no source comment on {stripped!r}"
    assert json.dumps(cfg.model.options)  # plain data, as the trainer passes it on
