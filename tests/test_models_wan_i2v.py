"""Wan image-to-video adapter on tiny random checkpoints: Wan 2.1 I2V (frame mask + condition latent
channels, CLIP image tokens) and Wan 2.2 I2V (no image encoder, two experts).

The common checks come from tests/adapter_tester.py, the Wan hooks and two-expert checks from
test_models_wan.py; this file adds the image conditioning.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from adapter_tester import AdapterTesterMixin, _assert_close
from dancegrpo.cli import main
from dancegrpo.models import load_model
from dancegrpo.models.prompt_cache import PromptCache
from dancegrpo.models.wan_i2v import WanI2VPromptEncoder
from test_models_wan import BOUNDARY, TwoExperts, WanFamily, euler_sigmas
from tiny_models import PROMPTS, build_wan_i2v, build_wan_t2v

HEIGHT, WIDTH, FRAMES = 32, 32, 5


class WanI2VChecks(WanFamily, AdapterTesterMixin):
    """The shared checks and the image conditioning checks of both I2V layouts."""

    model = "wan_i2v"
    pipeline_class = WanImageToVideoPipeline
    tiny_options = {"height": HEIGHT, "width": WIDTH, "frames": FRAMES}
    latent_shape = (4, 2, 4, 4)     # the video latent; mask and condition latent join it inside predict
    # 2.1 I2V: the CLIP-token cross-attention reads the last 512 tokens as text (WanAttnProcessor)
    preprocess_options = {"height": HEIGHT, "width": WIDTH, "frames": FRAMES, "max_sequence_length": 512}
    image_conditioned = True
    recipe = "wan_i2v"
    sample_batch = 1                # the pipeline takes one reference image
    bad_options = [({"height": 64}, r"holds image conditioning for 32 x 32 x 5 frames, but model.options asks for "
                                    r"64 x 32 x 5"),
                   ({"frames": 9}, r"but model.options asks for 32 x 32 x 9; rerun .* --option frames=9"),
                   ({"frames": 6}, r"frames = 6 is not 4k\+1 .* use 5 or 9")]

    def build_checkpoint(self, root):
        return build_wan_i2v(root)

    def pipeline_prompt_embeds(self, pipe, prompts, cache):
        """WanImageToVideoPipeline.encode_prompt; its module's basic_clean calls ftfy even when ftfy is not
        installed (diffusers 0.42.1; pipeline_wan.py's checks), so the text-to-video module's cleaning,
        the same function with that check, stands in for it here."""
        from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v
        with mock.patch.object(pipeline_wan_i2v, "basic_clean", pipeline_wan.basic_clean):
            return super().pipeline_prompt_embeds(pipe, prompts, cache)

    def expert_inputs(self, adapter, x, cond, prefix):
        channels, extra = adapter.denoiser_extras(cond, x.dtype)   # the same image for both branches
        return torch.cat([x, channels], dim=1), extra

    def pipeline_image_latents(self, pipe, image):
        pixels = pipe.video_processor.preprocess(image, height=HEIGHT, width=WIDTH).to(torch.float32)
        noise = torch.zeros(1, *self.latent_shape)
        _, condition = pipe.prepare_latents(pixels, 1, 4, HEIGHT, WIDTH, FRAMES, torch.float32, "cpu", None, noise)
        return condition[:, pipe.vae_scale_factor_temporal:]   # after the frame mask channels

    def pipeline_sample(self, pipe, cond, noise, tiny):
        with euler_sigmas(pipe):   # CFG 5.0: the adapter's and the pipeline's default; the pipeline runs CLIP
            return pipe(image=Image.open(tiny.images / "image_0.png").convert("RGB"),
                        prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
                        latents=noise, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                        num_inference_steps=self.sample_steps, guidance_scale=5.0, output_type="latent").frames

    def test_condition_is_the_pipelines_mask_and_latent(self, tiny, pipe, base_adapter):
        """[frame mask, condition latent] equals what WanImageToVideoPipeline.prepare_latents concatenates."""
        image = Image.open(tiny.images / "image_2.png").convert("RGB")
        pixels = pipe.video_processor.preprocess(image, height=HEIGHT, width=WIDTH).to(torch.float32)
        with torch.no_grad():
            _, expected = pipe.prepare_latents(pixels, 1, 4, HEIGHT, WIDTH, FRAMES, torch.float32, "cpu", None,
                                               torch.zeros(1, *self.latent_shape))
            channels, _ = base_adapter.denoiser_extras(base_adapter.encode_prompts([PROMPTS[2]]), torch.float32)
        assert channels.shape == (1, 8, 2, 4, 4)
        _assert_close(channels, expected, self.tolerance("image_latents"), "mask and condition latent")
        assert torch.equal(channels[:, :4, 0], torch.ones_like(channels[:, :4, 0]))   # frame 0 is given
        assert not channels[:, :4, 1:].any()

    def test_text_to_video_checkpoint_is_refused(self, tiny, tmp_path):
        t2v = build_wan_t2v(tmp_path / "t2v")
        with pytest.raises(ValueError, match=r"in_channels = 4, expected 12 \(video latent 4 \+ frame mask 4 \+ "
                                             r"condition latent 4\); is it a text-to-video checkpoint"):
            load_model(self.model, str(t2v), self.options(tiny))


class TestWanI2V(WanI2VChecks):
    """Wan 2.1 I2V: CLIP image tokens in the cache and in every transformer call."""

    def test_cache_holds_the_pipelines_clip_tokens(self, tiny, pipe):
        cache = PromptCache(tiny.cache, self.model)
        image = Image.open(tiny.images / "image_3.png").convert("RGB")
        with torch.no_grad():
            expected = pipe.encode_image(image, "cpu")
        _assert_close(cache.lookup([PROMPTS[3]])["image_embeds"], expected, self.tolerance("image_latents"),
                      "image_embeds")

    def test_clip_checkpoint_needs_512_text_tokens_and_its_image_encoder(self, tiny, tmp_path):
        with pytest.raises(ValueError, match=r"max_sequence_length = 24, but this transformer takes CLIP image "
                                             r"tokens .* use 512"):
            WanI2VPromptEncoder(tiny.checkpoint, torch.device("cpu"), torch.float32, HEIGHT, WIDTH, FRAMES, 24)
        broken = tmp_path / "no_clip"
        broken.mkdir()
        for entry in tiny.checkpoint.iterdir():
            if entry.name != "image_encoder":
                (broken / entry.name).symlink_to(entry)
        assert main(["preprocess", "--model", self.model, "--path", str(broken), "--prompts",
                     str(tiny.images / "prompts.jsonl"), "--out", str(tmp_path / "cache"), "--no-progress"]) == 2
        with pytest.raises(FileNotFoundError, match=r"image_dim = 16: Wan 2.1 I2V\) lacks image_encoder/"):
            WanI2VPromptEncoder(broken, torch.device("cpu"), torch.float32, HEIGHT, WIDTH, FRAMES)


class TestWan22I2V(TwoExperts, WanI2VChecks):
    """Wan 2.2 I2V (A14B layout): no CLIP tokens, two experts."""

    preprocess_options = {"height": HEIGHT, "width": WIDTH, "frames": FRAMES, "max_sequence_length": 24}

    def build_checkpoint(self, root):
        return build_wan_i2v(root, two_experts=True, boundary_ratio=BOUNDARY)

    def test_cache_has_no_clip_tokens(self, tiny):
        assert "image_embeds" not in PromptCache(tiny.cache, self.model).tensors
