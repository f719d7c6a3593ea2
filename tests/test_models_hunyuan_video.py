"""HunyuanVideo text-to-video and text-to-image adapter on a tiny random checkpoint (diffusers layout).

The common checks come from tests/adapter_tester.py; `HunyuanFamily` holds the hooks and the
check HunyuanVideo shares with SkyReels-I2V (same text encoders, same VAE), this file's class
adds the text-to-image mode.
"""
from __future__ import annotations

import numpy as np
from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

from adapter_tester import AdapterTesterMixin
from dancegrpo.models.prompt_cache import PromptCache
from tiny_models import PROMPTS, build_hunyuan_video

SEQ = 48  # Llama tokens kept after the template crop (HunyuanVideo: 256)


class HunyuanFamily:
    """Hooks and a check of the HunyuanVideo text conditioning and 3D VAE (HunyuanVideo, SkyReels-I2V)."""

    denoiser_class = HunyuanVideoTransformer3DModel
    prompt_template = DEFAULT_PROMPT_TEMPLATE  # the pipeline module's own
    # The tiny character tokenizer splits the template differently from Llama's (95 tokens): count it.
    preprocess_options = {"max_sequence_length": SEQ, "template_crop_start": "auto"}
    sample_steps, sample_shift = 3, 7.0  # the tiny scheduler's static shift is 7.0
    sta = True

    def pipeline_prompt_embeds(self, pipe, prompts, cache):
        template = {"template": self.prompt_template["template"], "crop_start": cache.meta["template_crop_start"]}
        sequence, pooled, mask = pipe.encode_prompt(prompts, prompt_template=template, device="cpu",
                                                    max_sequence_length=SEQ)
        return {"prompt_embeds": sequence, "prompt_attention_mask": mask.long(), "pooled_embeds": pooled}

    def pipeline_decode(self, pipe, latents):
        video = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        return pipe.video_processor.postprocess_video(video, output_type="pt")

    def test_template_crop_counts_the_template_tokens_and_masks_pad(self, tiny, pipe):
        cache = PromptCache(tiny.cache, self.model)
        prefix = self.prompt_template["template"].split("{}")[0]
        assert cache.meta["template_crop_start"] == len(pipe.tokenizer(prefix).input_ids)
        mask = cache.lookup(PROMPTS)["prompt_attention_mask"]
        assert 0 < int(mask.sum(1).min()) < SEQ  # the masks really pad (so the mask check above means something)


class TestHunyuanVideo(HunyuanFamily, AdapterTesterMixin):
    model = "hunyuan_video"
    pipeline_class = HunyuanVideoPipeline
    tiny_options = {"height": 32, "width": 48, "frames": 5}
    latent_shape = (4, 2, 4, 6)     # 4 channels; 1 + (5-1)/4 latent frames; VAE factor 8
    bad_options = [({"frames": 6}, r"frames = 6 is not 4k\+1 .* use 5 or 9"),
                   ({"height": 40}, r"height = 40 not divisible by 16 \(VAE factor 8 x patch size 2\)")]

    def build_checkpoint(self, root):
        return build_hunyuan_video(root)

    def pipeline_sample(self, pipe, cond, noise, tiny):
        steps = self.sample_steps
        return pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_embeds"],
                    prompt_attention_mask=cond["prompt_attention_mask"], latents=noise, height=32, width=48,
                    num_frames=5, num_inference_steps=steps, sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1],
                    guidance_scale=6.018, output_type="latent").frames

    def test_text_to_image_iteration_then_diffusers_reload(self, tiny, tmp_path):
        """frames: 1 is text-to-image: rewards see images (B, C, H, W); the checks of a video run hold."""
        run = self.train_once(tmp_path / "run", tiny, frames=1)
        self.assert_one_exact_iteration(run)
        assert run.reward_input_shape == (2, 3, 32, 48)  # 1 prompt x group of 2
        assert run.x.shape[2] == 1  # one latent frame
        self.assert_reloads_bit_identical(run, tiny)
