"""The embedded tiny text-to-image rectified flow: a FLUX transformer at toy size.

It goes through the same code path as FLUX.1-dev: diffusers' FluxTransformer2DModel,
2x2-packed latent tokens with (0, row, col) position ids, text tokens with zero ids,
pooled text projections, embedded guidance, and a sigma-valued timestep.

Differences from FLUX, chosen so it trains and samples in seconds on a CPU:
- the latent space is either that of a tiny diffusers AutoencoderKL (as FLUX has a VAE,
  with its scaling and shift factors; `vae/` in the checkpoint, the committed model's
  choice: 4 x 8 x 8 = 256 latent elements for a 32 x 32 image) or, without a VAE, the
  pixels themselves: the RGB image in [-1, 1] rearranged space-to-depth into
  12 x image_size/2 x image_size/2, with an optional bicubic upsampling to `output_size`.
  A small latent matters for RL: the policy gradient's noise grows with the number of
  latent elements, and a decoder keeps what the policy explores on the image manifold;
- the text encoder is a word-level embedding plus one transformer layer (the real
  model's CLIP and T5 are replaced, not emulated).

On disk it is a diffusers-style directory: `transformer/` (FluxTransformer2DModel's own
save_pretrained format), `text_encoder/` (config.json + model.safetensors) and, in latent
mode, `vae/` (AutoencoderKL's save_pretrained format).
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..attention.backends import install_attention_backend
from ..messages import short_repr, some_of
from .base import Conditioning
from .flux_packing import latent_image_ids, pack_latents, unpack_latents
from .spec import BlockLists, ModelSpec

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

EMBEDDED_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "toy_flux"

TOY_VOCAB = (
    "<pad> a an the and of on at left right top bottom above below "
    "two three red green blue yellow circle circles square squares triangle triangles"
).split()

# Architecture of the committed checkpoint; `build_toy_flux` takes overrides for tests.
DEFAULT_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=48,  # 12 space-to-depth channels x 2x2 FLUX packing
    out_channels=48,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)
DEFAULT_TEXT_CONFIG = dict(vocab=list(TOY_VOCAB), dim=64, max_length=12, num_heads=4, ff_dim=128)


class ToyTextEncoder(nn.Module):
    """Word embeddings + learned positions + one transformer layer; pooled by masked mean."""

    def __init__(self, vocab: list[str], dim: int, max_length: int, num_heads: int, ff_dim: int):
        super().__init__()
        self.config = dict(vocab=list(vocab), dim=dim, max_length=max_length, num_heads=num_heads, ff_dim=ff_dim)
        self.word_to_id = {word: i for i, word in enumerate(vocab)}
        self.max_length = max_length
        self.embed = nn.Embedding(len(vocab), dim)
        self.position = nn.Parameter(torch.zeros(max_length, dim))
        self.layer = nn.TransformerEncoderLayer(dim, num_heads, ff_dim, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.lower().replace(",", " ").split()
            unknown = list(dict.fromkeys(w for w in words if w not in self.word_to_id))
            if unknown:
                vocab = self.config["vocab"][1:]
                raise ValueError(
                    f"the embedded toy model does not know {len(unknown)} word(s) of the prompt "
                    f"{short_repr(prompt)}: {some_of(unknown)}; its vocabulary is the toy scene grammar's "
                    f"{len(vocab)} words: {some_of(vocab, 40, quote=False)}"
                )
            if len(words) > self.max_length:
                raise ValueError(f"the prompt {short_repr(prompt)} has {len(words)} words; the toy model "
                                 f"takes at most {self.max_length}")
            ids[row, : len(words)] = torch.tensor([self.word_to_id[w] for w in words])
        return ids, ids != 0

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embed(ids) + self.position[: ids.shape[1]]
        hidden = self.norm(self.layer(hidden, src_key_padding_mask=~mask))
        hidden = hidden * mask.unsqueeze(-1)
        pooled = hidden.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return hidden, pooled

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ToyTextEncoder":
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"toy text encoder: missing {directory / name}")
        from ..io_errors import load_json, load_tensor_file
        encoder = cls(**load_json(directory / "config.json", "toy text encoder config"))
        encoder.load_state_dict(load_tensor_file(directory / "model.safetensors", "toy text encoder weights"))
        return encoder


def pixels_to_latents(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 12, H/2, W/2) in [-1, 1]."""
    return F.pixel_unshuffle(images * 2 - 1, 2)


def latents_to_pixels(latents: torch.Tensor) -> torch.Tensor:
    """(B, 12, h, w) -> (B, 3, 2h, 2w) in [0, 1]."""
    return (F.pixel_shuffle(latents.float(), 2) + 1).div(2).clamp(0, 1)


class ToyFluxGenerator(nn.Module):
    """Adapter for the embedded toy model (implements models.base.GeneratorAdapter)."""

    prediction = "flow"

    def __init__(self, transformer: FluxTransformer2DModel, text_encoder: ToyTextEncoder,
                 image_size: int = 32, guidance_scale: float = 1.0, output_size: int | None = None,
                 vae: AutoencoderKL | None = None, attention_backend: str = "auto"):
        super().__init__()
        self.transformer = transformer
        # the transformer's attention through the chosen kernel (dancegrpo/attention/backends.py)
        self.attention_backend = install_attention_backend(transformer, attention_backend, "toy_flux")
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        # Pixel mode: 2x2 space-to-depth; latent mode: the VAE's downsampling. Then FLUX's 2x2 packing.
        factor = vae_downsampling(vae) if vae is not None else 2
        if image_size % (2 * factor):
            raise ValueError(f"toy_flux image_size must be a multiple of {2 * factor} (a {factor}x "
                             f"{'VAE downsampling' if vae is not None else 'space-to-depth'}, then 2x2 packing), "
                             f"got {image_size}")
        self.image_size = image_size
        self.output_size = output_size or image_size
        self.guidance_scale = guidance_scale
        self.latent_channels = vae.config.latent_channels if vae is not None else 12
        if transformer.config.in_channels != 4 * self.latent_channels:
            raise ValueError(f"toy_flux transformer in_channels = {transformer.config.in_channels}, but 2x2 packing of "
                             f"{self.latent_channels} latent channels needs {4 * self.latent_channels}")
        self.latent_size = image_size // factor
        h = self.latent_size
        self.register_buffer("img_ids", latent_image_ids(h, h), persistent=False)

    @property
    def trainable(self) -> nn.Module:
        return self.transformer

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, image_size, image_size) in [0, 1] -> latents the flow is trained on (pretraining)."""
        if self.vae is None:
            return pixels_to_latents(images)
        cfg = self.vae.config
        z = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latent_dist.mode()
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        ids, mask = self.text_encoder.tokenize(prompts)
        device = self.img_ids.device
        hidden, pooled = self.text_encoder(ids.to(device), mask.to(device))
        return {"prompt_embeds": hidden, "pooled_embeds": pooled}

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = latents.shape
        text = cond["prompt_embeds"]
        guidance = torch.full((b,), self.guidance_scale, device=latents.device, dtype=latents.dtype)
        out = self.transformer(
            hidden_states=pack_latents(latents),
            encoder_hidden_states=text.to(latents.dtype),
            pooled_projections=cond["pooled_embeds"].to(latents.dtype),
            timestep=t.to(latents.dtype).expand(b),
            img_ids=self.img_ids,
            txt_ids=torch.zeros(text.shape[1], 3, device=latents.device),
            guidance=guidance if self.transformer.config.guidance_embeds else None,
            return_dict=False,
        )[0]
        return unpack_latents(out, c, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            pixels = latents_to_pixels(latents)
        else:
            cfg = self.vae.config
            z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            pixels = (self.vae.decode(z).sample.float() + 1).div(2).clamp(0, 1)
        if self.output_size != self.image_size:
            pixels = F.interpolate(pixels, size=self.output_size, mode="bicubic", align_corners=False).clamp(0, 1)
        return pixels

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self.transformer.save_pretrained(directory / "transformer")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        if self.vae is not None:
            self.vae.save_pretrained(directory / "vae")
        (directory / "model_index.json").write_text(json.dumps(
            {"_class_name": "ToyFluxGenerator", "image_size": self.image_size, "output_size": self.output_size,
             "latent_space": "vae" if self.vae is not None else "pixels"}, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike = "", guidance_scale: float = 1.0,
                        attention_backend: str = "auto") -> "ToyFluxGenerator":
        directory = Path(directory) if directory else EMBEDDED_CHECKPOINT
        index = directory / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"{directory} is not a toy_flux checkpoint: missing {index}. Expected layout: "
                "model_index.json, transformer/{config.json,diffusion_pytorch_model.safetensors}, "
                "text_encoder/{config.json,model.safetensors}")
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        from ..io_errors import load_json
        meta = load_json(index, "toy_flux model index")
        transformer = FluxTransformer2DModel.from_pretrained(directory, subfolder="transformer")
        text_encoder = ToyTextEncoder.from_pretrained(directory / "text_encoder")
        vae = None
        if meta.get("latent_space", "pixels") == "vae":
            if not (directory / "vae" / "config.json").is_file():
                raise FileNotFoundError(f"{index} says latent_space = vae, but {directory / 'vae'} holds no "
                                        "AutoencoderKL (config.json + diffusion_pytorch_model.safetensors)")
            vae = AutoencoderKL.from_pretrained(directory, subfolder="vae")
        return cls(transformer, text_encoder, image_size=meta["image_size"], guidance_scale=guidance_scale,
                   output_size=meta.get("output_size"), vae=vae, attention_backend=attention_backend)


def vae_downsampling(vae: AutoencoderKL) -> int:
    """Spatial downsampling factor of an AutoencoderKL: every down block but the last halves."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_toy_flux(seed: int = 0, image_size: int = 32, transformer_overrides: dict | None = None,
                   text_overrides: dict | None = None, output_size: int | None = None,
                   vae: AutoencoderKL | None = None) -> ToyFluxGenerator:
    """A freshly initialised toy model (random weights), e.g. for pretraining or tests.

    With a (trained) `vae` the flow works in its latent space, and the transformer's in/out
    channels follow from the VAE's latent channels unless overridden.
    """
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    config = dict(DEFAULT_TRANSFORMER_CONFIG)
    if vae is not None:
        config.update(in_channels=4 * vae.config.latent_channels, out_channels=4 * vae.config.latent_channels)
    transformer = FluxTransformer2DModel(**{**config, **(transformer_overrides or {})})
    text_encoder = ToyTextEncoder(**{**DEFAULT_TEXT_CONFIG, **(text_overrides or {})})
    return ToyFluxGenerator(transformer, text_encoder, image_size=image_size, output_size=output_size, vae=vae)


def _load(path: str, options: dict) -> ToyFluxGenerator:
    return ToyFluxGenerator.from_pretrained(path, **options)


_LOADER_OPTIONS = inspect.signature(ToyFluxGenerator.from_pretrained).parameters

SPEC = ModelSpec(
    name="toy_flux",
    load=_load,
    default_options={name: p.default for name, p in _LOADER_OPTIONS.items() if name != "directory"},
    # a FLUX transformer: each double-stream, then each single-stream block (as flux.BLOCKS)
    denoiser_blocks={"FluxTransformer2DModel": BlockLists("transformer_blocks", "single_transformer_blocks")},
)
