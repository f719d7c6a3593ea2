"""FLUX.1-dev: FluxTransformer2DModel on 2x2-packed VAE latents, embedded guidance, no CFG.

Latents are kept unpacked, (16, H/8, W/8), so the trainer's shared noise and stored
trajectories have an image-like shape; `predict` packs them into 2x2 tokens with
(0, row, col) position ids, exactly as diffusers' FluxPipeline does. The prompt cache holds
the T5 sequence (`prompt_embeds`) and CLIP's pooled output (`pooled_embeds`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .base import Conditioning
from .checkpoint_layout import Component
from .diffusers_generator import DiffusersGenerator, GeneratorOptions, check_resolution, vae_spatial_factor
from .flux_packing import latent_image_ids, pack_latents, unpack_latents
from .spec import ModelSpec, option_defaults

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FluxTransformer2DModel


@dataclass
class FluxOptions(GeneratorOptions):
    height: int = 720                  # the authors' FLUX script (--h 720 --w 720)
    width: int = 720
    guidance_scale: float = 3.5        # embedded guidance of FLUX.1-dev (the authors' scripts)

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.guidance_scale < 0:
            problems.append(f"guidance_scale = {self.guidance_scale} must be >= 0")
        return problems


class FluxGenerator(DiffusersGenerator):
    """Adapter for FLUX.1-dev (and any FluxTransformer2DModel checkpoint)."""

    prediction = "flow"
    model_name = "flux"
    denoiser_attr = "transformer"
    options_class = FluxOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.vae.config.latent_channels
        h, w = self.options.height // self.vae_factor, self.options.width // self.vae_factor
        self.register_buffer("img_ids", latent_image_ids(h, w), persistent=False)
        config = self.transformer.config
        if config.in_channels != 4 * self.latent_channels:
            raise ValueError(f"flux: transformer in_channels = {config.in_channels} but the VAE has "
                             f"{self.latent_channels} latent channels (expected 4x for 2x2 packing)")

    @classmethod
    def check_before_loading(cls, root: Path, options, denoiser_config: dict, vae_config: dict) -> None:
        factor = vae_spatial_factor(vae_config)
        check_resolution(cls.model_name, options.height, options.width, factor * 2,
                         f"VAE factor {factor} x 2x2 latent packing")

    @classmethod
    def load_denoiser(cls, root: Path) -> FluxTransformer2DModel:
        from diffusers import FluxTransformer2DModel
        return FluxTransformer2DModel.from_pretrained(str(root), subfolder="transformer", torch_dtype=torch.float32)

    @classmethod
    def load_vae(cls, root: Path, dtype: torch.dtype) -> AutoencoderKL:
        from diffusers import AutoencoderKL
        return AutoencoderKL.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype)

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.options.height // self.vae_factor, self.options.width // self.vae_factor)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = latents.shape
        text = cond["prompt_embeds"].to(latents.dtype)
        config = self.transformer.config
        guidance = (torch.full((b,), self.options.guidance_scale, device=latents.device, dtype=latents.dtype)
                    if config.guidance_embeds else None)
        out = self.transformer(
            hidden_states=pack_latents(latents),
            encoder_hidden_states=text,
            pooled_projections=cond["pooled_embeds"].to(latents.dtype),
            timestep=t.to(latents.dtype).expand(b),  # sigma in [0, 1]; the model scales by 1000
            img_ids=self.img_ids,
            txt_ids=torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(out, c, h, w)

    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        scaled = latents / config.scaling_factor + (config.shift_factor or 0.0)
        pixels = self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]
        return (pixels.float() / 2 + 0.5).clamp(0, 1)


class FluxPromptEncoder:
    """CLIP pooled output + T5 sequence, as diffusers' FluxPipeline.encode_prompt computes them."""

    model_name = "flux"
    default_dtype = "bfloat16"   # the T5 sequence is 512 x 4096 per prompt; the authors run it in bf16

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, max_sequence_length: int = 512):
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel
        self.device, self.dtype, self.max_sequence_length = device, dtype, max_sequence_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        self.tokenizer_2 = AutoTokenizer.from_pretrained(str(root / "tokenizer_2"))
        self.text_encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder")).to(device, dtype).eval()
        self.text_encoder_2 = T5EncoderModel.from_pretrained(str(root / "text_encoder_2")).to(device, dtype).eval()

    @staticmethod
    def components() -> list[Component]:
        return [Component("text_encoder", "model"), Component("tokenizer", "tokenizer"),
                Component("text_encoder_2", "model"), Component("tokenizer_2", "tokenizer")]

    def meta(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def encode(self, prompts: list[str], extras: list[dict] | None = None) -> dict[str, torch.Tensor]:
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        sequence = self.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]
        return {"prompt_embeds": sequence.to(self.dtype), "pooled_embeds": pooled.to(self.dtype)}


SPEC = ModelSpec(
    name="flux",
    load=FluxGenerator.from_pretrained,
    prompt_encoder=FluxPromptEncoder,
    default_options=option_defaults(FluxOptions),
)
