"""Wan image-to-video (Wan2.1-I2V-14B-480P/720P, Wan2.2-I2V-A14B): the reference image conditions
the transformer as diffusers' WanImageToVideoPipeline does it.

- Extra input channels: a frame mask (`scale_factor_temporal` = 4 channels, ones at latent frame
  0, zeros after) and the condition latent, i.e. the VAE latent (posterior mode, normalised by
  `latents_mean` / `latents_std`) of a video whose first frame is the image, resized to
  height x width, and whose other frames - 1 frames are zeros. Input: [video latent, mask,
  condition latent] along channels (16 + 4 + 16 = 36 for the released models).
- Wan 2.1 only (transformer `image_dim` set): CLIP image tokens (the vision tower's
  penultimate hidden state of the original image through its CLIPImageProcessor), passed as
  `encoder_hidden_states_image`. Its cross-attention takes the last 512 tokens as text, so the
  prompt cache must hold 512-token sequences.
- Wan 2.2 A14B: no image encoder, two experts (boundary_ratio 0.9), as WanGenerator.

`dancegrpo preprocess` encodes the condition latent (for the cache's height, width and frames)
and the CLIP tokens once; the unconditional (empty-prompt) branch of CFG uses the sample's own
image conditioning, as the pipeline. Refused: Wan 2.2 TI2V-5B (`expand_timesteps`). The
pipeline's optional `last_image` (first-last-frame-to-video) is not taken: the image is the first frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..messages import short_repr
from . import wan, wan_costs
from .base import Conditioning
from .checkpoint_layout import CheckpointLayoutError, Component, read_json
from .prompt_cache import PromptCache
from .spec import ModelSpec, option_defaults
from .wan import WanGenerator, WanOptions, WanPromptEncoder

#: The text tokens WanAttnProcessor assumes when the transformer also takes CLIP image tokens.
I2V_TEXT_TOKENS = 512


@dataclass
class WanI2VOptions(WanOptions):
    height: int = 480                  # WanImageToVideoPipeline.__call__ defaults (480 x 832, 81 frames)
    width: int = 832
    frames: int = 81
    cfg_scale: float = 5.0             # WanImageToVideoPipeline.__call__ default guidance_scale=5.0


class WanI2VGenerator(WanGenerator):
    """Adapter for Wan image-to-video checkpoints in the diffusers layout (Wan-AI/Wan2.*-I2V-*-Diffusers)."""

    model_name = "wan_i2v"
    options_class = WanI2VOptions
    cache_models = ("wan_i2v",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.transformer.config
        self.uses_clip = config.image_dim is not None
        if self.uses_clip and "image_embeds" not in self.cache.tensors:
            raise ValueError(f"prompt cache {str(self.cache.directory)!r} has no CLIP image tokens (image_embeds), "
                             f"which this transformer takes (image_dim = {config.image_dim}); rerun "
                             "`dancegrpo preprocess --model wan_i2v` on this checkpoint")

    @classmethod
    def check_before_loading(cls, root: Path, options, denoiser_config: dict, vae_config: dict) -> None:
        super().check_before_loading(root, options, denoiser_config, vae_config)
        z, temporal = vae_config.get("z_dim", 16), vae_config.get("scale_factor_temporal", 4)
        if denoiser_config.get("in_channels") != 2 * z + temporal:
            raise ValueError(f"wan_i2v: {root / 'transformer' / 'config.json'} has in_channels = "
                             f"{denoiser_config.get('in_channels')}, expected {2 * z + temporal} (video latent {z} + "
                             f"frame mask {temporal} + condition latent {z}); is it a text-to-video checkpoint "
                             "(wan_t2v)?")

    @classmethod
    def check_cache(cls, cache: PromptCache, options) -> None:
        found = tuple(cache.meta.get(k) for k in ("height", "width", "frames"))
        if found != (options.height, options.width, options.frames):
            raise ValueError(f"prompt cache {str(cache.directory)!r} holds image conditioning for {found[0]} x "
                             f"{found[1]} x {found[2]} frames, but model.options asks for {options.height} x "
                             f"{options.width} x {options.frames}; rerun `dancegrpo preprocess --option "
                             f"height={options.height} --option width={options.width} "
                             f"--option frames={options.frames}`")

    # Adapted from diffusers src/diffusers/pipelines/wan/pipeline_wan_i2v.py::WanImageToVideoPipeline.prepare_latents (Apache-2.0)  # noqa: E501
    def denoiser_extras(self, cond: Conditioning, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
        """[frame mask, condition latent] (B, 4 + z_dim, F, h, w) and the CLIP image tokens (Wan 2.1)."""
        latent = cond["image_latents"].to(dtype)
        b, _, frames, h, w = latent.shape
        temporal = self.vae.config.scale_factor_temporal
        mask = torch.zeros(b, temporal, frames, h, w, device=latent.device, dtype=dtype)
        mask[:, :, 0] = 1   # the given first frame (its 4 pixel frames) is known, the rest is not
        extra = {"encoder_hidden_states_image": cond["image_embeds"].to(dtype)} if self.uses_clip else {}
        return torch.cat([mask, latent], dim=1), extra


class WanI2VPromptEncoder(WanPromptEncoder):
    """Wan's text conditioning plus each prompt's image conditioning, as WanImageToVideoPipeline.

    JSONL entries carry the image path ("image"). The empty prompt (CFG's unconditional text)
    has no image: its image tensors are zeros and are never used.
    """

    model_name = "wan_i2v"

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, height: int = 480, width: int = 832,
                 frames: int = 81, max_sequence_length: int = 512):
        from diffusers import AutoencoderKLWan
        from diffusers.video_processor import VideoProcessor
        config = read_json(root / "transformer" / "config.json", self.model_name)
        self.uses_clip = config.get("image_dim") is not None
        if self.uses_clip and max_sequence_length != I2V_TEXT_TOKENS:
            raise ValueError(f"wan_i2v preprocess: max_sequence_length = {max_sequence_length}, but this transformer "
                             f"takes CLIP image tokens and its cross-attention reads the last {I2V_TEXT_TOKENS} tokens "
                             f"as text (diffusers WanAttnProcessor); use {I2V_TEXT_TOKENS}")
        missing = []
        if self.uses_clip:
            missing = [m for m in (Component("image_encoder", "model").missing(root),) if m]
            if not (root / "image_processor" / "preprocessor_config.json").is_file():
                missing.append("image_processor/preprocessor_config.json")
        if missing:
            raise CheckpointLayoutError(f"wan_i2v: checkpoint {str(root)!r} (transformer image_dim = "
                                        f"{config['image_dim']}: Wan 2.1 I2V) lacks {', '.join(missing)}")
        super().__init__(root, device, dtype, max_sequence_length)
        self.vae = AutoencoderKLWan.from_pretrained(str(root), subfolder="vae").to(device).eval()
        factor, temporal = self.vae.config.scale_factor_spatial, self.vae.config.scale_factor_temporal
        if height % factor or width % factor or (frames - 1) % temporal:
            raise ValueError(f"wan_i2v preprocess: height x width = {height} x {width} must be divisible by {factor} "
                             f"and frames = {frames} must be {temporal}k+1")
        self.height, self.width, self.frames = height, width, frames
        self.processor = VideoProcessor(vae_scale_factor=factor)
        if self.uses_clip:
            from transformers import CLIPImageProcessor, CLIPVisionModel
            self.image_processor = CLIPImageProcessor.from_pretrained(str(root / "image_processor"))
            self.image_encoder = CLIPVisionModel.from_pretrained(str(root / "image_encoder")).to(device).eval()

    @staticmethod
    def components() -> list[Component]:
        return WanPromptEncoder.components() + [Component("vae", "model"), Component("transformer", "model")]

    def meta(self) -> dict:
        return {**super().meta(), "height": self.height, "width": self.width, "frames": self.frames}

    # Adapted from diffusers src/diffusers/pipelines/wan/pipeline_wan_i2v.py::WanImageToVideoPipeline.prepare_latents (Apache-2.0)  # noqa: E501
    def condition_latent(self, image) -> torch.Tensor:
        """The normalised VAE latent (z, F, h, w) of [the image, frames - 1 zero frames]."""
        pixels = self.processor.preprocess(image, height=self.height, width=self.width).to(self.device, torch.float32)
        video = torch.cat([pixels.unsqueeze(2), pixels.new_zeros(1, 3, self.frames - 1, self.height, self.width)], 2)
        latent = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode().float()
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=self.device).view(1, config.z_dim, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(config.latents_std, device=self.device).view(1, config.z_dim, 1, 1, 1)
        return ((latent - mean) * inv_std)[0]

    # Adapted from diffusers src/diffusers/pipelines/wan/pipeline_wan_i2v.py::WanImageToVideoPipeline.encode_image (Apache-2.0)  # noqa: E501
    def clip_tokens(self, image) -> torch.Tensor:
        """The CLIP vision tower's penultimate hidden state of the original image (tokens, width)."""
        inputs = self.image_processor(images=image, return_tensors="pt").to(self.device)
        return self.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2][0]

    @torch.no_grad()
    def encode(self, prompts: list[str], extras: list[dict] | None = None) -> dict[str, torch.Tensor]:
        from ..io_errors import load_image
        out = super().encode(prompts, extras)
        latents, tokens = [], []
        for prompt, entry in zip(prompts, extras or [{}] * len(prompts)):
            if "image" not in entry:
                if prompt:
                    raise ValueError(f"wan_i2v preprocess: prompt {short_repr(prompt)} has no \"image\"; use a JSONL "
                                     "file with {\"prompt\": ..., \"image\": path} lines")
                latents.append(None)
                tokens.append(None)
                continue
            image = load_image(entry["image"], f"wan_i2v preprocess: image of prompt {short_repr(prompt)}")
            latents.append(self.condition_latent(image))
            tokens.append(self.clip_tokens(image) if self.uses_clip else None)
        out["image_latents"] = _stack_or_zeros(latents, self.dtype)
        if self.uses_clip:
            out["image_embeds"] = _stack_or_zeros(tokens, self.dtype)
        return out


def _stack_or_zeros(rows: list, dtype: torch.dtype) -> torch.Tensor:
    """Stack the tensors of `rows`, with zeros of their shape for the None rows (the empty prompt)."""
    shape = next((r.shape for r in rows if r is not None), None)
    if shape is None:
        raise ValueError("wan_i2v preprocess: a batch with no image at all (only the empty prompt); "
                         "the prompt file must name an image for every prompt")
    return torch.stack([torch.zeros(shape) if r is None else r.float().cpu() for r in rows]).to(dtype)


# ---------------------------------------------------------------------------------------------
# The spec: the Wan 2.1 I2V 14B transformer (36 input channels, CLIP image tokens), Wan 2.1 VAE

# huggingface.co/Wan-AI/Wan2.1-I2V-14B-480P-Diffusers/blob/main/transformer/config.json
WAN_I2V_14B_TRANSFORMER = {**wan.WAN_14B_TRANSFORMER, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}


def cond_bytes(options: dict) -> int:
    """Wan's text conditioning (prompt and empty prompt) + the bf16 condition latent (16 x F x H/8 x W/8)
    + the bf16 CLIP image tokens (257 x 1280)."""
    latent = 16 * wan.latent_frames(options) * (options["height"] // 8) * (options["width"] // 8)
    return wan.cond_bytes(options) + 2 * latent + 2 * 257 * 1280


SPEC = ModelSpec(
    name="wan_i2v",
    load=WanI2VGenerator.from_pretrained,
    prompt_encoder=WanI2VPromptEncoder,
    cfg=True,
    default_options=option_defaults(WanI2VOptions),
    sequence_parallel=True,
    denoiser_class="WanTransformer3DModel",
    denoiser_config=WAN_I2V_14B_TRANSFORMER,
    vae_class="AutoencoderKLWan",
    vae_config=wan.WAN_VAE,
    checkpointed_blocks="each WanTransformerBlock",
    text_tokens=I2V_TEXT_TOKENS,
    denoiser_blocks=wan.SPEC.denoiser_blocks,
    denoiser_inputs=wan.denoiser_inputs,
    latent_numel=wan.latent_numel,
    cond_bytes=cond_bytes,
    token_counts=wan_costs.token_counts,
    forward_flops=wan_costs.forward_flops,
    parameter_count=wan_costs.parameter_count,
    block_parameter_counts=wan_costs.block_parameter_counts,
    bench_recipe="configs/wan_i2v.yaml",
    tiny_config=wan_costs.TINY_I2V,
    tiny_options=wan_costs.TINY_I2V_OPTIONS,
    tiny_batch=2,
)
