"""HunyuanVideo text-to-video and text-to-image: HunyuanVideoTransformer3DModel, embedded guidance.

Latents are (16, 1 + (frames-1)/4, H/8, W/8); text-to-image is the same model with one
frame (`frames: 1`), decoded to images (B, C, H, W) instead of videos (B, T, C, H, W).

Conditioning, as diffusers' HunyuanVideoPipeline computes it and the prompt cache stores it:
the Llama encoder's third-to-last hidden state over the prompt wrapped in the model's prompt
template, with the template's tokens cropped off (`prompt_embeds`, `prompt_attention_mask`),
and CLIP's pooled output (`pooled_embeds`). Guidance is embedded (no CFG): the authors pass
6018 (= 6.018 x 1000) to the guidance embedder; the transformer's timestep is sigma x 1000.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import transformer_costs as costs
from .base import Conditioning
from .checkpoint_layout import Component
from .diffusers_generator import (DiffusersGenerator, GeneratorOptions, check_frames, check_resolution,
                                 vae_spatial_factor)
from .options import at_least
from .spec import BlockLists, ModelSpec, option_defaults

if TYPE_CHECKING:
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel


@dataclass
class HunyuanVideoOptions(GeneratorOptions):
    height: int = 480                  # the authors' HunyuanVideo script (--h 480 --w 480 --t 53)
    width: int = 480
    frames: int = 53                   # 4k+1 (the VAE compresses time 4x after the first frame); 1 = text-to-image
    guidance_scale: float = 6.018      # the authors pass guidance 6018.0 = 6.018 x 1000
    vae_tiling: bool = True            # diffusers' tiled (and frame-wise) VAE decode: bounded memory for video
    sta: dict | None = None            # sliding-tile attention (docs/sta.md); null = off

    checks = {"frames": at_least(1), "guidance_scale": at_least(0)}

    def problems(self) -> list[str]:
        if self.sta is None:
            return []
        from ..attention.hunyuan_processor import STAOptions
        try:
            return STAOptions.from_dict(self.sta).validate()
        except (TypeError, ValueError) as exc:
            return [str(exc)]


class HunyuanVideoGenerator(DiffusersGenerator):
    """Adapter for HunyuanVideo checkpoints in the diffusers layout (hunyuanvideo-community/HunyuanVideo)."""

    prediction = "flow"
    model_name = "hunyuan_video"
    denoiser_attr = "transformer"
    options_class = HunyuanVideoOptions
    cache_models = ("hunyuan_video",)
    attention_masked = True   # the joint attention and the token refiner mask padded text tokens

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.options.vae_tiling:
            self.vae.enable_tiling()
        self.latent_channels = self.vae.config.latent_channels
        self.sta = None  # the STA controller; its set_schedule(sigmas) maps timesteps to steps
        if self.options.sta is not None:
            from ..attention.hunyuan_processor import install_sta
            self.sta = install_sta(self.transformer, self.options.sta)

    @classmethod
    def check_before_loading(cls, root: Path, options, denoiser_config: dict, vae_config: dict) -> None:
        factor = vae_spatial_factor(vae_config)
        patch = denoiser_config.get("patch_size", 2)
        check_resolution(cls.model_name, options.height, options.width, factor * patch,
                         f"VAE factor {factor} x patch size {patch}")
        check_frames(cls.model_name, options.frames, vae_config.get("temporal_compression_ratio", 4))

    @classmethod
    def load_denoiser(cls, root: Path) -> HunyuanVideoTransformer3DModel:
        from diffusers import HunyuanVideoTransformer3DModel
        return HunyuanVideoTransformer3DModel.from_pretrained(str(root), subfolder="transformer",
                                                              torch_dtype=torch.float32)

    @classmethod
    def load_vae(cls, root: Path, dtype: torch.dtype) -> AutoencoderKLHunyuanVideo:
        from diffusers import AutoencoderKLHunyuanVideo
        return AutoencoderKLHunyuanVideo.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype)

    def latent_shape(self) -> tuple[int, int, int, int]:
        config = self.vae.config
        spatial, temporal = config.spatial_compression_ratio, config.temporal_compression_ratio
        return (self.latent_channels, (self.options.frames - 1) // temporal + 1,
                self.options.height // spatial, self.options.width // spatial)

    def transformer_inputs(self, t: torch.Tensor, cond: Conditioning, batch: int, dtype: torch.dtype) -> dict:
        guidance = torch.full((batch,), self.options.guidance_scale * 1000.0, device=t.device, dtype=dtype)
        return dict(timestep=(t * 1000.0).to(dtype).expand(batch),
                    encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                    encoder_attention_mask=cond["prompt_attention_mask"].to(dtype),
                    pooled_projections=cond["pooled_embeds"].to(dtype),
                    guidance=guidance if self.transformer.config.guidance_embeds else None)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        inputs = self.transformer_inputs(t, cond, latents.shape[0], latents.dtype)
        return self.transformer(hidden_states=latents, return_dict=False, **inputs)[0]

    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        video = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype), return_dict=False)[0]
        video = (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, T, C, H, W)
        return video[:, 0] if self.options.frames == 1 else video


class HunyuanPromptEncoder:
    """The Llama-based encoder (templated, cropped) + CLIP pooled, as HunyuanVideoPipeline.encode_prompt.

    `template_crop_start` is the number of template tokens before the prompt: 95 for the
    released tokenizer (diffusers' default template), or "auto" to count them with the
    checkpoint's own tokenizer.
    """

    model_name = "hunyuan_video"
    default_dtype = "bfloat16"   # 256 x 4096 per prompt; the authors encode in bf16
    hidden_layers_to_skip = 2    # the third-to-last hidden state, as the pipeline takes it

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, max_sequence_length: int = 256,
                 template_crop_start: int | str = 95):
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel
        self.device, self.dtype, self.max_sequence_length = device, dtype, max_sequence_length
        self.template = DEFAULT_PROMPT_TEMPLATE["template"]
        self.tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        self.tokenizer_2 = AutoTokenizer.from_pretrained(str(root / "tokenizer_2"))
        self.text_encoder = AutoModel.from_pretrained(str(root / "text_encoder")).to(device, dtype).eval()
        self.text_encoder_2 = CLIPTextModel.from_pretrained(str(root / "text_encoder_2")).to(device, dtype).eval()
        if template_crop_start == "auto":
            prefix = self.template.split("{}")[0]
            template_crop_start = len(self.tokenizer(prefix).input_ids)
        if not isinstance(template_crop_start, int) or template_crop_start < 0:
            raise ValueError(f"template_crop_start = {template_crop_start!r} must be a non-negative integer or 'auto'")
        self.crop_start = template_crop_start

    @staticmethod
    def components() -> list[Component]:
        return [Component("text_encoder", "model"), Component("tokenizer", "tokenizer"),
                Component("text_encoder_2", "model"), Component("tokenizer_2", "tokenizer")]

    def meta(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length, "template_crop_start": self.crop_start}

    # Adapted from diffusers src/diffusers/pipelines/hunyuan_video/pipeline_hunyuan_video.py::HunyuanVideoPipeline.encode_prompt (Apache-2.0)  # noqa: E501
    @torch.no_grad()
    def encode(self, prompts: list[str], extras: list[dict] | None = None) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer([self.template.format(p) for p in prompts], padding="max_length",
                                max_length=self.max_sequence_length + self.crop_start, truncation=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        sequence = hidden[-(self.hidden_layers_to_skip + 1)][:, self.crop_start:]
        mask = mask[:, self.crop_start:]
        clip_ids = self.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True,
                                    return_tensors="pt").input_ids
        pooled = self.text_encoder_2(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        return {"prompt_embeds": sequence.to(self.dtype), "prompt_attention_mask": mask.to(torch.int64),
                "pooled_embeds": pooled.to(self.dtype)}


# ---------------------------------------------------------------------------------------------
# The spec: published configs, shapes and costs (memory estimate, benchmarks)

# huggingface.co/hunyuanvideo-community/HunyuanVideo/blob/main/transformer/config.json
HUNYUAN_VIDEO_TRANSFORMER = dict(
    attention_head_dim=128, guidance_embeds=True, in_channels=16, mlp_ratio=4.0, num_attention_heads=24,
    num_layers=20, num_refiner_layers=2, num_single_layers=40, out_channels=16, patch_size=2, patch_size_t=1,
    pooled_projection_dim=768, qk_norm="rms_norm", rope_axes_dim=(16, 56, 56), rope_theta=256.0,
    text_embed_dim=4096)
# huggingface.co/hunyuanvideo-community/HunyuanVideo/blob/main/vae/config.json
HUNYUAN_VIDEO_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("HunyuanVideoDownBlock3D",) * 4,
    in_channels=3, latent_channels=16, layers_per_block=2, mid_block_add_attention=True, norm_num_groups=32,
    out_channels=3, scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
    up_block_types=("HunyuanVideoUpBlock3D",) * 4)
# The configs of tests/test_distributed_blocks.py: every part of the class at test size.
TINY_TRANSFORMER = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                        num_single_layers=2, num_refiner_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=32,
                        pooled_projection_dim=32, rope_axes_dim=(2, 2, 4), guidance_embeds=True)
TEXT_TOKENS = 256   # the Llama sequence of the prompt cache (HunyuanPromptEncoder's max_sequence_length)
# The text token refiner's blocks (text only, 2 in the release), then the double- and single-stream
# blocks: the latter two are what diffusers' gradient checkpointing wraps.
BLOCKS = {"HunyuanVideoTransformer3DModel": BlockLists("context_embedder.token_refiner.refiner_blocks",
                                                       "transformer_blocks", "single_transformer_blocks")}


def latent_frames(options: dict) -> int:
    """Latent frames of `options["frames"]` video frames: 4x temporal compression after the first frame."""
    return (options.get("frames", 1) - 1) // 4 + 1


def denoiser_inputs(config: dict, options: dict, rows: int) -> dict:
    """Random HunyuanVideoTransformer3DModel inputs for `rows` samples of options' frames x height x width
    (host tensors); `config["in_channels"]` covers SkyReels' video + image latent channels."""
    t = torch.full((rows,), 0.5)
    text = options.get("max_sequence_length", TEXT_TOKENS)
    return dict(hidden_states=torch.randn(rows, config["in_channels"], latent_frames(options), options["height"] // 8,
                                          options["width"] // 8),
                timestep=t * 1000, encoder_hidden_states=torch.randn(rows, text, config["text_embed_dim"]),
                encoder_attention_mask=torch.ones(rows, text),
                pooled_projections=torch.randn(rows, config["pooled_projection_dim"]),
                guidance=torch.full((rows,), 1000.0), return_dict=False)


def latent_numel(options: dict) -> int:
    """16 latent channels x latent frames x (H/8) x (W/8): HunyuanVideo's VAE."""
    return 16 * ((options["frames"] - 1) // 4 + 1) * (options["height"] // 8) * (options["width"] // 8)


def cond_bytes(options: dict) -> int:
    """Llama sequence (4096 wide) + CLIP pooled (768) in bf16, and the int64 attention mask."""
    text = options.get("max_sequence_length", TEXT_TOKENS)
    return (text * 4096 + 768) * 2 + text * 8


def token_counts(config: dict, options: dict) -> tuple[int, int]:
    """(video tokens, text tokens): the VAE's 8x spatial and 4x temporal compression, then the patches."""
    h, w = options["height"] // 8, options["width"] // 8
    p, pt = config.get("patch_size", 2), config.get("patch_size_t", 1)
    return (latent_frames(options) // pt) * (h // p) * (w // p), options.get("max_sequence_length", TEXT_TOKENS)


def forward_flops(config: dict, image_tokens: int, text_tokens: int) -> int:
    """One sample's forward: embedders, the patch embedding, the text token refiner, the blocks, the head."""
    d, _, hidden = costs.width(config)
    ni, nt = image_tokens, text_tokens
    n = ni + nt
    guidance = costs.embedder_flops(256, d) if config.get("guidance_embeds") else 0
    p, pt = config.get("patch_size", 2), config.get("patch_size_t", 1)
    text_dim = config["text_embed_dim"]
    refiner_hidden = 4 * d   # diffusers builds the token refiner with its default MLP ratio 4, not the config's
    refiner_block = (costs.lin(nt, d, 3 * d) + 4 * nt * nt * d + costs.lin(nt, d, d) + costs.lin(nt, d, refiner_hidden)
                     + costs.lin(nt, refiner_hidden, d) + costs.lin(1, d, 2 * d))
    return (costs.embedder_flops(256, d) + guidance + costs.embedder_flops(config["pooled_projection_dim"], d)
            + costs.lin(ni, config["in_channels"] * pt * p * p, d)                   # patch embedding (a conv)
            # the token refiner's inputs: its timestep and pooled-text embedders, the text projection
            + costs.embedder_flops(256, d) + costs.embedder_flops(text_dim, d) + costs.lin(nt, text_dim, d)
            + config.get("num_refiner_layers", 2) * refiner_block
            + config["num_layers"] * costs.double_block_flops(n, d, hidden)
            + config["num_single_layers"] * costs.single_block_flops(n, d, hidden)
            + costs.lin(1, d, 2 * d) + costs.lin(ni, d, pt * p * p * config["out_channels"]))


def block_parameter_counts(config: dict) -> list[int]:
    """Token refiner blocks, double-stream blocks, then single-stream blocks."""
    d, head_dim, hidden = costs.width(config)
    refiner = (costs.linear_params(d, 3 * d) + costs.linear_params(d, d) + 2 * 2 * d + costs.mlp_params(d, 4 * d)
               + costs.linear_params(d, 2 * d))
    return ([refiner] * config.get("num_refiner_layers", 2)
            + [costs.double_block_params(d, head_dim, hidden)] * config["num_layers"]
            + [costs.single_block_params(d, head_dim, hidden)] * config["num_single_layers"])


def parameter_count(config: dict) -> int:
    """Blocks, embedders, the patch embedding, the token refiner's inputs and the output head."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    conditioning = (costs.embedder_params(256, d) * (2 if config.get("guidance_embeds") else 1)
                    + costs.embedder_params(config["pooled_projection_dim"], d))
    head = costs.linear_params(d, 2 * d)   # AdaLayerNormContinuous's modulation before the output projection
    p, pt = config.get("patch_size", 2), config.get("patch_size_t", 1)
    text = config["text_embed_dim"]
    return (sum(block_parameter_counts(config)) + conditioning
            + costs.linear_params(config["in_channels"] * pt * p * p, d)             # the patch-embedding conv
            # the token refiner's inputs: its timestep and pooled-text embedders, the text projection
            + costs.embedder_params(256, d) + costs.embedder_params(text, d) + costs.linear_params(text, d)
            + head + costs.linear_params(d, pt * p * p * config["out_channels"]))


SPEC = ModelSpec(
    name="hunyuan_video",
    load=HunyuanVideoGenerator.from_pretrained,
    prompt_encoder=HunyuanPromptEncoder,
    default_options=option_defaults(HunyuanVideoOptions),
    sequence_parallel=True,
    attention_masked=HunyuanVideoGenerator.attention_masked,
    sliding_tile_attention=True,
    denoiser_class="HunyuanVideoTransformer3DModel",
    denoiser_config=HUNYUAN_VIDEO_TRANSFORMER,
    vae_class="AutoencoderKLHunyuanVideo",
    vae_config=HUNYUAN_VIDEO_VAE,
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
    bench_recipe="configs/hunyuan_t2v.yaml",
    tiny_config=TINY_TRANSFORMER,
    tiny_options=dict(height=64, width=64, frames=5, max_sequence_length=8),
    tiny_batch=2,
)
