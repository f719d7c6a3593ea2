"""SkyReels-V1 image-to-video: the HunyuanVideo transformer with the reference image's latent
concatenated to the video latent along channels, and real classifier-free guidance (5.0).

The image latent (VAE mean of the reference image x the VAE scaling factor, one latent
frame) is padded with zero frames to the video's length and concatenated as extra input
channels, as diffusers' HunyuanSkyreelsImageToVideoPipeline and the authors' script do.
CFG runs in sampling and training, conditional and unconditional (empty prompt, same image)
batched into one transformer call. Embedded guidance is 1.0 (the authors pass 1000).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..messages import short_repr
from . import hunyuan_video
from .base import Conditioning
from .checkpoint_layout import Component
from .hunyuan_video import HunyuanPromptEncoder, HunyuanVideoGenerator, HunyuanVideoOptions
from .options import at_least
from .prompt_cache import PromptCache
from .spec import ModelSpec, option_defaults
from .transformer_costs import joint_attention_layers

TEXT_KEYS = ("prompt_embeds", "prompt_attention_mask", "pooled_embeds")


@dataclass
class SkyReelsOptions(HunyuanVideoOptions):
    height: int = 400                  # the authors' SkyReels-I2V script (--h 400 --w 640 --t 53)
    width: int = 640
    frames: int = 53
    cfg_scale: float = 5.0             # the authors' script (--cfg_infer 5.0)
    guidance_scale: float = 1.0        # embedded guidance: the authors pass 1000.0 = 1.0 x 1000

    checks = {"cfg_scale": at_least(1, "1 = no guidance")}


class SkyReelsI2VGenerator(HunyuanVideoGenerator):
    """Adapter for SkyReels-V1-Hunyuan-I2V checkpoints in the diffusers layout."""

    model_name = "skyreels_i2v"
    options_class = SkyReelsOptions
    cache_models = ("skyreels_i2v",)
    needs_empty_prompt = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.transformer.config
        if config.in_channels != 2 * self.latent_channels:
            raise ValueError(f"skyreels_i2v: transformer in_channels = {config.in_channels}, expected "
                             f"2 x {self.latent_channels} latent channels (video latent + image latent)")

    @classmethod
    def check_cache(cls, cache: PromptCache, options) -> None:
        size = (cache.meta.get("height"), cache.meta.get("width"))
        if size != (options.height, options.width):
            raise ValueError(f"prompt cache {str(cache.directory)!r} holds image latents for {size[0]} x {size[1]}, "
                             f"but model.options asks for {options.height} x {options.width}; rerun "
                             f"`dancegrpo preprocess --option height={options.height} --option width={options.width}`")

    def negative_keys(self) -> tuple[str, ...]:
        return TEXT_KEYS

    # Adapted from diffusers src/diffusers/pipelines/hunyuan_video/pipeline_hunyuan_skyreels_image2video.py::HunyuanSkyreelsImageToVideoPipeline.prepare_latents (Apache-2.0)  # noqa: E501
    def image_condition(self, cond: Conditioning, frames: int, dtype: torch.dtype) -> torch.Tensor:
        """The image latent as frame 0 of a zero video: (B, C, frames, h, w)."""
        image = cond["image_latents"].to(dtype)
        padding = image.new_zeros(image.shape[0], image.shape[1], frames - image.shape[2], *image.shape[3:])
        return torch.cat([image, padding], dim=2)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Guided velocity: uncond + s * (cond - uncond), both from one batched transformer call."""
        b, dtype = latents.shape[0], latents.dtype
        model_input = torch.cat([latents, self.image_condition(cond, latents.shape[2], dtype)], dim=1)
        if self.options.cfg_scale == 1.0:
            return self.transformer(hidden_states=model_input, return_dict=False,
                                    **self.transformer_inputs(t, cond, b, dtype))[0]
        both = {key: torch.cat([cond[key], cond[f"negative_{key}"]]) for key in TEXT_KEYS}
        out = self.transformer(hidden_states=torch.cat([model_input, model_input]), return_dict=False,
                               **self.transformer_inputs(torch.cat([t.expand(b), t.expand(b)]), both, 2 * b, dtype))[0]
        conditional, uncond = out.chunk(2)
        return uncond + self.options.cfg_scale * (conditional - uncond)


class SkyReelsPromptEncoder(HunyuanPromptEncoder):
    """HunyuanVideo's text conditioning plus the VAE latent of each prompt's reference image.

    JSONL entries carry the image path ("image"); the image is resized to height x width by
    diffusers' VideoProcessor (as the pipeline does) and encoded to the VAE posterior mean.
    The empty prompt (CFG's unconditional text) has no image: its image latent is zeros and
    is never used (the unconditional branch reuses the sample's own image).
    """

    model_name = "skyreels_i2v"

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, height: int = 400, width: int = 640,
                 max_sequence_length: int = 256, template_crop_start: int | str = 95):
        from diffusers import AutoencoderKLHunyuanVideo
        from diffusers.video_processor import VideoProcessor
        super().__init__(root, device, dtype, max_sequence_length, template_crop_start)
        self.vae = AutoencoderKLHunyuanVideo.from_pretrained(str(root), subfolder="vae").to(device).eval()
        factor = self.vae.config.spatial_compression_ratio
        if height % factor or width % factor:
            raise ValueError(f"skyreels_i2v preprocess: height x width = {height} x {width} must be divisible by {factor}")
        self.height, self.width = height, width
        self.processor = VideoProcessor(vae_scale_factor=factor)

    @staticmethod
    def components() -> list[Component]:
        return HunyuanPromptEncoder.components() + [Component("vae", "model")]

    def meta(self) -> dict:
        return {**super().meta(), "height": self.height, "width": self.width}

    @torch.no_grad()
    def encode(self, prompts: list[str], extras: list[dict] | None = None) -> dict[str, torch.Tensor]:
        from ..io_errors import load_image
        out = super().encode(prompts, extras)
        factor = self.vae.config.spatial_compression_ratio
        shape = (self.vae.config.latent_channels, 1, self.height // factor, self.width // factor)
        latents = []
        for prompt, entry in zip(prompts, extras or [{}] * len(prompts)):
            if "image" not in entry:
                if prompt:
                    raise ValueError(f"skyreels_i2v preprocess: prompt {short_repr(prompt)} has no \"image\"; use a JSONL "
                                     "file with {\"prompt\": ..., \"image\": path} lines")
                latents.append(torch.zeros(shape))
                continue
            image = load_image(entry["image"], f"skyreels_i2v preprocess: image of prompt {short_repr(prompt)}")
            pixels = self.processor.preprocess(image, height=self.height, width=self.width)
            posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype).unsqueeze(2)).latent_dist
            latents.append((posterior.mode() * self.vae.config.scaling_factor)[0].float().cpu())
        out["image_latents"] = torch.stack(latents).to(self.dtype)
        return out


# ---------------------------------------------------------------------------------------------
# The spec: HunyuanVideo's, with 32 input channels, CFG and the image latent in the cache

# huggingface.co/Skywork/SkyReels-V1-Hunyuan-I2V (diffusers transformer/config.json): the HunyuanVideo
# transformer with 32 input channels (16 video latent + 16 image latent); VAE as HunyuanVideo's.
SKYREELS_I2V_TRANSFORMER = {**hunyuan_video.HUNYUAN_VIDEO_TRANSFORMER, "in_channels": 32}


def cond_bytes(options: dict) -> int:
    """HunyuanVideo's text conditioning twice (the prompt's and the empty prompt's, for CFG) plus the
    bf16 image latent (16 x H/8 x W/8)."""
    return 2 * hunyuan_video.cond_bytes(options) + 16 * (options["height"] // 8) * (options["width"] // 8) * 2


SPEC = ModelSpec(
    name="skyreels_i2v",
    load=SkyReelsI2VGenerator.from_pretrained,
    prompt_encoder=SkyReelsPromptEncoder,
    cfg=SkyReelsI2VGenerator.needs_empty_prompt,
    default_options=option_defaults(SkyReelsOptions),
    sequence_parallel=True,
    attention_masked=SkyReelsI2VGenerator.attention_masked,
    sliding_tile_attention=True,
    denoiser_class="HunyuanVideoTransformer3DModel",
    denoiser_config=SKYREELS_I2V_TRANSFORMER,
    vae_class="AutoencoderKLHunyuanVideo",
    vae_config=hunyuan_video.HUNYUAN_VIDEO_VAE,
    checkpointed_blocks="each double- and single-stream transformer block",
    text_tokens=hunyuan_video.TEXT_TOKENS,
    denoiser_blocks=hunyuan_video.BLOCKS,
    denoiser_inputs=hunyuan_video.denoiser_inputs,
    latent_numel=hunyuan_video.latent_numel,
    cond_bytes=cond_bytes,
    token_counts=hunyuan_video.token_counts,
    forward_flops=hunyuan_video.forward_flops,
    parameter_count=hunyuan_video.parameter_count,
    block_parameter_counts=hunyuan_video.block_parameter_counts,
    attention_layers=joint_attention_layers,
)
