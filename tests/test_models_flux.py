"""FLUX.1-dev adapter on a tiny random checkpoint in the real diffusers layout.

The common checks come from tests/adapter_tester.py; this file gives FLUX's facts and hooks.
"""
from __future__ import annotations

import numpy as np
from diffusers import FluxPipeline, FluxTransformer2DModel

from adapter_tester import AdapterTesterMixin, Tiny
from dancegrpo.models.toy_flux import pack_latents

SEQ = 24  # T5 sequence length of the tiny cache, conftest.FLUX_SEQ (FLUX.1-dev: 512)


class TestFlux(AdapterTesterMixin):
    model = "flux"
    pipeline_class = FluxPipeline
    denoiser_class = FluxTransformer2DModel
    tiny_options = {"height": 16, "width": 24}
    latent_shape = (4, 8, 12)       # 4 latent channels, VAE factor 2; packed 2x2 only inside predict
    sample_steps, sample_shift = 4, 3.0  # the tiny scheduler's static shift is 3.0
    bad_options = [({"width": 18}, r"width = 18 not divisible by 4 \(VAE factor 2 x 2x2 latent packing\)")]

    def make_tiny(self, request, tmp_path_factory):
        checkpoint, cache = request.getfixturevalue("tiny_flux")  # conftest: shared with other test files
        return Tiny(checkpoint, cache)

    def pipeline_prompt_embeds(self, pipe, prompts, cache):
        sequence, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device="cpu", max_sequence_length=SEQ)
        return {"prompt_embeds": sequence, "pooled_embeds": pooled}

    def pipeline_sample(self, pipe, cond, noise, tiny):
        steps = self.sample_steps  # guidance 3.5: the adapter's default (FLUX.1-dev's embedded guidance)
        return pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_embeds"],
                    latents=pack_latents(noise), height=16, width=24, num_inference_steps=steps,
                    sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], guidance_scale=3.5, output_type="latent").images

    def to_pipeline_layout(self, latents):
        return pack_latents(latents)

    def pipeline_decode(self, pipe, latents):
        unpacked = pipe._unpack_latents(latents, 16, 24, pipe.vae_scale_factor)
        scaled = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return pipe.image_processor.postprocess(pipe.vae.decode(scaled).sample, output_type="pt")
