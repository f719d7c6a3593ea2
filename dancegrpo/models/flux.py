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

from . import transformer_costs as costs
from .base import Conditioning
from .checkpoint_layout import Component
from .diffusers_generator import DiffusersGenerator, GeneratorOptions, check_resolution, vae_spatial_factor
from .flux_packing import latent_image_ids, pack_latents, unpack_latents
from .options import at_least
from .spec import BlockLists, ModelSpec, option_defaults

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FluxTransformer2DModel


@dataclass
class FluxOptions(GeneratorOptions):
    height: int = 720                  # the authors' FLUX script (--h 720 --w 720)
    width: int = 720
    guidance_scale: float = 3.5        # embedded guidance of FLUX.1-dev (the authors' scripts)

    checks = {"guidance_scale": at_least(0)}


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

    # Adapted from diffusers src/diffusers/pipelines/flux/pipeline_flux.py::FluxPipeline.encode_prompt (Apache-2.0)
    @torch.no_grad()
    def encode(self, prompts: list[str], extras: list[dict] | None = None) -> dict[str, torch.Tensor]:
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        sequence = self.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]
        return {"prompt_embeds": sequence.to(self.dtype), "pooled_embeds": pooled.to(self.dtype)}


# ---------------------------------------------------------------------------------------------
# The spec: published configs, shapes and costs (memory estimate, benchmarks)

# huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/transformer/config.json
FLUX_DEV_TRANSFORMER = dict(
    attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
    num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56))
# huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/vae/config.json
FLUX_DEV_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=1024,
    scaling_factor=0.3611, shift_factor=0.1159, up_block_types=("UpDecoderBlock2D",) * 4,
    use_post_quant_conv=False, use_quant_conv=False, mid_block_add_attention=True, force_upcast=True)
# The configs of tests/test_distributed_blocks.py: every part of the class at test size.
TINY_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=32, guidance_embeds=True,
                        axes_dims_rope=(2, 2, 4))
TEXT_TOKENS = 512   # the T5 sequence of the prompt cache (FluxPromptEncoder's max_sequence_length)
# The units diffusers' gradient checkpointing wraps: each double-stream, then each single-stream block.
BLOCKS = {"FluxTransformer2DModel": BlockLists("transformer_blocks", "single_transformer_blocks")}


def denoiser_inputs(config: dict, options: dict, rows: int) -> dict:
    """Random FluxTransformer2DModel inputs for `rows` samples at options' height x width (host tensors)."""
    height, width = options["height"], options["width"]
    t = torch.full((rows,), 0.5)
    h, w = height // 8, width // 8
    text = options.get("max_sequence_length", TEXT_TOKENS)
    return dict(hidden_states=torch.randn(rows, h * w // 4, config["in_channels"]),
                encoder_hidden_states=torch.randn(rows, text, config["joint_attention_dim"]),
                pooled_projections=torch.randn(rows, config["pooled_projection_dim"]), timestep=t,
                img_ids=latent_image_ids(h, w), txt_ids=torch.zeros(text, 3),
                guidance=torch.full((rows,), 3.5) if config["guidance_embeds"] else None, return_dict=False)


def latent_numel(options: dict) -> int:
    """16 latent channels x (H/8) x (W/8): FLUX.1-dev's VAE."""
    return 16 * (options["height"] // 8) * (options["width"] // 8)


def cond_bytes(options: dict) -> int:
    """T5 sequence (4096 wide) + CLIP pooled (768), bf16, as FluxPromptEncoder caches them."""
    return (options.get("max_sequence_length", TEXT_TOKENS) * 4096 + 768) * 2


def token_counts(config: dict, options: dict) -> tuple[int, int]:
    """(image tokens, text tokens): the VAE's 8x spatial compression, then 2x2 packing."""
    h, w = options["height"] // 8, options["width"] // 8
    return (h // 2) * (w // 2), options.get("max_sequence_length", TEXT_TOKENS)


def forward_flops(config: dict, image_tokens: int, text_tokens: int) -> int:
    """One sample's forward: embedders, 2x2-packed patch and text projections, the blocks, the output head."""
    d, _, hidden = costs.width(config)
    ni, nt = image_tokens, text_tokens
    n = ni + nt
    guidance = costs.embedder_flops(256, d) if config.get("guidance_embeds") else 0
    p = config.get("patch_size", 1)
    out_channels = config.get("out_channels") or config["in_channels"]
    return (costs.embedder_flops(256, d) + guidance + costs.embedder_flops(config["pooled_projection_dim"], d)
            + costs.lin(ni, config["in_channels"], d) + costs.lin(nt, config["joint_attention_dim"], d)
            + config["num_layers"] * costs.double_block_flops(n, d, hidden)
            + config["num_single_layers"] * costs.single_block_flops(n, d, hidden)
            + costs.lin(1, d, 2 * d) + costs.lin(ni, d, p * p * out_channels))


def block_parameter_counts(config: dict) -> list[int]:
    """Double-stream blocks, then single-stream blocks."""
    d, head_dim, hidden = costs.width(config)
    return ([costs.double_block_params(d, head_dim, hidden)] * config["num_layers"]
            + [costs.single_block_params(d, head_dim, hidden)] * config["num_single_layers"])


def parameter_count(config: dict) -> int:
    """Blocks, the timestep / guidance / pooled-text embedders, input projections and the output head."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    conditioning = (costs.embedder_params(256, d) * (2 if config.get("guidance_embeds") else 1)
                    + costs.embedder_params(config["pooled_projection_dim"], d))
    head = costs.linear_params(d, 2 * d)   # AdaLayerNormContinuous's modulation before the output projection
    p = config.get("patch_size", 1)
    out = config.get("out_channels") or config["in_channels"]
    return (sum(block_parameter_counts(config)) + conditioning + costs.linear_params(config["in_channels"], d)
            + costs.linear_params(config["joint_attention_dim"], d) + head + costs.linear_params(d, p * p * out))


SPEC = ModelSpec(
    name="flux",
    load=FluxGenerator.from_pretrained,
    prompt_encoder=FluxPromptEncoder,
    default_options=option_defaults(FluxOptions),
    denoiser_class="FluxTransformer2DModel",
    denoiser_config=FLUX_DEV_TRANSFORMER,
    vae_class="AutoencoderKL",
    vae_config=FLUX_DEV_VAE,
    checkpointed_blocks="each double- and single-stream transformer block",
    text_tokens=TEXT_TOKENS,
    denoiser_blocks=BLOCKS,
    denoiser_inputs=denoiser_inputs,
    latent_numel=latent_numel,
    cond_bytes=cond_bytes,
    token_counts=token_counts,
    forward_flops=forward_flops,
    parameter_count=parameter_count,
    block_parameter_counts=block_parameter_counts,
    attention_layers=costs.joint_attention_layers,
    bench_recipe="configs/flux_hps.yaml",
    tiny_config=TINY_TRANSFORMER,
    tiny_options=dict(height=64, width=64, max_sequence_length=8),
    tiny_batch=2,
)
