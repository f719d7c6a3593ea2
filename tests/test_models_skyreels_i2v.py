"""SkyReels-I2V adapter on a tiny random checkpoint: image latent by channels, batched real CFG.

The common checks come from tests/adapter_tester.py, the HunyuanVideo family's hooks from
test_models_hunyuan_video.py; this file adds the image conditioning.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import HunyuanSkyreelsImageToVideoPipeline
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_skyreels_image2video import (DEFAULT_PROMPT_TEMPLATE,
                                                                                     retrieve_latents)
from PIL import Image

from adapter_tester import AdapterTesterMixin
from test_models_hunyuan_video import SEQ, HunyuanFamily
from tiny_models import PROMPTS, build_skyreels_i2v

HEIGHT, WIDTH = 32, 48


class TestSkyReelsI2V(HunyuanFamily, AdapterTesterMixin):
    model = "skyreels_i2v"
    pipeline_class = HunyuanSkyreelsImageToVideoPipeline
    prompt_template = DEFAULT_PROMPT_TEMPLATE
    tiny_options = {"height": HEIGHT, "width": WIDTH, "frames": 5}
    latent_shape = (4, 2, 4, 6)     # the video latent; the image latent joins it inside predict
    preprocess_options = {"height": HEIGHT, "width": WIDTH, "max_sequence_length": SEQ, "template_crop_start": "auto"}
    cfg_option = "cfg_scale"
    image_conditioned = True
    sample_batch = 1                # the pipeline takes one reference image
    bad_options = [({"height": 64}, r"holds image latents for 32 x 48, but model.options asks for 64 x 48"),
                   ({"frames": 6}, r"frames = 6 is not 4k\+1 .* use 5 or 9")]
    tolerances = {"sampling": dict(rtol=1e-4, atol=1e-4)}

    def build_checkpoint(self, root):
        return build_skyreels_i2v(root)

    def pipeline_image_latents(self, pipe, image):
        pixels = pipe.video_processor.preprocess(image, height=HEIGHT, width=WIDTH).unsqueeze(2)
        return retrieve_latents(pipe.vae.encode(pixels), sample_mode="argmax") * pipe.vae.config.scaling_factor

    def pipeline_sample(self, pipe, cond, noise, tiny):
        steps = self.sample_steps  # real CFG 5.0, embedded guidance 1.0: the adapter's defaults
        return pipe(image=Image.open(tiny.images / "image_0.png").convert("RGB"),
                    prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_embeds"],
                    prompt_attention_mask=cond["prompt_attention_mask"],
                    negative_prompt_embeds=cond["negative_prompt_embeds"],
                    negative_pooled_prompt_embeds=cond["negative_pooled_embeds"],
                    negative_prompt_attention_mask=cond["negative_prompt_attention_mask"],
                    latents=noise, height=HEIGHT, width=WIDTH, num_frames=5, num_inference_steps=steps,
                    sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], true_cfg_scale=5.0, guidance_scale=1.0,
                    output_type="latent").frames

    def unguided_predict(self, adapter, x, t, cond, prefix):
        image = adapter.image_condition(cond, x.shape[2], x.dtype)
        return adapter.transformer(
            hidden_states=torch.cat([x, image], dim=1), timestep=t * 1000,
            encoder_hidden_states=cond[f"{prefix}prompt_embeds"],
            encoder_attention_mask=cond[f"{prefix}prompt_attention_mask"].float(),
            pooled_projections=cond[f"{prefix}pooled_embeds"], guidance=torch.full((len(x),), 1000.0)).sample

    def test_image_condition_is_the_first_frame_of_a_zero_video(self, base_adapter):
        cond = base_adapter.encode_prompts(PROMPTS[2:])
        image = base_adapter.image_condition(cond, 2, torch.float32)
        assert image.shape == (2, 4, 2, 4, 6)
        assert torch.equal(image[:, :, :1], cond["image_latents"])
        assert torch.equal(image[:, :, 1:], torch.zeros_like(image[:, :, 1:]))  # frame 0 only
