"""HunyuanVideo text-to-video and text-to-image adapter on a tiny random checkpoint (diffusers layout)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from peft import PeftModel

from dancegrpo.cli import main
from dancegrpo.models import load_model
from dancegrpo.models.prompt_cache import PromptCache
from dancegrpo.rollout import ode_sample
from dancegrpo.sampler import build_sampler
from dancegrpo.trainer import Trainer
from tiny_models import PROMPTS, brightness, build_hunyuan_video, trainer_config, write_prompts

SEQ = 48  # Llama tokens kept after the template crop (HunyuanVideo: 256)


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan")
    ckpt = build_hunyuan_video(root / "ckpt")
    prompts = write_prompts(root / "prompts.txt", PROMPTS)
    # The tiny character tokenizer splits the template differently from Llama's (95 tokens): count it.
    assert main(["preprocess", "--model", "hunyuan_video", "--path", str(ckpt), "--prompts", str(prompts),
                 "--out", str(root / "cache"), "--dtype", "float32", "--option", f"max_sequence_length={SEQ}",
                 "--option", "template_crop_start=auto", "--no-progress"]) == 0
    return ckpt, root / "cache"


def options(cache, **extra):
    return {"prompt_cache": str(cache), "height": 32, "width": 48, "frames": 5, **extra}


def test_cache_equals_pipeline_encode_prompt(hunyuan):
    ckpt, cache_dir = hunyuan
    cache = PromptCache(cache_dir, "hunyuan_video")
    crop = cache.meta["template_crop_start"]
    pipe = HunyuanVideoPipeline.from_pretrained(str(ckpt))
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert crop == len(pipe.tokenizer(prefix).input_ids)
    template = {"template": DEFAULT_PROMPT_TEMPLATE["template"], "crop_start": crop}
    sequence, pooled, mask = pipe.encode_prompt(PROMPTS, prompt_template=template, device="cpu",
                                                max_sequence_length=SEQ)
    cached = cache.lookup(PROMPTS)
    assert 0 < int(mask.sum(1).min()) < SEQ  # the masks really pad
    torch.testing.assert_close(cached["prompt_embeds"], sequence, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached["prompt_attention_mask"], mask.long(), rtol=0, atol=0)
    torch.testing.assert_close(cached["pooled_embeds"], pooled, rtol=0, atol=1e-6)


def test_ode_sampling_and_decode_equal_diffusers_pipeline(hunyuan):
    ckpt, cache_dir = hunyuan
    adapter = load_model("hunyuan_video", str(ckpt), options(cache_dir))
    assert adapter.latent_shape() == (4, 2, 4, 6)
    cond = adapter.encode_prompts(PROMPTS[:2])
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    ours = ode_sample(adapter, build_sampler("flow", 3, 0.0, 7.0), cond, noise, chunk_size=2)
    pipe = HunyuanVideoPipeline.from_pretrained(str(ckpt))  # its scheduler applies the same shift (7.0)
    reference = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_embeds"],
                     prompt_attention_mask=cond["prompt_attention_mask"], latents=noise.clone(), height=32, width=48,
                     num_frames=5, num_inference_steps=3, sigmas=np.linspace(1.0, 0.0, 4)[:-1],
                     guidance_scale=6.018, output_type="latent").frames
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)

    video = adapter.decode(ours)
    expected = pipe.video_processor.postprocess_video(
        pipe.vae.decode(ours / pipe.vae.config.scaling_factor).sample, output_type="pt")
    assert video.shape == (2, 5, 3, 32, 48)
    torch.testing.assert_close(video, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("frames", [5, 1])
def test_trainer_iteration_video_and_image_then_diffusers_reload(hunyuan, tmp_path, frames):
    ckpt, cache_dir = hunyuan
    seen = {}

    def reward(images, prompts):
        seen["shape"] = tuple(images.shape)
        return brightness(images, prompts)

    cfg = trainer_config(tmp_path / "run", "hunyuan_video", ckpt, options(cache_dir, frames=frames))
    trainer = Trainer(cfg, rewards={"brightness": reward})
    trainer.train(progress=False)
    metrics = trainer.metrics[-1]
    assert metrics["first_update_logp_max_dev"] == 0.0 and metrics["updates"] == 1 and metrics["grad_norm"] > 0
    assert seen["shape"] == ((4, 5, 3, 32, 48) if frames == 5 else (4, 3, 32, 48))  # T2I gives images

    loaded = HunyuanVideoTransformer3DModel.from_pretrained(str(tmp_path / "run" / "final_model"), subfolder="transformer")
    again = load_model("hunyuan_video", str(ckpt), options(cache_dir, frames=frames))
    again.transformer = loaded
    x, t = torch.randn(2, *again.latent_shape()), torch.tensor([0.7, 0.1])
    cond = again.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(again.predict(x, t, cond), trainer.adapter.predict(x, t, cond), rtol=0, atol=0)


def test_lora_round_trip(hunyuan, tmp_path):
    ckpt, cache_dir = hunyuan
    adapter = load_model("hunyuan_video", str(ckpt), options(cache_dir, lora={"rank": 2, "alpha": 4, "save_merged": False}))
    with torch.no_grad():
        for p in adapter.trainable.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    adapter.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "transformer").exists()  # save_merged: false writes the adapter only
    x, t = torch.randn(1, *adapter.latent_shape()), torch.tensor([0.5])
    cond = adapter.encode_prompts(PROMPTS[:1])
    base = load_model("hunyuan_video", str(ckpt), options(cache_dir))
    with torch.no_grad():
        ours = adapter.predict(x, t, cond)
        base.transformer = PeftModel.from_pretrained(base.transformer, str(tmp_path / "out" / "transformer_lora"))
        torch.testing.assert_close(base.predict(x, t, cond), ours, rtol=0, atol=1e-6)


def test_frames_and_resolution_are_checked_before_loading(hunyuan):
    ckpt, cache_dir = hunyuan
    with pytest.raises(ValueError, match=r"frames = 6 is not 4k\+1 .* use 5 or 9"):
        load_model("hunyuan_video", str(ckpt), options(cache_dir, frames=6))
    with pytest.raises(ValueError, match=r"height = 40 not divisible by 16 \(VAE factor 8 x patch size 2\)"):
        load_model("hunyuan_video", str(ckpt), options(cache_dir, height=40))


def test_sample_command_writes_an_mp4(hunyuan, tmp_path):
    import av
    import yaml
    ckpt, cache_dir = hunyuan
    cfg = trainer_config(tmp_path / "run", "hunyuan_video", ckpt, options(cache_dir))
    cfg["rewards"] = [{"name": "tiny_models:brightness"}]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "samples"
    assert main(["sample", "--config", str(path), "--prompt", PROMPTS[1], "--out", str(out), "--upscale", "1"]) == 0
    with av.open(str(next(out.glob("*.mp4")))) as video:
        frames = [frame.to_ndarray(format="rgb24") for frame in video.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 48, 3)


def test_trainer_gives_sliding_tile_attention_its_step_schedule(hunyuan, tmp_path):
    """full_attention_steps needs the sampling step, which STA reads off the trainer's schedule."""
    ckpt, cache_dir = hunyuan
    sta = {"window": [1, 1, 1], "tile": [1, 2, 2], "full_attention_steps": 1, "backend": "torch"}
    cfg = trainer_config(tmp_path / "run", "hunyuan_video", ckpt, options(cache_dir, frames=5, sta=sta))
    trainer = Trainer(cfg, rewards={"brightness": brightness})
    metrics = trainer.step()
    assert metrics["first_update_logp_max_dev"] == 0.0 and metrics["grad_norm"] > 0
    assert torch.equal(trainer.adapter.sta.schedule, trainer.sampler.sigmas[:-1].double())
