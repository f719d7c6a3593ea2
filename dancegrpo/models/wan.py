"""Wan 2.1 and 2.2 text-to-video: WanTransformer3DModel (one, or 2.2's two experts), AutoencoderKLWan,
UMT5; flow matching with real classifier-free guidance, as diffusers' WanPipeline.

Latents are (z_dim, 1 + (frames-1)/4, H/8, W/8), normalised by the VAE's `latents_mean` /
`latents_std` (decode: x * std + mean, then the VAE). `frames: 1` is text-to-image. The
transformer's timestep is sigma x `num_train_timesteps` (scheduler/scheduler_config.json: 1000).

Conditioning (`WanPromptEncoder`, as WanPipeline._get_t5_prompt_embeds): the UMT5 last hidden
state of the cleaned prompt, padded to `max_sequence_length` (512) tokens with the states after
each prompt's own tokens set to exactly zero; no attention mask. CFG: the empty prompt (the
pipeline's default negative prompt) runs in the same transformer call as the prompt (2B rows);
guided = uncond + s (cond - uncond), with CFG on iff `cfg_scale` > 1 (the pipeline's rule).

Wan 2.2 two experts (model_index.json `boundary_ratio`, `transformer_2/`): `transformer` (high
noise) denoises timesteps >= boundary_ratio x 1000 with `cfg_scale`, `transformer_2` (low noise)
the rest with `cfg_scale_2` (default: cfg_scale, as the pipeline). A batch whose rows fall on both
sides is split into one call per expert. Choosing the expert reads the timestep on the host (one
small copy per denoiser call, as sliding-tile attention's step lookup), so two-expert models
cannot run in a CUDA-graph rollout (`sampler.cuda_graph`).

The policy of a two-expert model is the experts named in `train_experts` (default: both): each
is fully fine-tuned or gets its own LoRA; an expert left out stays frozen (in `frozen_dtype`),
is never in `trainable` and is linked, not rewritten, by save_pretrained. The frozen KL reference
covers every trained expert (LoRA: all adapters disabled; full: a frozen copy of each).
Refused: Wan 2.2 TI2V-5B (`expand_timesteps: true`, per-token timesteps).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import wan_costs
from .base import Conditioning
from .checkpoint_layout import CheckpointLayoutError, Component, read_json
from .diffusers_generator import DiffusersGenerator, GeneratorOptions, check_frames, check_resolution
from .options import at_least
from .prompt_cache import EMPTY_PROMPT
from .spec import BlockLists, ModelSpec, option_defaults
from .wan_experts import EXPERTS, ExpertSet, frozen_references, prepare_expert, save_experts

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

@dataclass
class WanOptions(GeneratorOptions):
    height: int = 480                  # WanPipeline.__call__ defaults (height=480, width=832, num_frames=81)
    width: int = 832
    frames: int = 81                   # 4k+1 (the VAE compresses time 4x after the first frame); 1 = text-to-image
    cfg_scale: float = 5.0             # WanPipeline.__call__ default guidance_scale=5.0
    cfg_scale_2: float | None = None   # 2.2: the low-noise expert's (pipeline guidance_scale_2); None = cfg_scale
    train_experts: list | None = None  # 2.2: [high], [low] or [high, low]; None = every expert of the checkpoint
    vae_tiling: bool = False           # diffusers' tiled VAE decode (the pipeline does not tile)

    checks = {"frames": at_least(1), "cfg_scale": at_least(1, "1 = no guidance")}

    def problems(self) -> list[str]:
        problems = []
        if self.cfg_scale_2 is not None:
            if not self.cfg_scale_2 >= 1:
                problems.append(f"cfg_scale_2 = {self.cfg_scale_2} must be >= 1 (1 = no guidance) or null")
            elif self.cfg_scale == 1 and self.cfg_scale_2 != 1:
                problems.append(f"cfg_scale_2 = {self.cfg_scale_2} has no effect with cfg_scale = 1: the pipeline "
                                "runs guidance only when guidance_scale (cfg_scale) > 1; set cfg_scale > 1 or drop "
                                "cfg_scale_2")
        if self.train_experts is not None:
            experts = self.train_experts
            if not isinstance(experts, list) or not experts or not set(experts) <= set(EXPERTS) \
                    or len(set(experts)) != len(experts):
                problems.append(f"train_experts = {experts!r} must be a non-empty list of distinct names among "
                                f"{list(EXPERTS)} (high: transformer/, low: transformer_2/) or null (every expert)")
        return problems


class WanGenerator(DiffusersGenerator):
    """Adapter for Wan 2.1 / 2.2 text-to-video checkpoints in the diffusers layout (Wan-AI/Wan2.*-Diffusers)."""

    prediction = "flow"
    model_name = "wan_t2v"
    denoiser_attr = "transformer"
    options_class = WanOptions
    cache_models = ("wan_t2v",)
    needs_empty_prompt = True

    def __init__(self, source: Path, denoiser: nn.Module, vae: nn.Module, cache, options):
        nn.Module.__init__(self)
        self.source, self.options, self.cache = source, options, cache
        self.lora = options.lora_options() if options.lora is not None else None
        index = read_json(source / "model_index.json", self.model_name)
        scheduler = read_json(source / "scheduler" / "scheduler_config.json", self.model_name)
        self.num_train_timesteps = float(scheduler.get("num_train_timesteps", 1000))
        ratio = index.get("boundary_ratio")
        self.boundary_timestep = None if ratio is None else float(ratio) * self.num_train_timesteps
        experts = {"high": denoiser}
        if ratio is not None:
            experts["low"] = self.load_denoiser(source, "transformer_2")
        self.trained = [name for name in EXPERTS if name in experts and name in (options.train_experts or experts)]
        self.vae = vae.requires_grad_(False).eval()
        if options.vae_tiling:
            self.vae.enable_tiling()
        lora_params = {}
        for name, module in experts.items():
            module, lora_params[name] = prepare_expert(self, module, EXPERTS[name], name in self.trained)
            setattr(self, EXPERTS[name], module)
        if ratio is None:
            self.transformer_2 = None
        parts = {EXPERTS[n]: (lora_params[n] if self.lora is not None else getattr(self, EXPERTS[n]))
                 for n in self.trained}
        self._policy = next(iter(parts.values())) if len(parts) == 1 else ExpertSet(parts)
        self.latent_channels = self.vae.config.z_dim
        if EMPTY_PROMPT not in cache:
            raise ValueError(f"prompt cache {str(cache.directory)!r} lacks the empty prompt this model needs for "
                             "classifier-free guidance; rerun `dancegrpo preprocess` (it adds it)")

    # ------------------------------------------------------------------ loading
    @classmethod
    def components(cls) -> list[Component]:
        return [Component("transformer", "model"), Component("vae", "model"), Component("scheduler", "scheduler")]

    @classmethod
    def check_before_loading(cls, root: Path, options, denoiser_config: dict, vae_config: dict) -> None:
        index = read_json(root / "model_index.json", cls.model_name)
        if index.get("expand_timesteps"):
            raise ValueError(f"model {cls.model_name!r}: {root / 'model_index.json'} sets expand_timesteps: true "
                             "(Wan2.2-TI2V-5B: per-token timesteps), which this adapter does not support; use a "
                             "Wan2.1 or Wan2.2-A14B checkpoint")
        two = index.get("boundary_ratio") is not None
        if two:
            missing = Component("transformer_2", "model").missing(root)
            if missing:
                raise CheckpointLayoutError(f"{cls.model_name}: checkpoint {str(root)!r} sets boundary_ratio = "
                                            f"{index['boundary_ratio']} (two experts) but lacks {missing}")
        elif options.cfg_scale_2 is not None:
            raise ValueError(f"model {cls.model_name!r}: cfg_scale_2 = {options.cfg_scale_2} is for two-expert "
                             f"(Wan 2.2) checkpoints; {root / 'model_index.json'} has no boundary_ratio; remove it")
        if options.train_experts is not None and "low" in options.train_experts and not two:
            raise ValueError(f"model {cls.model_name!r}: train_experts = {options.train_experts} names the low-noise "
                             f"expert, but {str(root)!r} has one transformer (no boundary_ratio); use [high] or null")
        factor = vae_config.get("scale_factor_spatial", 8)
        patch = denoiser_config.get("patch_size", [1, 2, 2])[-1]
        check_resolution(cls.model_name, options.height, options.width, factor * patch,
                         f"VAE factor {factor} x patch size {patch}")
        check_frames(cls.model_name, options.frames, vae_config.get("scale_factor_temporal", 4))

    @classmethod
    def load_denoiser(cls, root: Path, subfolder: str = "transformer") -> WanTransformer3DModel:
        from diffusers import WanTransformer3DModel
        return WanTransformer3DModel.from_pretrained(str(root), subfolder=subfolder, torch_dtype=torch.float32)

    @classmethod
    def load_vae(cls, root: Path, dtype: torch.dtype) -> AutoencoderKLWan:
        from diffusers import AutoencoderKLWan
        return AutoencoderKLWan.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype)

    # ------------------------------------------------------------------ protocol
    @property
    def trainable(self) -> nn.Module:
        """The trained expert (its LoRA weights under LoRA), or both as one module (`transformer`, `transformer_2`)."""
        return self._policy

    @property
    def experts(self) -> dict[str, nn.Module]:
        """The checkpoint's experts by attribute name (`transformer`, and `transformer_2` for Wan 2.2)."""
        return {attr: getattr(self, attr) for attr in EXPERTS.values() if getattr(self, attr, None) is not None}

    def frozen_reference(self):
        """The initial policy of every trained expert (LoRA: adapters disabled; full: frozen copies)."""
        return frozen_references(self)

    def check_sampler(self, sampler) -> None:
        """Refuse a training schedule the experts cannot take (called when the run is built): a two-expert
        model in a CUDA-graph rollout (the expert choice reads the timestep on the host), or a stochastic
        (trained) step whose timestep falls on an expert that `train_experts` leaves frozen."""
        if self.boundary_timestep is None:
            return
        if getattr(sampler, "cuda_graph", False):
            raise ValueError(f"{self.model_name}: sampler.cuda_graph = true cannot capture a two-expert (Wan 2.2) "
                             "model: choosing the expert reads the timestep on the host; set sampler.cuda_graph: false")
        every = torch.arange(sampler.num_steps, device=sampler.sigmas.device)
        high = (sampler.model_time(every).float() * self.num_train_timesteps >= self.boundary_timestep).tolist()
        expert = ["high" if h else "low" for h in high]   # as predict chooses; high noise is a prefix of the steps
        frozen = [s for s in sampler.stochastic_steps if expert[s] not in self.trained]
        if frozen:
            own = [s for s in range(sampler.num_steps) if expert[s] in self.trained]
            window = f"[{own[0]}, {own[-1] + 1}]" if own else "(none: no step falls on it)"
            raise ValueError(f"{self.model_name}: train_experts = {self.trained}, but the stochastic (trained) "
                             f"sampling step(s) {frozen} fall on the frozen {expert[frozen[0]]}-noise expert "
                             f"(timesteps >= {self.boundary_timestep:g} are the high-noise expert's); set "
                             f"sampler.sde_window to the trained expert's steps {window}, or train both experts "
                             "(train_experts: null)")

    def negative_keys(self) -> tuple[str, ...]:
        return ("prompt_embeds",)

    def latent_shape(self) -> tuple[int, int, int, int]:
        config = self.vae.config
        spatial, temporal = config.scale_factor_spatial, config.scale_factor_temporal
        return (self.latent_channels, (self.options.frames - 1) // temporal + 1,
                self.options.height // spatial, self.options.width // spatial)

    def denoiser_extras(self, cond: Conditioning, dtype: torch.dtype) -> tuple[torch.Tensor | None, dict]:
        """(extra input channels, extra transformer keyword inputs) of the conditional rows; none for T2V."""
        return None, {}

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Guided velocity (B, *latent_shape) at sigmas `t` (B,), each row from the expert of its timestep."""
        timestep = (t.to(torch.float32) * self.num_train_timesteps).expand(latents.shape[0])
        if self.boundary_timestep is None:
            return self._guided(self.transformer, self.options.cfg_scale, latents, timestep, cond)
        high = (timestep >= self.boundary_timestep).cpu()  # the expert per row: a host decision
        scale_2 = self.options.cfg_scale if self.options.cfg_scale_2 is None else self.options.cfg_scale_2
        if bool(high.all()) or not bool(high.any()):
            if bool(high[0]):
                return self._guided(self.transformer, self.options.cfg_scale, latents, timestep, cond)
            return self._guided(self.transformer_2, scale_2, latents, timestep, cond)
        out = torch.empty_like(latents)
        for rows, expert, scale in ((high, self.transformer, self.options.cfg_scale),
                                    (~high, self.transformer_2, scale_2)):
            index = rows.nonzero().flatten().to(latents.device)
            out[index] = self._guided(expert, scale, latents[index], timestep[index],
                                      {k: v[index] for k, v in cond.items()}).to(out.dtype)
        return out

    def _guided(self, expert: nn.Module, scale: float, latents, timestep, cond: Conditioning) -> torch.Tensor:
        dtype = latents.dtype
        channels, extra = self.denoiser_extras(cond, dtype)
        x = latents if channels is None else torch.cat([latents, channels], dim=1)
        if self.options.cfg_scale == 1.0:  # the pipeline guides only when guidance_scale > 1
            return expert(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                          return_dict=False, **extra)[0]
        text = torch.cat([cond["prompt_embeds"], cond["negative_prompt_embeds"]]).to(dtype)
        both = {key: torch.cat([value, value]) for key, value in extra.items()}
        out = expert(hidden_states=torch.cat([x, x]), timestep=torch.cat([timestep, timestep]),
                     encoder_hidden_states=text, return_dict=False, **both)[0]
        conditional, uncond = out.chunk(2)
        return uncond + scale * (conditional - uncond)

    # Adapted from diffusers src/diffusers/pipelines/wan/pipeline_wan.py::WanPipeline.__call__ (Apache-2.0)
    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        config, device = self.vae.config, latents.device
        mean = torch.tensor(config.latents_mean, device=device).view(1, -1, 1, 1, 1).to(self.vae.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std, device=device).view(1, -1, 1, 1, 1).to(self.vae.dtype)
        video = self.vae.decode(latents.to(self.vae.dtype) / inv_std + mean, return_dict=False)[0]
        video = (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, T, C, H, W)
        return video[:, 0] if self.options.frames == 1 else video

    def save_pretrained(self, directory) -> None:
        """As DiffusersGenerator.save_pretrained, for every trained expert (wan_experts.save_experts)."""
        save_experts(self, directory)


class WanPromptEncoder:
    """UMT5 last hidden states, zero after each prompt's tokens, as WanPipeline.encode_prompt."""

    model_name = "wan_t2v"
    default_dtype = "bfloat16"   # the released text encoder is bf16 (512 x 4096 per prompt)

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, max_sequence_length: int = 512):
        from transformers import AutoTokenizer, UMT5EncoderModel
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length = {max_sequence_length} must be >= 1 (WanPipeline: 512)")
        self.device, self.dtype, self.max_sequence_length = device, dtype, max_sequence_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        self.text_encoder = UMT5EncoderModel.from_pretrained(str(root / "text_encoder")).to(device, dtype).eval()

    @staticmethod
    def components() -> list[Component]:
        return [Component("text_encoder", "model"), Component("tokenizer", "tokenizer")]

    def meta(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    # Adapted from diffusers src/diffusers/pipelines/wan/pipeline_wan.py::WanPipeline._get_t5_prompt_embeds (Apache-2.0)  # noqa: E501
    @torch.no_grad()
    def encode(self, prompts: list[str], extras: list[dict] | None = None) -> dict[str, torch.Tensor]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean
        tokens = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                max_length=self.max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, mask).last_hidden_state.to(self.dtype)
        lengths = mask.gt(0).sum(dim=1)
        kept = torch.arange(hidden.shape[1], device=self.device)[None, :] < lengths[:, None]
        return {"prompt_embeds": torch.where(kept[..., None], hidden, torch.zeros((), dtype=hidden.dtype,
                                                                                   device=self.device))}


# ---------------------------------------------------------------------------------------------
# The spec: published configs and shapes (memory estimate)

# huggingface.co/Wan-AI/Wan2.1-T2V-14B-Diffusers/blob/main/transformer/config.json; each expert of
# Wan2.2-T2V-A14B-Diffusers (transformer/, transformer_2/config.json) has the same config.
WAN_14B_TRANSFORMER = dict(
    added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-6, ffn_dim=13824, freq_dim=256,
    image_dim=None, in_channels=16, num_attention_heads=40, num_layers=40, out_channels=16, patch_size=(1, 2, 2),
    qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, text_dim=4096)
# huggingface.co/Wan-AI/Wan2.1-T2V-1.3B-Diffusers/blob/main/transformer/config.json (the original release's
# wan/configs/wan_t2v_1_3B.py: dim 1536 = 12 heads x 128, ffn_dim 8960, 30 layers): the model the GRPO
# scripts train (configs/wan21_t2v.yaml) and the one the memory estimate builds for wan_t2v.
WAN_1_3B_TRANSFORMER = {**WAN_14B_TRANSFORMER, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
# huggingface.co/Wan-AI/Wan2.1-T2V-14B-Diffusers/blob/main/vae/config.json (Wan 2.1 VAE; Wan2.2-A14B uses it too)
WAN_VAE = dict(
    attn_scales=[], base_dim=96, dim_mult=[1, 2, 4, 4], dropout=0.0, num_res_blocks=2,
    temperal_downsample=[False, True, True], z_dim=16)
TEXT_TOKENS = 512   # WanPipeline's max_sequence_length (the UMT5 sequence of the prompt cache)


def latent_frames(options: dict) -> int:
    """Latent frames of `options["frames"]` video frames: 4x temporal compression after the first frame."""
    return (options.get("frames", 1) - 1) // 4 + 1


def denoiser_inputs(config: dict, options: dict, rows: int) -> dict:
    """Random WanTransformer3DModel inputs for `rows` samples (host tensors); `config["in_channels"]`
    covers image-to-video's extra channels, `config["image_dim"]` its CLIP image tokens (257)."""
    text = options.get("max_sequence_length", TEXT_TOKENS)
    inputs = dict(hidden_states=torch.randn(rows, config["in_channels"], latent_frames(options),
                                            options["height"] // 8, options["width"] // 8),
                  timestep=torch.full((rows,), 500.0),
                  encoder_hidden_states=torch.randn(rows, text, config["text_dim"]),
                  return_dict=False)
    if config.get("image_dim"):
        inputs["encoder_hidden_states_image"] = torch.randn(rows, 257, config["image_dim"])
    return inputs


def latent_numel(options: dict) -> int:
    """16 latent channels x latent frames x (H/8) x (W/8): the Wan 2.1 VAE."""
    return 16 * latent_frames(options) * (options["height"] // 8) * (options["width"] // 8)


def cond_bytes(options: dict) -> int:
    """The UMT5 sequence (4096 wide, bf16) of the prompt and of the empty prompt (CFG)."""
    return 2 * options.get("max_sequence_length", TEXT_TOKENS) * 4096 * 2


SPEC = ModelSpec(
    name="wan_t2v",
    load=WanGenerator.from_pretrained,
    prompt_encoder=WanPromptEncoder,
    cfg=True,
    default_options=option_defaults(WanOptions),
    sequence_parallel=True,
    denoiser_class="WanTransformer3DModel",
    denoiser_config=WAN_1_3B_TRANSFORMER,
    vae_class="AutoencoderKLWan",
    vae_config=WAN_VAE,
    checkpointed_blocks="each WanTransformerBlock",
    text_tokens=TEXT_TOKENS,
    denoiser_blocks={"WanTransformer3DModel": BlockLists("blocks")},   # what diffusers' checkpointing wraps
    denoiser_inputs=denoiser_inputs,
    latent_numel=latent_numel,
    cond_bytes=cond_bytes,
    token_counts=wan_costs.token_counts,
    forward_flops=wan_costs.forward_flops,
    parameter_count=wan_costs.parameter_count,
    block_parameter_counts=wan_costs.block_parameter_counts,
    bench_recipe="configs/wan21_t2v.yaml",
    tiny_config=wan_costs.TINY_T2V,
    tiny_options=wan_costs.TINY_T2V_OPTIONS,
    tiny_batch=2,
)
