"""SkyReels-I2V adapter on a tiny random checkpoint: image latent by channels, batched real CFG."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import HunyuanSkyreelsImageToVideoPipeline, HunyuanVideoTransformer3DModel
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_skyreels_image2video import retrieve_latents
from PIL import Image

from dancegrpo.cli import main
from dancegrpo.models import load_model
from dancegrpo.models.prompt_cache import PromptCache
from dancegrpo.rollout import ode_sample
from dancegrpo.sampler import build_sampler
from dancegrpo.trainer import Trainer
from tiny_models import PROMPTS, brightness, build_skyreels_i2v, trainer_config, write_images

HEIGHT, WIDTH, SEQ = 32, 48, 48


@pytest.fixture(scope="module")
def skyreels(tmp_path_factory):
    root = tmp_path_factory.mktemp("skyreels")
    ckpt = build_skyreels_i2v(root / "ckpt")
    prompts = write_images(root / "data", PROMPTS)
    assert main(["preprocess", "--model", "skyreels_i2v", "--path", str(ckpt), "--prompts", str(prompts),
                 "--out", str(root / "cache"), "--dtype", "float32", "--option", f"height={HEIGHT}",
                 "--option", f"width={WIDTH}", "--option", f"max_sequence_length={SEQ}",
                 "--option", "template_crop_start=auto", "--no-progress"]) == 0
    return ckpt, root / "cache", root / "data"


def options(cache, **extra):
    return {"prompt_cache": str(cache), "height": HEIGHT, "width": WIDTH, "frames": 5, **extra}


def test_cache_holds_text_and_the_image_latent_as_the_pipeline_encodes_it(skyreels):
    ckpt, cache_dir, data = skyreels
    cache = PromptCache(cache_dir, "skyreels_i2v")
    assert "" in cache and cache.meta["height"] == HEIGHT and cache.meta["width"] == WIDTH
    pipe = HunyuanSkyreelsImageToVideoPipeline.from_pretrained(str(ckpt))
    image = Image.open(data / "image_1.png").convert("RGB")  # 40 x 28: resized like the pipeline does
    pixels = pipe.video_processor.preprocess(image, height=HEIGHT, width=WIDTH).unsqueeze(2)
    expected = retrieve_latents(pipe.vae.encode(pixels), sample_mode="argmax") * pipe.vae.config.scaling_factor
    torch.testing.assert_close(cache.lookup([PROMPTS[1]])["image_latents"], expected, rtol=0, atol=1e-6)


def test_ode_sampling_with_cfg_equals_diffusers_skyreels_pipeline(skyreels):
    ckpt, cache_dir, data = skyreels
    adapter = load_model("skyreels_i2v", str(ckpt), options(cache_dir, cfg_scale=5.0))
    cond = adapter.encode_prompts(PROMPTS[:1])
    noise = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    ours = ode_sample(adapter, build_sampler("flow", 3, 0.0, 7.0), cond, noise, chunk_size=1)
    pipe = HunyuanSkyreelsImageToVideoPipeline.from_pretrained(str(ckpt))
    reference = pipe(image=Image.open(data / "image_0.png").convert("RGB"),
                     prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_embeds"],
                     prompt_attention_mask=cond["prompt_attention_mask"],
                     negative_prompt_embeds=cond["negative_prompt_embeds"],
                     negative_pooled_prompt_embeds=cond["negative_pooled_embeds"],
                     negative_prompt_attention_mask=cond["negative_prompt_attention_mask"],
                     latents=noise.clone(), height=HEIGHT, width=WIDTH, num_frames=5, num_inference_steps=3,
                     sigmas=np.linspace(1.0, 0.0, 4)[:-1], true_cfg_scale=5.0, guidance_scale=1.0,
                     output_type="latent").frames
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_batched_cfg_equals_two_separate_passes(skyreels):
    ckpt, cache_dir, _ = skyreels
    adapter = load_model("skyreels_i2v", str(ckpt), options(cache_dir, cfg_scale=5.0))
    cond = adapter.encode_prompts(PROMPTS[2:])
    x, t = torch.randn(2, *adapter.latent_shape()), torch.tensor([0.9, 0.4])
    image = adapter.image_condition(cond, x.shape[2], x.dtype)
    assert torch.equal(image[:, :, 1:], torch.zeros_like(image[:, :, 1:]))  # frame 0 only

    def single(prefix):
        return adapter.transformer(
            hidden_states=torch.cat([x, image], dim=1), timestep=t * 1000,
            encoder_hidden_states=cond[f"{prefix}prompt_embeds"],
            encoder_attention_mask=cond[f"{prefix}prompt_attention_mask"].float(),
            pooled_projections=cond[f"{prefix}pooled_embeds"], guidance=torch.full((2,), 1000.0)).sample

    with torch.no_grad():
        uncond, text = single("negative_"), single("")
        torch.testing.assert_close(adapter.predict(x, t, cond), uncond + 5.0 * (text - uncond), rtol=1e-5, atol=1e-5)


def test_trainer_iteration_then_saved_transformer_loads_with_diffusers(skyreels, tmp_path):
    ckpt, cache_dir, _ = skyreels
    cfg = trainer_config(tmp_path / "run", "skyreels_i2v", ckpt, options(cache_dir))
    trainer = Trainer(cfg, rewards={"brightness": brightness})
    trainer.train(progress=False)
    metrics = trainer.metrics[-1]
    assert metrics["first_update_logp_max_dev"] == 0.0 and metrics["updates"] == 1 and metrics["grad_norm"] > 0
    saved = tmp_path / "run" / "final_model"
    assert json.loads((saved / "dancegrpo_model.json").read_text())["model"] == "skyreels_i2v"
    again = load_model("skyreels_i2v", str(saved), options(cache_dir))
    again.transformer = HunyuanVideoTransformer3DModel.from_pretrained(str(saved), subfolder="transformer")
    x, t = torch.randn(2, *again.latent_shape()), torch.tensor([0.6, 0.2])
    cond = again.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(again.predict(x, t, cond), trainer.adapter.predict(x, t, cond), rtol=0, atol=0)


def test_cache_for_another_resolution_is_refused(skyreels):
    ckpt, cache_dir, _ = skyreels
    with pytest.raises(ValueError, match=r"holds image latents for 32 x 48, but model.options asks for 64 x 48"):
        load_model("skyreels_i2v", str(ckpt), options(cache_dir, height=64))
