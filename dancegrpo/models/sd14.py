"""Stable Diffusion v1.4: UNet2DConditionModel, epsilon prediction, DDIM, classifier-free guidance.

CFG runs in sampling and in training alike, with the unconditional and conditional passes
batched into one UNet call (`[uncond; cond]`, the authors' layout), so both branches get
gradients and the recomputed log-probs equal the rollout's. The unconditional embedding is
the empty prompt's, read from the prompt cache like every other prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import Conditioning
from .checkpoint_layout import Component, read_json
from .diffusers_generator import DiffusersGenerator, GeneratorOptions, check_resolution, vae_spatial_factor
from .options import at_least
from .spec import ModelSpec, option_defaults

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel


@dataclass
class SD14Options(GeneratorOptions):
    height: int = 512                  # SD v1.4's native resolution (the authors' SD script)
    width: int = 512
    cfg_scale: float = 5.0             # the authors' SD config (sample.guidance_scale = 5.0)

    checks = {"cfg_scale": at_least(1, "1 = no guidance")}


class SD14Generator(DiffusersGenerator):
    """Adapter for Stable Diffusion v1.x checkpoints (CompVis/stable-diffusion-v1-4 layout)."""

    prediction = "ddim"
    model_name = "sd14"
    denoiser_attr = "unet"
    options_class = SD14Options
    needs_empty_prompt = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def components(cls) -> list[Component]:
        return super().components() + [Component("scheduler", "scheduler")]

    @classmethod
    def check_before_loading(cls, root: Path, options, denoiser_config: dict, vae_config: dict) -> None:
        factor = vae_spatial_factor(vae_config)
        check_resolution(cls.model_name, options.height, options.width, factor, f"VAE factor {factor}")
        scheduler = read_json(root / "scheduler" / "scheduler_config.json")
        check_scheduler_matches_sampler(scheduler, root)

    @classmethod
    def load_denoiser(cls, root: Path) -> UNet2DConditionModel:
        from diffusers import UNet2DConditionModel
        return UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", torch_dtype=torch.float32)

    @classmethod
    def load_vae(cls, root: Path, dtype: torch.dtype) -> AutoencoderKL:
        from diffusers import AutoencoderKL
        return AutoencoderKL.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype)

    def negative_keys(self) -> tuple[str, ...]:
        return ("prompt_embeds",)

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.unet.config.in_channels, self.options.height // self.vae_factor,
                self.options.width // self.vae_factor)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Guided epsilon: uncond + s * (cond - uncond), both from one batched UNet call."""
        text = cond["prompt_embeds"].to(latents.dtype)
        t = t.expand(latents.shape[0])
        if self.options.cfg_scale == 1.0:
            return self.unet(latents, t, encoder_hidden_states=text, return_dict=False)[0]
        uncond_text = cond["negative_prompt_embeds"].to(latents.dtype)
        eps = self.unet(torch.cat([latents, latents]), torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([uncond_text, text]), return_dict=False)[0]
        uncond, conditional = eps.chunk(2)
        return uncond + self.options.cfg_scale * (conditional - uncond)

    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        scaled = latents / self.vae.config.scaling_factor
        pixels = self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]
        return (pixels.float() / 2 + 0.5).clamp(0, 1)


def check_scheduler_matches_sampler(scheduler: dict, root: Path) -> None:
    """The trainer's DDIM sampler uses SD v1's noise schedule; refuse a checkpoint trained on another."""
    expected = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1}
    defaults = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                "prediction_type": "epsilon", "steps_offset": 0}
    wrong = []
    for key, want in expected.items():
        have = scheduler.get(key, defaults[key])
        if (abs(have - want) > 1e-9) if isinstance(want, float) else have != want:
            wrong.append(f"{key} = {have!r} (expected {want!r})")
    if wrong:
        raise ValueError(f"sd14: {root / 'scheduler' / 'scheduler_config.json'} does not match the DDIM sampler's "
                         f"Stable Diffusion v1 schedule: {', '.join(wrong)}")


class SD14PromptEncoder:
    """CLIP text encoder's last hidden state, as StableDiffusionPipeline.encode_prompt computes it."""

    model_name = "sd14"
    default_dtype = "float32"

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype):
        from transformers import AutoTokenizer, CLIPTextModel
        self.device, self.dtype = device, dtype
        self.tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        self.text_encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder")).to(device, dtype).eval()

    @staticmethod
    def components() -> list[Component]:
        return [Component("text_encoder", "model"), Component("tokenizer", "tokenizer")]

    def meta(self) -> dict:
        return {}

    # Adapted from diffusers src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py::StableDiffusionPipeline.encode_prompt (Apache-2.0)  # noqa: E501
    @torch.no_grad()
    def encode(self, prompts: list[str], extras: list[dict] | None = None) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return {"prompt_embeds": hidden.to(self.dtype)}


# ---------------------------------------------------------------------------------------------
# The spec: published configs and shapes (memory estimate)

# huggingface.co/CompVis/stable-diffusion-v1-4/blob/main/unet/config.json
SD14_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
# huggingface.co/CompVis/stable-diffusion-v1-4/blob/main/vae/config.json
SD14_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=("UpDecoderBlock2D",) * 4)
TEXT_TOKENS = 77   # CLIP's padded prompt length (tokenizer.model_max_length)


def denoiser_inputs(config: dict, options: dict, rows: int) -> dict:
    """Random UNet2DConditionModel inputs for `rows` samples at options' height x width (host tensors)."""
    t = torch.full((rows,), 0.5)
    return dict(sample=torch.randn(rows, config["in_channels"], options["height"] // 8, options["width"] // 8),
                timestep=t * 1000, encoder_hidden_states=torch.randn(rows, TEXT_TOKENS, config["cross_attention_dim"]),
                return_dict=False)


def latent_numel(options: dict) -> int:
    """4 latent channels x (H/8) x (W/8): SD v1's VAE."""
    return 4 * (options["height"] // 8) * (options["width"] // 8)


def cond_bytes(options: dict) -> int:
    """CLIP's last hidden state (77 x 768) in the fp32 cache, plus the empty prompt's for CFG."""
    return 2 * TEXT_TOKENS * 768 * 4


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """Each ResNet block and each attention (Transformer2DModel) block of the UNet's down, mid and up
    stages, in execution order: the units diffusers' own gradient checkpointing wraps (or, for the
    attention blocks, the modules around them). The mid block runs resnet, (attention, resnet)*; the
    down and up blocks (resnet, attention?)*."""
    blocks: list[nn.Module] = []
    for stage in [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]:
        resnets = list(getattr(stage, "resnets", None) or [])
        attentions = list(getattr(stage, "attentions", None) or [])
        if attentions and len(attentions) == len(resnets) - 1:    # the mid block: resnet, (attn, resnet)*
            blocks.append(resnets[0])
            for attn, res in zip(attentions, resnets[1:]):
                blocks += [attn, res]
        else:                                                       # down/up blocks: (resnet, attn?)*
            for i, res in enumerate(resnets):
                blocks.append(res)
                if i < len(attentions):
                    blocks.append(attentions[i])
    return blocks


SPEC = ModelSpec(
    name="sd14",
    load=SD14Generator.from_pretrained,
    prompt_encoder=SD14PromptEncoder,
    cfg=SD14Generator.needs_empty_prompt,
    default_options=option_defaults(SD14Options),
    denoiser_class="UNet2DConditionModel",
    denoiser_config=SD14_UNET,
    vae_class="AutoencoderKL",
    vae_config=SD14_VAE,
    checkpointed_blocks="each ResNet block and each transformer block of the UNet",
    text_tokens=TEXT_TOKENS,
    denoiser_blocks={"UNet2DConditionModel": unet_blocks},
    denoiser_inputs=denoiser_inputs,
    latent_numel=latent_numel,
    cond_bytes=cond_bytes,
)
