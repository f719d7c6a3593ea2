"""Stable Diffusion v1.4 adapter on a tiny random checkpoint in the real diffusers layout.

The common checks come from tests/adapter_tester.py; this file gives SD's facts and hooks.
"""
from __future__ import annotations

from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from adapter_tester import AdapterTesterMixin
from tiny_models import build_sd14


class TestSD14(AdapterTesterMixin):
    model = "sd14"
    pipeline_class = StableDiffusionPipeline
    pipeline_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    denoiser_class = UNet2DConditionModel
    prediction = "ddim"
    tiny_options = {"height": 16, "width": 16}
    latent_shape = (4, 8, 8)        # 4 latent channels, VAE factor 2 (two levels)
    cfg_option = "cfg_scale"
    sample_steps = 4
    lora_options = {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    bad_options = [({"height": 15}, "height = 15 not divisible by 2")]
    tolerances = {"decode": dict(rtol=0, atol=1e-6)}  # the same VAE call on the same latents

    def build_checkpoint(self, root):
        return build_sd14(root)

    def pipeline_prompt_embeds(self, pipe, prompts, cache):
        embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        return {"prompt_embeds": embeds}

    def pipeline_sample(self, pipe, cond, noise, tiny):
        ddim = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # as SD v1.4 ships
        pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": ddim}, requires_safety_checker=False)
        # guidance 5.0: the adapter's default cfg_scale (the authors' SD config)
        return pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
                    latents=noise, num_inference_steps=self.sample_steps, guidance_scale=5.0, eta=0.0,
                    height=16, width=16, output_type="latent").images

    def pipeline_decode(self, pipe, latents):
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(pixels, output_type="pt", do_denormalize=[True] * len(latents))

    def unguided_predict(self, adapter, x, t, cond, prefix):
        return adapter.unet(x, t, encoder_hidden_states=cond[f"{prefix}prompt_embeds"]).sample
