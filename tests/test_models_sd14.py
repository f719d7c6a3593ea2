"""Stable Diffusion v1.4 adapter on a tiny random checkpoint in the real diffusers layout."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import PeftModel

from dancegrpo.cli import main
from dancegrpo.models import load_model
from dancegrpo.models.checkpoint_layout import CheckpointLayoutError
from dancegrpo.models.prompt_cache import PromptCache, PromptCacheError
from dancegrpo.rollout import ode_sample
from dancegrpo.sampler import build_sampler
from dancegrpo.trainer import Trainer
from tiny_models import PROMPTS, brightness, build_sd14, trainer_config, write_prompts


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd14")
    ckpt = build_sd14(root / "ckpt")
    prompts = write_prompts(root / "prompts.txt", PROMPTS)
    assert main(["preprocess", "--model", "sd14", "--path", str(ckpt), "--prompts", str(prompts),
                 "--out", str(root / "cache"), "--batch-size", "3", "--shard-size", "2", "--no-progress"]) == 0
    return ckpt, root / "cache"


def options(cache, **extra):
    return {"prompt_cache": str(cache), "height": 16, "width": 16, **extra}


def test_cache_equals_pipeline_encode_prompt(sd):
    ckpt, cache_dir = sd
    pipe = StableDiffusionPipeline.from_pretrained(str(ckpt), safety_checker=None, requires_safety_checker=False)
    positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * len(PROMPTS))
    cache = PromptCache(cache_dir, "sd14")
    assert len(cache) == len(PROMPTS) + 1 and len(cache.shards) == 3  # the empty prompt is added
    torch.testing.assert_close(cache.lookup(PROMPTS)["prompt_embeds"], positive, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache.lookup([""])["prompt_embeds"], negative[:1], rtol=0, atol=1e-6)


def test_ode_sampling_equals_diffusers_ddim_pipeline_with_cfg(sd):
    ckpt, cache_dir = sd
    adapter = load_model("sd14", str(ckpt), options(cache_dir, cfg_scale=5.0))
    cond = adapter.encode_prompts(PROMPTS[:2])
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(3))
    ours = ode_sample(adapter, build_sampler("ddim", 4, 0.0), cond, noise, chunk_size=2)

    pipe = StableDiffusionPipeline.from_pretrained(str(ckpt), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # as SD v1.4 ships
    reference = pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
                     latents=noise.clone(), num_inference_steps=4, guidance_scale=5.0, eta=0.0, height=16, width=16,
                     output_type="latent").images
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)

    pixels = adapter.decode(ours)
    expected = pipe.image_processor.postprocess(
        pipe.vae.decode(ours / pipe.vae.config.scaling_factor).sample, output_type="pt", do_denormalize=[True] * 2)
    assert pixels.shape == (2, 3, 16, 16)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)


def test_batched_cfg_equals_two_separate_passes(sd):
    ckpt, cache_dir = sd
    adapter = load_model("sd14", str(ckpt), options(cache_dir, cfg_scale=7.5))
    cond = adapter.encode_prompts(PROMPTS[1:3])
    x, t = torch.randn(2, *adapter.latent_shape()), torch.tensor([901, 41])
    with torch.no_grad():
        batched = adapter.predict(x, t, cond)
        uncond = adapter.unet(x, t, encoder_hidden_states=cond["negative_prompt_embeds"]).sample
        text = adapter.unet(x, t, encoder_hidden_states=cond["prompt_embeds"]).sample
    torch.testing.assert_close(batched, uncond + 7.5 * (text - uncond), rtol=1e-5, atol=1e-5)


def test_trainer_iteration_then_saved_unet_loads_with_diffusers(sd, tmp_path):
    ckpt, cache_dir = sd
    cfg = trainer_config(tmp_path / "run", "sd14", ckpt, options(cache_dir), prediction="ddim")
    trainer = Trainer(cfg, rewards={"brightness": brightness})
    base = {k: v.clone() for k, v in trainer.adapter.unet.state_dict().items()}
    trainer.train(progress=False)
    metrics = trainer.metrics[-1]
    assert metrics["first_update_logp_max_dev"] == 0.0 and metrics["updates"] == 1 and metrics["grad_norm"] > 0
    assert any(not torch.equal(base[k], v) for k, v in trainer.adapter.unet.state_dict().items())

    final = tmp_path / "run" / "final_model"
    loaded = UNet2DConditionModel.from_pretrained(str(final), subfolder="unet")
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([500, 20]), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, text).sample, trainer.adapter.unet(x, t, text).sample, rtol=0, atol=0)
    # The saved folder is a whole checkpoint: it loads back through the user's path.
    again = load_model("sd14", str(final), options(cache_dir))
    cond = again.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(again.predict(x, t, cond), trainer.adapter.predict(x, t, cond), rtol=0, atol=0)


def test_lora_trains_only_lora_and_round_trips(sd, tmp_path):
    ckpt, cache_dir = sd
    lora = {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    cfg = trainer_config(tmp_path / "run", "sd14", ckpt, options(cache_dir, lora=lora), prediction="ddim")
    trainer = Trainer(cfg, rewards={"brightness": brightness})
    adapter = trainer.adapter
    assert all("lora_" in name for name, _ in trainer.policy.named_parameters())
    frozen = {k: v.clone() for k, v in adapter.unet.state_dict().items() if "lora_" not in k}
    trainer.train(progress=False)
    assert all(torch.equal(frozen[k], v) for k, v in adapter.unet.state_dict().items() if "lora_" not in k)
    lora_b = [p for n, p in trainer.policy.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # the update reached the (zero-initialised) B matrices

    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([700, 10]), torch.randn(2, 77, 32)
    final = tmp_path / "run" / "final_model"
    base = UNet2DConditionModel.from_pretrained(str(ckpt), subfolder="unet")
    with torch.no_grad():
        ours = adapter.unet(x, t, text).sample
        with adapter.frozen_reference().active():
            torch.testing.assert_close(adapter.unet(x, t, text).sample, base(x, t, text).sample, rtol=0, atol=1e-6)
        peft_loaded = PeftModel.from_pretrained(base, str(final / "unet_lora"))
        torch.testing.assert_close(peft_loaded(x, t, text).sample, ours, rtol=0, atol=1e-6)
        merged = UNet2DConditionModel.from_pretrained(str(final), subfolder="unet")
        torch.testing.assert_close(merged(x, t, text).sample, ours, rtol=1e-4, atol=1e-5)


def test_bad_checkpoint_resolution_and_cache_are_refused_before_loading(sd, tmp_path):
    ckpt, cache_dir = sd
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((ckpt / "model_index.json").read_text())
    (broken / "unet").symlink_to(ckpt / "unet")
    with pytest.raises(CheckpointLayoutError, match=r"missing vae/.*Expected layout: model_index.json, unet/"):
        load_model("sd14", str(broken), options(cache_dir))
    with pytest.raises(ValueError, match="height = 15 not divisible by 2"):
        load_model("sd14", str(ckpt), options(cache_dir, height=15))
    with pytest.raises(PromptCacheError, match="has no index.json"):
        load_model("sd14", str(ckpt), options(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['heigth'\]"):
        load_model("sd14", str(ckpt), {"prompt_cache": str(cache_dir), "heigth": 16})
    adapter = load_model("sd14", str(ckpt), options(cache_dir))
    with pytest.raises(PromptCacheError, match="'a purple cow' not in the prompt cache"):
        adapter.encode_prompts(["a red cat", "a purple cow"])


def test_frozen_reference_of_a_full_fine_tune_is_the_initial_unet(sd):
    ckpt, cache_dir = sd
    adapter = load_model("sd14", str(ckpt), options(cache_dir))
    cond = adapter.encode_prompts(PROMPTS[:1])
    x, t = torch.randn(1, *adapter.latent_shape()), torch.tensor([300])
    with torch.no_grad():
        initial = adapter.predict(x, t, cond)
        reference = adapter.frozen_reference()
        for p in adapter.trainable.parameters():
            p.add_(0.01)
        assert not torch.allclose(adapter.predict(x, t, cond), initial)
        with reference.active():
            torch.testing.assert_close(adapter.predict(x, t, cond), initial, rtol=0, atol=0)
