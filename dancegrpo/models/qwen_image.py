"""Qwen-Image: QwenImageTransformer2DModel on 2x2-packed latents, Qwen2.5-VL text, true CFG.

What diffusers' QwenImagePipeline does, and where it is here:

- Text (`QwenImagePromptEncoder`, run once by `dancegrpo preprocess`): the prompt in the
  pipeline's chat template, the Qwen2.5-VL encoder's last hidden state, the template's first 34
  tokens dropped (`prompt_template_encode_start_idx`); the valid tokens are stored padded to
  `max_sequence_length` with a mask (`prompt_embeds`, `prompt_embeds_mask`). The cache's
  unconditional entry (the empty prompt's slot, which `dancegrpo preprocess` adds for CFG models)
  holds the negative prompt, " " by default (the model card and Flow-GRPO pass " ").
- Latents are kept unpacked, (16, H/8, W/8) (the VAE's single frame squeezed), so the trainer's
  noise and trajectories are image-shaped; `predict` packs 2x2 patches into tokens as the pipeline
  does and passes `img_shapes` = (1, H/16, W/16), from which the transformer builds its rope.
- The transformer's time input is sigma (the pipeline passes timestep / 1000).
- True CFG (`cfg_scale`, the pipeline's `true_cfg_scale`): uncond + s (cond - uncond), rescaled
  per token to the norm of the conditional prediction, as the pipeline does. The two passes run
  as one transformer call: `encode_prompts` trims the prompts' and the negative prompt's padded
  sequences to one common length (the longest valid one among them, read on the host from the
  cached masks), so they always batch; the masked padding changes no valid token's output.
- Timesteps: the pipeline's exponential time shift with mu = calculate_shift(image tokens) is
  exactly the trainer's static shift `sampler.shift = exp(mu)` (configs/qwen_image.yaml).
- Decode: latents x latents_std + latents_mean (the VAE config's), the VAE's one frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import transformer_costs as costs
from .base import Conditioning
from .checkpoint_layout import Component
from .diffusers_generator import DiffusersGenerator, GeneratorOptions, check_resolution
from .flux_packing import pack_latents, unpack_latents
from .options import at_least
from .prompt_cache import EMPTY_PROMPT
from .spec import BlockLists, ModelSpec, option_defaults

if TYPE_CHECKING:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

TEXT_KEYS = ("prompt_embeds", "prompt_embeds_mask")
# Variants of the transformer class this adapter does not drive (edit, layered, distilled models).
UNSUPPORTED_FLAGS = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


@dataclass
class QwenImageOptions(GeneratorOptions):
    height: int = 512                  # Flow-GRPO pickscore_qwenimage (config.resolution = 512)
    width: int = 512
    cfg_scale: float = 4.0             # QwenImagePipeline's true_cfg_scale default; Flow-GRPO, VeRL-Omni: 4

    checks = {"cfg_scale": at_least(1, "1 = no guidance")}


def vae_factor(vae_config: dict) -> int:
    """Pixels per latent cell along one side: 2 ** len(temperal_downsample), as the pipeline computes it."""
    return 2 ** len(vae_config.get("temperal_downsample", (False, True, True)))


def true_cfg(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's guided prediction on packed tokens (B, N, 4C): u + s (c - u), rescaled per token
    to the norm of the conditional prediction c over the channel dimension (QwenImagePipeline.__call__)."""
    combined = unconditional + scale * (conditional - unconditional)
    return combined * (torch.norm(conditional, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


class QwenImageGenerator(DiffusersGenerator):
    """Adapter for Qwen-Image checkpoints in the diffusers layout (Qwen/Qwen-Image)."""

    prediction = "flow"
    model_name = "qwen_image"
    denoiser_attr = "transformer"
    options_class = QwenImageOptions
    needs_empty_prompt = True     # the cache's unconditional entry (the negative prompt)
    attention_masked = True       # the joint attention masks padded text tokens

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.vae.config
        self.vae_factor = vae_factor(dict(config))
        self.latent_channels = config.z_dim
        # rope positions of the packed image: one frame of (H/16) x (W/16) tokens (the pipeline's img_shapes)
        self.image_shape = (1, self.options.height // self.vae_factor // 2, self.options.width // self.vae_factor // 2)
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std, dtype=torch.float32), persistent=False)

    @classmethod
    def check_before_loading(cls, root: Path, options, denoiser_config: dict, vae_config: dict) -> None:
        factor = vae_factor(vae_config)
        check_resolution(cls.model_name, options.height, options.width, factor * 2,
                         f"VAE factor {factor} x 2x2 latent packing")
        where = root / cls.denoiser_attr / "config.json"
        set_flags = [flag for flag in UNSUPPORTED_FLAGS if denoiser_config.get(flag)]
        if set_flags:
            raise ValueError(f"qwen_image: {where} sets {', '.join(f'{f} = true' for f in set_flags)}; this adapter "
                             "drives the text-to-image transformer of Qwen/Qwen-Image (all of them false)")
        channels = vae_config.get("z_dim", 16)
        patch = denoiser_config.get("patch_size", 2)
        out = denoiser_config.get("out_channels") or denoiser_config.get("in_channels", 64)
        if denoiser_config.get("in_channels", 64) != 4 * channels or patch * patch * out != 4 * channels:
            raise ValueError(f"qwen_image: {where} has in_channels = {denoiser_config.get('in_channels', 64)}, "
                             f"patch_size = {patch}, out_channels = {out}, but the VAE has z_dim = {channels}: 2x2 "
                             f"packing needs in_channels = patch_size^2 x out_channels = {4 * channels}")

    @classmethod
    def load_denoiser(cls, root: Path) -> QwenImageTransformer2DModel:
        from diffusers import QwenImageTransformer2DModel
        return QwenImageTransformer2DModel.from_pretrained(str(root), subfolder="transformer",
                                                           torch_dtype=torch.float32)

    @classmethod
    def load_vae(cls, root: Path, dtype: torch.dtype) -> AutoencoderKLQwenImage:
        from diffusers import AutoencoderKLQwenImage
        return AutoencoderKLQwenImage.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype)

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.options.height // self.vae_factor, self.options.width // self.vae_factor)

    def negative_keys(self) -> tuple[str, ...]:
        return TEXT_KEYS

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Cached text of `prompts` (and, with CFG, `negative_*`: the negative prompt's, repeated),
        trimmed to the longest valid sequence among them: `prompt_embeds` (B, L, D) in the cache's
        dtype and `prompt_embeds_mask` (B, L) int64 (1 = valid token). The trim reads the masks on
        the host before they move to the device, so no device sync."""
        cond = self.cache.lookup(list(prompts))
        texts = [cond]
        if self.options.cfg_scale != 1.0:
            empty = self.cache.lookup([EMPTY_PROMPT])
            cond.update({f"negative_{k}": empty[k].expand(len(prompts), *empty[k].shape[1:]) for k in TEXT_KEYS})
            texts.append(empty)
        length = max(valid_length(text["prompt_embeds_mask"]) for text in texts)
        trimmed = {k: (v[:, :length] if k.removeprefix("negative_") in TEXT_KEYS else v) for k, v in cond.items()}
        return {k: v.contiguous().to(self.device) for k, v in trimmed.items()}

    def transformer_inputs(self, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, rows: int) -> dict:
        """Keyword inputs of one transformer call besides the packed latents (`hidden_states`)."""
        return dict(timestep=t, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                    img_shapes=[[self.image_shape]] * rows, return_dict=False)

    # Adapted from diffusers src/diffusers/pipelines/qwenimage/pipeline_qwenimage.py::QwenImagePipeline.__call__ (Apache-2.0)  # noqa: E501
    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity (B, C, h, w) at sigma `t`; with CFG, the conditional and unconditional passes run
        as one transformer call of 2B rows and combine by `true_cfg`."""
        b, c, h, w = latents.shape
        dtype = latents.dtype
        tokens, t = pack_latents(latents), t.to(dtype).expand(b)
        text, mask = cond["prompt_embeds"].to(dtype), cond["prompt_embeds_mask"]
        if self.options.cfg_scale == 1.0:
            out = self.transformer(hidden_states=tokens, **self.transformer_inputs(t, text, mask, b))[0]
        else:
            text = torch.cat([text, cond["negative_prompt_embeds"].to(dtype)])
            mask = torch.cat([mask, cond["negative_prompt_embeds_mask"]])
            both = self.transformer(hidden_states=torch.cat([tokens, tokens]),
                                    **self.transformer_inputs(torch.cat([t, t]), text, mask, 2 * b))[0]
            conditional, unconditional = both.chunk(2)
            out = true_cfg(conditional, unconditional, self.options.cfg_scale)
        return unpack_latents(out, c, h, w)

    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = self.vae.dtype
        shape = (1, self.latent_channels, 1, 1, 1)
        mean, std = self.latents_mean.to(dtype).view(shape), self.latents_std.to(dtype).view(shape)
        scaled = latents.unsqueeze(2).to(dtype) / (1.0 / std) + mean   # the pipeline's order of operations
        pixels = self.vae.decode(scaled, return_dict=False)[0][:, :, 0]
        return (pixels.float() / 2 + 0.5).clamp(0, 1)


def valid_length(mask: torch.Tensor) -> int:
    """1 + the last position any row of a (B, L) host mask marks valid (0 if none)."""
    positions = mask.any(dim=0).nonzero()
    return int(positions.max()) + 1 if len(positions) else 0


# The prompt template of diffusers' QwenImagePipeline (prompt_template_encode) and the number of its
# leading tokens the pipeline drops (prompt_template_encode_start_idx); tests compare both with it.
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_DROP = 34
TOKENIZER_MAX_LENGTH = 1024   # the pipeline's tokenizer_max_length (and its max_sequence_length limit)


class QwenImagePromptEncoder:
    """Qwen2.5-VL's last hidden state over the templated prompt, as QwenImagePipeline.encode_prompt.

    Options (`dancegrpo preprocess --option k=v`): `max_sequence_length` (tokens kept after the
    template's, 1..1024; the pipeline's default 512) and `negative_prompt` (what the cache's
    unconditional entry encodes; " " as the model card and Flow-GRPO pass).
    """

    model_name = "qwen_image"
    default_dtype = "bfloat16"   # 512 x 3584 per prompt; the pipeline runs Qwen-Image in bf16

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, max_sequence_length: int = 512,
                 negative_prompt: str = " "):
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= TOKENIZER_MAX_LENGTH:
            raise ValueError(f"qwen_image preprocess: max_sequence_length = {max_sequence_length!r} must be an "
                             f"integer in [1, {TOKENIZER_MAX_LENGTH}] (QwenImagePipeline's limit)")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"qwen_image preprocess: negative_prompt = {negative_prompt!r} must be a string")
        self.device, self.dtype = device, dtype
        self.max_sequence_length, self.negative_prompt = max_sequence_length, negative_prompt
        self.tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        prefix = len(self.tokenizer(PROMPT_TEMPLATE.split("{}")[0]).input_ids)
        if prefix != TEMPLATE_DROP:
            raise ValueError(f"qwen_image preprocess: {root / 'tokenizer'} splits the prompt template's system part "
                             f"into {prefix} tokens, but QwenImagePipeline drops the first {TEMPLATE_DROP} (those of "
                             "Qwen/Qwen-Image's tokenizer); this tokenizer does not belong to a Qwen-Image checkpoint")
        self.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(root / "text_encoder"))
        self.text_encoder = self.text_encoder.to(device, dtype).eval()

    @staticmethod
    def components() -> list[Component]:
        return [Component("text_encoder", "model"), Component("tokenizer", "tokenizer")]

    def meta(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length, "negative_prompt": self.negative_prompt}

    # Adapted from diffusers src/diffusers/pipelines/qwenimage/pipeline_qwenimage.py::QwenImagePipeline._get_qwen_prompt_embeds (Apache-2.0)  # noqa: E501
    @torch.no_grad()
    def encode(self, prompts: list[str], extras: list[dict] | None = None) -> dict[str, torch.Tensor]:
        """`prompt_embeds` (B, max_sequence_length, D) in the cache dtype, zero after the valid tokens,
        and `prompt_embeds_mask` (B, max_sequence_length) int64. The empty prompt (the cache's
        unconditional entry) is encoded as `negative_prompt`."""
        texts = [PROMPT_TEMPLATE.format(self.negative_prompt if p == EMPTY_PROMPT else p) for p in prompts]
        tokens = self.tokenizer(texts, max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_DROP, padding=True,
                                truncation=True, return_tensors="pt")
        ids, attention = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
        length = self.max_sequence_length
        embeds = hidden.new_zeros(len(prompts), length, hidden.shape[-1])
        mask = torch.zeros(len(prompts), length, dtype=torch.int64, device=hidden.device)
        for row in range(len(prompts)):
            valid = hidden[row][attention[row].bool()][TEMPLATE_DROP:][:length]
            embeds[row, :len(valid)] = valid
            mask[row, :len(valid)] = 1
        return {"prompt_embeds": embeds.to(self.dtype), "prompt_embeds_mask": mask}


# ---------------------------------------------------------------------------------------------
# The spec: published configs and shapes (memory estimate)

# huggingface.co/Qwen/Qwen-Image/blob/main/transformer/config.json (its pooled_projection_dim, which the class
# does not take, left out)
QWEN_IMAGE_TRANSFORMER = dict(
    attention_head_dim=128, axes_dims_rope=(16, 56, 56), guidance_embeds=False, in_channels=64,
    joint_attention_dim=3584, num_attention_heads=24, num_layers=60, out_channels=16, patch_size=2)
# huggingface.co/Qwen/Qwen-Image/blob/main/vae/config.json
QWEN_IMAGE_VAE = dict(   # lists, as config.json gives them (the class concatenates dim_mult to a list)
    attn_scales=[], base_dim=96, dim_mult=[1, 2, 4, 4], dropout=0.0, num_res_blocks=2,
    temperal_downsample=[False, True, True], z_dim=16,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                  -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                 1.6382, 1.1253, 2.8251, 1.916])
TEXT_TOKENS = 512    # the text sequence of the prompt cache (QwenImagePromptEncoder's max_sequence_length)
TEXT_WIDTH = 3584    # Qwen2.5-VL-7B's hidden size (the transformer's joint_attention_dim)


def denoiser_inputs(config: dict, options: dict, rows: int) -> dict:
    """Random QwenImageTransformer2DModel inputs for `rows` transformer rows (CFG: 2 per sample) at
    options' height x width, with the text at the cache's full length: an upper bound, since
    `encode_prompts` trims it to the longest prompt of the batch (host tensors)."""
    h, w = options["height"] // 16, options["width"] // 16   # VAE 8x, then 2x2 packing
    text = options.get("max_sequence_length", TEXT_TOKENS)
    return dict(hidden_states=torch.randn(rows, h * w, config["in_channels"]),
                encoder_hidden_states=torch.randn(rows, text, config["joint_attention_dim"]),
                encoder_hidden_states_mask=torch.ones(rows, text, dtype=torch.int64),
                timestep=torch.full((rows,), 0.5), img_shapes=[[(1, h, w)]] * rows, return_dict=False)


def latent_numel(options: dict) -> int:
    """16 latent channels x (H/8) x (W/8): Qwen-Image's VAE."""
    return 16 * (options["height"] // 8) * (options["width"] // 8)


def cond_bytes(options: dict) -> int:
    """The prompt's and the negative prompt's text as the cache stores them: bf16 sequence (3584 wide)
    and int64 mask, each max_sequence_length long."""
    return 2 * options.get("max_sequence_length", TEXT_TOKENS) * (TEXT_WIDTH * 2 + 8)


def exponential_shift(image_tokens: int, base_seq_len: int = 256, max_seq_len: int = 8192, base_shift: float = 0.5,
                      max_shift: float = 0.9) -> float:
    """The static `sampler.shift` equal to the pipeline's exponential time shift at `image_tokens`:
    exp(mu), mu = calculate_shift(image_tokens, ...) of diffusers' pipeline_qwenimage.py (linear in
    the token count); the defaults are Qwen/Qwen-Image's scheduler_config.json. The exponential
    shift e^mu / (e^mu + 1/sigma - 1) is the static shift s sigma / (1 + (s - 1) sigma) at s = e^mu."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + slope * (image_tokens - base_seq_len))



# FLOPs and parameters of diffusers' QwenImageTransformer2DModel (transformer_qwenimage.py, v0.42): its
# blocks are FLUX's double-stream blocks (AdaLN-Zero 6d per stream, q/k/v/out per stream with RMS QK-norms,
# MLP 4d), so transformer_costs counts them; tests compare with torch.utils.flop_counter and sum(numel).
def token_counts(config: dict, options: dict) -> tuple[int, int]:
    """(image tokens, text tokens): the VAE's 8x compression, then p x p packing; the text at the cache's
    full length (an upper bound: `encode_prompts` trims it to the batch's longest prompt)."""
    p = config["patch_size"]
    return ((options["height"] // 8 // p) * (options["width"] // 8 // p),
            options.get("max_sequence_length", TEXT_TOKENS))


def forward_flops(config: dict, image_tokens: int, text_tokens: int) -> int:
    """One sample's forward: the timestep embedder, the image and text input projections, the
    double-stream blocks on N = N_i + N_t tokens, the output modulation and projection."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    out = config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])
    return (costs.embedder_flops(256, d) + costs.lin(image_tokens, config["in_channels"], d)
            + costs.lin(text_tokens, config["joint_attention_dim"], d)
            + config["num_layers"] * costs.double_block_flops(image_tokens + text_tokens, d, 4 * d)
            + costs.lin(1, d, 2 * d) + costs.lin(image_tokens, d, out))


def block_parameter_counts(config: dict) -> list[int]:
    """Each QwenImageTransformerBlock (a FLUX double-stream block)."""
    d, head_dim = config["num_attention_heads"] * config["attention_head_dim"], config["attention_head_dim"]
    return [costs.double_block_params(d, head_dim, 4 * d)] * config["num_layers"]


def parameter_count(config: dict) -> int:
    """Blocks, the timestep embedder (and Qwen-Image-Edit's 2-row addition table), the text RMS norm,
    the input projections and the output head."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    out = config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])
    return (sum(block_parameter_counts(config)) + costs.embedder_params(256, d)
            + (2 * d if config.get("use_additional_t_cond") else 0) + config["joint_attention_dim"]
            + costs.linear_params(config["in_channels"], d) + costs.linear_params(config["joint_attention_dim"], d)
            + costs.linear_params(d, 2 * d) + costs.linear_params(d, out))


def attention_layers(config: dict) -> int:
    """Joint (image + text) attention layers: one per block."""
    return config["num_layers"]


# tests/tiny_models.py's Qwen-Image transformer.
TINY_TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4))


SPEC = ModelSpec(
    name="qwen_image",
    load=QwenImageGenerator.from_pretrained,
    prompt_encoder=QwenImagePromptEncoder,
    cfg=QwenImageGenerator.needs_empty_prompt,
    default_options=option_defaults(QwenImageOptions),
    attention_masked=QwenImageGenerator.attention_masked,
    denoiser_class="QwenImageTransformer2DModel",
    denoiser_config=QWEN_IMAGE_TRANSFORMER,
    vae_class="AutoencoderKLQwenImage",
    vae_config=QWEN_IMAGE_VAE,
    checkpointed_blocks="each of the 60 dual-stream transformer blocks",
    text_tokens=TEXT_TOKENS,
    # each QwenImageTransformerBlock: the units diffusers' gradient checkpointing wraps
    denoiser_blocks={"QwenImageTransformer2DModel": BlockLists("transformer_blocks")},
    denoiser_inputs=denoiser_inputs,
    latent_numel=latent_numel,
    cond_bytes=cond_bytes,
    token_counts=token_counts,
    forward_flops=forward_flops,
    parameter_count=parameter_count,
    block_parameter_counts=block_parameter_counts,
    attention_layers=attention_layers,
    bench_recipe="configs/qwen_image.yaml",
    tiny_config=TINY_TRANSFORMER,
    tiny_options=dict(height=64, width=64, max_sequence_length=8),
    tiny_batch=2,
)
