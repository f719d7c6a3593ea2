"""Stable Diffusion 3.5: SD3Transformer2DModel (MMDiT), flow matching with a static shift, real CFG.

The prompt cache holds what diffusers' StableDiffusion3Pipeline.encode_prompt returns: the
penultimate hidden states of the two CLIP text encoders concatenated along features,
zero-padded to T5's width and followed by the T5 sequence along tokens (`prompt_embeds`,
(B, 77 + max_sequence_length, 4096)), and the two CLIP projections concatenated
(`pooled_embeds`, (B, 2048)). CFG runs in sampling and training alike, the unconditional
(empty prompt) and conditional rows batched into one transformer call in the pipeline's order
`[uncond; cond]`. Latents are the VAE's (16, H/8, W/8); the transformer patchifies them itself
and takes the timestep as sigma x 1000, as the pipeline's scheduler gives it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import transformer_costs as costs
from .base import Conditioning
from .checkpoint_layout import Component, read_json
from .diffusers_generator import DiffusersGenerator, GeneratorOptions, check_resolution, vae_spatial_factor
from .options import at_least
from .prompt_cache import PromptCache
from .spec import BlockLists, ModelSpec, option_defaults

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, SD3Transformer2DModel

TEXT_KEYS = ("prompt_embeds", "pooled_embeds")
CLIP_TOKENS = 77    # the CLIP tokenizers' model_max_length: the first 77 rows of prompt_embeds
T5_TOKENS = 256     # StableDiffusion3Pipeline's default max_sequence_length


@dataclass
class SD35Options(GeneratorOptions):
    height: int = 512                  # Flow-GRPO's SD3.5 configs (config.resolution = 512)
    width: int = 512
    cfg_scale: float = 4.5             # SD3.5-medium model card and Flow-GRPO (sample.guidance_scale = 4.5)
    max_sequence_length: int = T5_TOKENS  # T5 tokens the prompt cache must hold (preprocess --option)

    checks = {"cfg_scale": at_least(1, "1 = no guidance"), "max_sequence_length": at_least(1)}


class SD35Generator(DiffusersGenerator):
    """Adapter for Stable Diffusion 3 / 3.5 checkpoints (stabilityai/stable-diffusion-3.5-* layout)."""

    prediction = "flow"
    model_name = "sd35"
    denoiser_attr = "transformer"
    options_class = SD35Options
    needs_empty_prompt = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.vae.config.latent_channels
        if self.transformer.config.in_channels != self.latent_channels:
            raise ValueError(f"sd35: transformer in_channels = {self.transformer.config.in_channels} but the VAE "
                             f"has {self.latent_channels} latent channels; the checkpoint's parts do not match")

    @classmethod
    def components(cls) -> list[Component]:
        return super().components() + [Component("scheduler", "scheduler")]

    @classmethod
    def check_before_loading(cls, root: Path, options, denoiser_config: dict, vae_config: dict) -> None:
        factor, patch = vae_spatial_factor(vae_config), denoiser_config.get("patch_size", 2)
        check_resolution(cls.model_name, options.height, options.width, factor * patch,
                         f"VAE factor {factor} x patch size {patch}")
        limit = denoiser_config.get("pos_embed_max_size")
        if limit:
            patches = {name: value // (factor * patch) for name, value in (("height", options.height),
                                                                           ("width", options.width))}
            over = [f"{name} = {getattr(options, name)} ({n} patches)" for name, n in patches.items() if n > limit]
            if over:
                raise ValueError(f"model 'sd35': {' and '.join(over)} exceeds the transformer's positional "
                                 f"embedding of {limit} x {limit} patches (pos_embed_max_size in "
                                 f"{root / 'transformer' / 'config.json'}); use at most "
                                 f"{limit * factor * patch} pixels")
        path = root / "scheduler" / "scheduler_config.json"
        if read_json(path).get("use_dynamic_shifting", False):
            raise ValueError(f"sd35: {path} sets use_dynamic_shifting = true (a resolution-dependent shift); the "
                             "trainer's sampler uses the static sampler.shift (SD3.5 ships shift 3.0 without "
                             "dynamic shifting): use such a checkpoint's scheduler")

    @classmethod
    def check_cache(cls, cache: PromptCache, options) -> None:
        length = cache.meta.get("max_sequence_length")
        if length != options.max_sequence_length:
            raise ValueError(f"prompt cache {str(cache.directory)!r} holds T5 sequences of {length} tokens, but "
                             f"model.options.max_sequence_length = {options.max_sequence_length}; rerun `dancegrpo "
                             f"preprocess --option max_sequence_length={options.max_sequence_length}` or set "
                             f"max_sequence_length: {length}")

    @classmethod
    def load_denoiser(cls, root: Path) -> SD3Transformer2DModel:
        from diffusers import SD3Transformer2DModel
        return SD3Transformer2DModel.from_pretrained(str(root), subfolder="transformer", torch_dtype=torch.float32)

    @classmethod
    def load_vae(cls, root: Path, dtype: torch.dtype) -> AutoencoderKL:
        from diffusers import AutoencoderKL
        return AutoencoderKL.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype)

    def negative_keys(self) -> tuple[str, ...]:
        return TEXT_KEYS

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.options.height // self.vae_factor, self.options.width // self.vae_factor)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Guided velocity uncond + s * (cond - uncond), both rows from one batched transformer call
        (s = cfg_scale; one unguided call when s = 1). latents (B, C, h, w), t: sigma in [0, 1]."""
        b, dtype = latents.shape[0], latents.dtype
        timestep = (t * 1000.0).to(dtype).expand(b)   # the scheduler's timesteps: sigma x num_train_timesteps
        text, pooled = cond["prompt_embeds"].to(dtype), cond["pooled_embeds"].to(dtype)
        if self.options.cfg_scale == 1.0:
            return self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                                    pooled_projections=pooled, return_dict=False)[0]
        out = self.transformer(
            hidden_states=torch.cat([latents, latents]), timestep=torch.cat([timestep, timestep]),
            encoder_hidden_states=torch.cat([cond["negative_prompt_embeds"].to(dtype), text]),
            pooled_projections=torch.cat([cond["negative_pooled_embeds"].to(dtype), pooled]), return_dict=False)[0]
        uncond, conditional = out.chunk(2)
        return uncond + self.options.cfg_scale * (conditional - uncond)

    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        scaled = latents / config.scaling_factor + (config.shift_factor or 0.0)
        pixels = self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]
        return (pixels.float() / 2 + 0.5).clamp(0, 1)


class SD35PromptEncoder:
    """Two CLIPs (penultimate hidden states and projections) + T5, as StableDiffusion3Pipeline.encode_prompt
    combines them (clip_skip None, one image per prompt)."""

    model_name = "sd35"
    default_dtype = "bfloat16"   # T5-XXL's 4096-wide sequence per prompt; the model card runs the pipeline in bf16

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, max_sequence_length: int = T5_TOKENS):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel
        if max_sequence_length < 1:
            raise ValueError(f"sd35 preprocess: max_sequence_length = {max_sequence_length} must be >= 1 "
                             f"(the pipeline's default is {T5_TOKENS})")
        self.device, self.dtype, self.max_sequence_length = device, dtype, max_sequence_length
        self.tokenizers = [AutoTokenizer.from_pretrained(str(root / name))
                           for name in ("tokenizer", "tokenizer_2", "tokenizer_3")]
        self.clips = [CLIPTextModelWithProjection.from_pretrained(str(root / name)).to(device, dtype).eval()
                      for name in ("text_encoder", "text_encoder_2")]
        self.t5 = T5EncoderModel.from_pretrained(str(root / "text_encoder_3")).to(device, dtype).eval()

    @staticmethod
    def components() -> list[Component]:
        return [Component(f"{kind}{suffix}", role) for suffix in ("", "_2", "_3")
                for kind, role in (("text_encoder", "model"), ("tokenizer", "tokenizer"))]

    def meta(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    # Adapted from diffusers src/diffusers/pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py::StableDiffusion3Pipeline.encode_prompt (Apache-2.0)  # noqa: E501
    @torch.no_grad()
    def encode(self, prompts: list[str], extras: list[dict] | None = None) -> dict[str, torch.Tensor]:
        clip_length = self.tokenizers[0].model_max_length   # the pipeline pads both CLIPs to the first's length
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.clips):
            ids = tokenizer(prompts, padding="max_length", max_length=clip_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])   # penultimate layer (clip_skip None)
            pooled.append(out[0])                   # text_embeds: the projection of the pooled token
        t5_ids = self.tokenizers[2](prompts, padding="max_length", max_length=self.max_sequence_length,
                                    truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        t5 = self.t5(t5_ids.to(self.device))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2).to(self.dtype),
                "pooled_embeds": torch.cat(pooled, dim=-1).to(self.dtype)}


# ---------------------------------------------------------------------------------------------
# The spec: published configs and shapes (memory estimate)

# huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/transformer/config.json (the model
# Flow-GRPO trains): MMDiT-X, dual attention in blocks 0-12, RMS QK-norm; 2.5 B parameters.
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/transformer/config.json: 8 B parameters.
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm")
# huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/vae/config.json (the same in -large)
SD35_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=1024,
    scaling_factor=1.5305, shift_factor=0.0609, up_block_types=("UpDecoderBlock2D",) * 4,
    use_post_quant_conv=False, use_quant_conv=False, force_upcast=True)


def text_tokens(options: dict) -> int:
    """CLIP's 77 rows followed by the T5 sequence (model.options.max_sequence_length)."""
    return CLIP_TOKENS + options.get("max_sequence_length", T5_TOKENS)


def denoiser_inputs(config: dict, options: dict, rows: int) -> dict:
    """Random SD3Transformer2DModel inputs for `rows` transformer rows (CFG: 2 x samples) at options'
    height x width, as SD35Generator.predict builds them (host tensors)."""
    return dict(hidden_states=torch.randn(rows, config["in_channels"], options["height"] // 8, options["width"] // 8),
                timestep=torch.full((rows,), 500.0),
                encoder_hidden_states=torch.randn(rows, text_tokens(options), config["joint_attention_dim"]),
                pooled_projections=torch.randn(rows, config["pooled_projection_dim"]), return_dict=False)


def latent_numel(options: dict) -> int:
    """16 latent channels x (H/8) x (W/8): SD3.5's VAE."""
    return 16 * (options["height"] // 8) * (options["width"] // 8)


def cond_bytes(options: dict) -> int:
    """The bf16 prompt cache's prompt_embeds ((77 + T5 tokens) x 4096) and pooled_embeds (2048), plus the
    empty prompt's for CFG."""
    return 2 * (text_tokens(options) * 4096 + 2048) * 2



# FLOPs and parameters of diffusers' SD3Transformer2DModel (transformer_sd3.py, attention.py's
# JointTransformerBlock, v0.42), in transformer_costs' terms; tests compare them with
# torch.utils.flop_counter and sum(numel) on tiny configs (tests/test_bench_costs.py).
def token_counts(config: dict, options: dict) -> tuple[int, int]:
    """(image tokens, text tokens): the VAE's 8x compression, then p x p patches; CLIP's 77 + the T5 sequence."""
    p = config["patch_size"]
    return (options["height"] // 8 // p) * (options["width"] // 8 // p), text_tokens(options)


def _blocks(config: dict):
    """(d, is the last block (context_pre_only: no text output projection, no text MLP), has MMDiT-X's
    second, image-only attention) of each JointTransformerBlock."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    dual = set(config.get("dual_attention_layers") or ())
    return [(d, i == config["num_layers"] - 1, i in dual) for i in range(config["num_layers"])]


def forward_flops(config: dict, image_tokens: int, text_tokens: int) -> int:
    """One sample's forward. Each block: AdaLN-Zero modulation of the image (6d, or 9d with the second
    attention) and text (6d; the last block's 2d) streams; joint attention, lin(N, d, 3d) + 4 N^2 d with
    N = N_i + N_t, output projections of the image (and, but in the last block, text) tokens; the second
    attention lin(N_i, d, 3d) + 4 N_i^2 d + lin(N_i, d, d); MLPs (hidden 4d) of the image (and text)
    tokens. Once: the patch embedding, the timestep and pooled-text embedders, the T5/CLIP context
    projection, the output modulation and projection."""
    ni, nt = image_tokens, text_tokens
    n, total = ni + nt, 0
    for d, last, dual in _blocks(config):
        total += costs.lin(1, d, (9 if dual else 6) * d) + costs.lin(1, d, (2 if last else 6) * d)
        total += costs.lin(n, d, 3 * d) + 4 * n * n * d + costs.lin(ni if last else n, d, d)
        total += (costs.lin(ni, d, 3 * d) + 4 * ni * ni * d + costs.lin(ni, d, d)) if dual else 0
        rows = ni if last else n
        total += costs.lin(rows, d, 4 * d) + costs.lin(rows, 4 * d, d)
    d, p = _blocks(config)[0][0], config["patch_size"]
    out = config.get("out_channels") or config["in_channels"]
    return (total + costs.lin(ni, config["in_channels"] * p * p, d) + costs.embedder_flops(256, d)
            + costs.embedder_flops(config["pooled_projection_dim"], d)
            + costs.lin(nt, config["joint_attention_dim"], config["caption_projection_dim"])
            + costs.lin(1, d, 2 * d) + costs.lin(ni, d, p * p * out))


def block_parameter_counts(config: dict) -> list[int]:
    """Each JointTransformerBlock: modulations, joint attention (q, k, v and out per stream; RMS QK-norms of
    head_dim per stream), the second attention and its QK-norms, the MLPs."""
    head_norms = 2 * config["attention_head_dim"] if config.get("qk_norm") else 0
    counts = []
    for d, last, dual in _blocks(config):
        block = costs.linear_params(d, (9 if dual else 6) * d) + costs.linear_params(d, (2 if last else 6) * d)
        block += (7 if last else 8) * costs.linear_params(d, d) + 2 * head_norms
        block += (4 * costs.linear_params(d, d) + head_norms) if dual else 0
        block += (1 if last else 2) * costs.mlp_params(d, 4 * d)
        counts.append(block)
    return counts


def parameter_count(config: dict) -> int:
    """Blocks, the patch-embedding conv (its position table is a buffer), the embedders, the context
    projection and the output head."""
    d, p = config["num_attention_heads"] * config["attention_head_dim"], config["patch_size"]
    out = config.get("out_channels") or config["in_channels"]
    return (sum(block_parameter_counts(config)) + costs.linear_params(config["in_channels"] * p * p, d)
            + costs.embedder_params(256, d) + costs.embedder_params(config["pooled_projection_dim"], d)
            + costs.linear_params(config["joint_attention_dim"], config["caption_projection_dim"])
            + costs.linear_params(d, 2 * d) + costs.linear_params(d, p * p * out))


def attention_layers(config: dict) -> int:
    """Joint (image + text) attention layers: one per block (MMDiT-X's image-only second attention aside)."""
    return config["num_layers"]


# tests/tiny_models.py's SD3.5 transformer with 3 blocks (MMDiT-X's second attention in block 0).
TINY_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                        pooled_projection_dim=48, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


SPEC = ModelSpec(
    name="sd35",
    load=SD35Generator.from_pretrained,
    prompt_encoder=SD35PromptEncoder,
    cfg=SD35Generator.needs_empty_prompt,
    default_options=option_defaults(SD35Options),
    denoiser_class="SD3Transformer2DModel",
    denoiser_config=SD35_MEDIUM_TRANSFORMER,
    vae_class="AutoencoderKL",
    vae_config=SD35_VAE,
    checkpointed_blocks="each joint transformer block",
    text_tokens=CLIP_TOKENS + T5_TOKENS,
    # each JointTransformerBlock (with its second, image-only attention in MMDiT-X's blocks 0-12): the
    # units diffusers' gradient checkpointing wraps
    denoiser_blocks={"SD3Transformer2DModel": BlockLists("transformer_blocks")},
    denoiser_inputs=denoiser_inputs,
    latent_numel=latent_numel,
    cond_bytes=cond_bytes,
    token_counts=token_counts,
    forward_flops=forward_flops,
    parameter_count=parameter_count,
    block_parameter_counts=block_parameter_counts,
    attention_layers=attention_layers,
    bench_recipe="configs/sd35_hps.yaml",
    tiny_config=TINY_TRANSFORMER,
    tiny_options=dict(height=64, width=64, max_sequence_length=8),
    tiny_batch=2,
)
