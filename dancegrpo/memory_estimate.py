"""Estimate the peak GPU memory of one training process for a recipe, without a GPU.

    python -m dancegrpo.memory_estimate configs/flux_hps.yaml [more.yaml ...] [--markdown]

Method (docs/memory.md explains it with the results):

- Parameter counts are exact: the real diffusers / transformers classes are built from the
  published config.json of each checkpoint (kept below, each with its source) on the meta
  device, and their parameters counted.
- Model state follows what `dancegrpo.trainer.Trainer` keeps: fp32 master weights (bf16
  autocast), fp32 gradients, AdamW's two fp32 moments, an fp32 EMA copy of every policy
  parameter when `trainer.ema_decay` is set, a frozen fp32 copy of the denoiser when
  `grpo.kl_coef` > 0 (full fine-tune), the VAE in `model.options.frozen_dtype`, the reward
  models, and no text encoders (the prompt cache replaces them).
- Activations are measured, not modelled: one training micro-batch (the recipe's size,
  resolution and frames, CFG batching included) runs forward and backward through the
  real full-size model class under torch's FakeTensorMode, which propagates shapes and
  dtypes without allocating memory. Two instruments watch it:
  `saved_tensor_bytes` (autograd's saved-tensor hooks: the bytes kept for backward) and
  `LiveMemoryTracker` (every storage an operator allocates, until it is freed: the peak
  of live bytes, which also sees transient buffers, the checkpoint boundaries and bf16
  weight copies made by autocast). The run mimics a CUDA training step: bf16 autocast,
  attention with the memory footprint of a fused (flash / memory-efficient) kernel, and
  layer / group norms in fp32 as CUDA autocast runs them (`cuda_like_numerics`).
- The rollout buffers (every step's latent of the whole iteration, the log-probs, the
  per-sample conditioning) and the decoded pixels scored by the rewards are counted from
  the recipe's shapes, as `Trainer.step` holds them.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 1024 ** 3

# ---------------------------------------------------------------------------------------------
# Published configs (config.json of each checkpoint, as diffusers / transformers read them)

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
# huggingface.co/Skywork/SkyReels-V1-Hunyuan-I2V (diffusers transformer/config.json): the HunyuanVideo
# transformer with 32 input channels (16 video latent + 16 image latent); VAE as HunyuanVideo's.
SKYREELS_I2V_TRANSFORMER = {**HUNYUAN_VIDEO_TRANSFORMER, "in_channels": 32}
# huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/config.json: the backbone of VideoAlign
# (KwaiVGI/VideoReward); its reward head (a few linear outputs) is not counted.
QWEN2_VL_2B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, hidden_act="quick_gelu", mlp_ratio=4,
                       num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2))


@dataclass(frozen=True)
class ModelSpec:
    """The classes and published configs of one generator, and how its denoiser is called."""

    denoiser: str                 # diffusers class name
    denoiser_config: dict
    vae: str
    vae_config: dict
    checkpointed_blocks: str      # what diffusers' gradient checkpointing wraps (for the docs)


MODELS = {
    "sd14": ModelSpec("UNet2DConditionModel", SD14_UNET, "AutoencoderKL", SD14_VAE,
                      "each ResNet block and each transformer block of the UNet"),
    "flux": ModelSpec("FluxTransformer2DModel", FLUX_DEV_TRANSFORMER, "AutoencoderKL", FLUX_DEV_VAE,
                      "each double- and single-stream transformer block"),
    "hunyuan_video": ModelSpec("HunyuanVideoTransformer3DModel", HUNYUAN_VIDEO_TRANSFORMER,
                               "AutoencoderKLHunyuanVideo", HUNYUAN_VIDEO_VAE,
                               "each double- and single-stream transformer block"),
    "skyreels_i2v": ModelSpec("HunyuanVideoTransformer3DModel", SKYREELS_I2V_TRANSFORMER,
                              "AutoencoderKLHunyuanVideo", HUNYUAN_VIDEO_VAE,
                              "each double- and single-stream transformer block"),
}


def diffusers_class(name: str) -> type:
    import diffusers
    return getattr(diffusers, name)


# ---------------------------------------------------------------------------------------------
# Parameter counts

def count_parameters(build: Callable[[], nn.Module]) -> int:
    """Exact parameter count of the module `build()` makes, built with fake tensors (no memory).

    FakeTensorMode rather than the meta device: it keeps small constants, so constructors that
    read a scalar back (`float(torch.log(...))`) still run.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        module = build()
    return sum(p.numel() for p in module.parameters())


def count_diffusers_parameters(class_name: str, config: dict) -> int:
    """Exact parameter count of a diffusers model class built from `config`."""
    cls = diffusers_class(class_name)
    return count_parameters(lambda: cls.from_config(config))


def reward_parameters(name: str) -> tuple[int, str]:
    """(parameter count, dtype name) of a reward model as dancegrpo.rewards loads it by default."""
    if name in ("hps", "clip_score"):
        from .rewards.openclip_compat import OpenCLIP, OpenCLIPConfig
        return count_parameters(lambda: OpenCLIP(OpenCLIPConfig())), "float32"   # ViT-H-14, fp32 by default
    if name.startswith("videoalign"):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        return count_parameters(lambda: Qwen2VLForConditionalGeneration(Qwen2VLConfig(**QWEN2_VL_2B))), "bfloat16"
    raise ValueError(f"reward {name!r}: no size known to the memory estimate (known: hps, clip_score, videoalign_*)")


# ---------------------------------------------------------------------------------------------
# Instruments

def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl's address: one key per distinct buffer


def saved_tensor_bytes(step: Callable[[], torch.Tensor], exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes autograd saves for backward while `step()` runs its forward.

    Counts each distinct storage once (views and repeated saves of one buffer share it) and
    leaves out the storages of `exclude` (the parameters: model state, not activations).
    Returns the total; `step`'s result is discarded without a backward.
    """
    excluded = {_storage_key(t) for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in excluded:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


class LiveMemoryTracker(TorchDispatchMode):
    """Live bytes of the storages that operators allocate inside the context, and their peak.

    A storage counts from the operator that creates it until it is freed (a weak reference
    fires). Outputs that alias an input (views, in-place results) allocate nothing.
    Works on real and on fake tensors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_sparse:
                continue
            storage = t.untyped_storage()
            key = _storage_key(t)
            if key in inputs or key in self._live:
                continue
            size = storage.nbytes()
            self._live[key] = weakref.ref(storage, functools.partial(self._freed, key, size))
            self.current += size
            self.peak = max(self.peak, self.current)
        return out

    def _freed(self, key: int, size: int, _ref) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= size


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention with the memory of a fused kernel (flash / memory-efficient):
    saves q, k, v, the output and a float32 log-sum-exp per query, never the attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


@contextlib.contextmanager
def cuda_like_numerics(autocast_dtype: torch.dtype | None) -> Iterator[None]:
    """Make a CPU (fake) run keep the tensors a CUDA training step keeps.

    - attention: a fused kernel's footprint (`_FusedAttention`), in the autocast dtype as CUDA
      autocast runs it; CPU's math fallback would save the full attention matrix.
    - layer_norm, group_norm: in float32, as CUDA autocast runs them (CPU autocast does not).
    """
    originals = {name: getattr(F, name) for name in ("scaled_dot_product_attention", "layer_norm", "group_norm")}

    def autocasting() -> bool:
        return autocast_dtype is not None and torch.is_autocast_enabled("cpu")

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
        q, k, v = query, key, value
        if autocasting():
            q, k, v = q.to(autocast_dtype), k.to(autocast_dtype), v.to(autocast_dtype)
        return _FusedAttention.apply(q, k, v, attn_mask)

    def fp32(name):
        def run(x, *args, **kwargs):
            if not autocasting():
                return originals[name](x, *args, **kwargs)
            args = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: a.float() if isinstance(a, torch.Tensor) else a for k, a in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return originals[name](x.float(), *args, **kwargs)
        return run

    F.scaled_dot_product_attention = attention
    F.layer_norm, F.group_norm = fp32("layer_norm"), fp32("group_norm")
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


@dataclass
class StepMemory:
    """Activation memory of one training micro-batch (bytes), gradients of parameters excluded."""

    saved: int   # kept for backward at the end of the forward (saved-tensor hooks)
    peak: int    # peak live bytes over forward + backward (LiveMemoryTracker)


def measure_training_step(model: nn.Module, forward: Callable[[], torch.Tensor],
                          autocast_dtype: torch.dtype | None = torch.bfloat16) -> StepMemory:
    """Run `forward()` (returning the model output) and a backward, as the trainer does.

    The forward runs under CPU autocast in `autocast_dtype` with `cuda_like_numerics`, the
    backward outside it (as in `Trainer._update`). Parameter gradients are dropped as soon as
    they are accumulated, so `peak` holds activations and temporaries only.
    """
    params = tuple(p for p in model.parameters() if p.requires_grad)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params]
    autocast = torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    try:
        with cuda_like_numerics(autocast_dtype), warnings.catch_warnings():
            # CPU kernels warn about mixed dtypes they cannot fuse; CUDA's would not, and nothing runs here
            warnings.simplefilter("ignore", UserWarning)
            def loss() -> torch.Tensor:
                with autocast:
                    return forward().float().square().mean()  # a latent-sized loss, like the log-prob's
            saved = saved_tensor_bytes(loss, exclude=params)
            with LiveMemoryTracker() as tracker:
                loss().backward()
    finally:
        for hook in hooks:
            hook.remove()
    return StepMemory(saved=saved, peak=tracker.peak)


# ---------------------------------------------------------------------------------------------
# The denoiser calls of the adapters (dancegrpo.models), with fake inputs of the recipe's shapes

def denoiser_inputs(model_name: str, config: dict, options: dict, batch: int) -> dict:
    """Keyword inputs of one denoiser call for `batch` samples, as the adapter builds them.

    CFG models (sd14, skyreels_i2v with cfg_scale != 1) run conditional and unconditional
    passes in one call: twice the batch.
    """
    from .models.toy_flux import latent_image_ids
    cfg = options.get("cfg_scale", 1.0)
    rows = 2 * batch if model_name in ("sd14", "skyreels_i2v") and cfg != 1.0 else batch
    height, width = options["height"], options["width"]
    t = torch.full((rows,), 0.5)
    if model_name == "sd14":
        return dict(sample=torch.randn(rows, config["in_channels"], height // 8, width // 8), timestep=t * 1000,
                    encoder_hidden_states=torch.randn(rows, 77, config["cross_attention_dim"]), return_dict=False)
    if model_name == "flux":
        h, w = height // 8, width // 8
        return dict(hidden_states=torch.randn(rows, h * w // 4, config["in_channels"]),
                    encoder_hidden_states=torch.randn(rows, options.get("max_sequence_length", 512),
                                                      config["joint_attention_dim"]),
                    pooled_projections=torch.randn(rows, config["pooled_projection_dim"]), timestep=t,
                    img_ids=latent_image_ids(h, w), txt_ids=torch.zeros(options.get("max_sequence_length", 512), 3),
                    guidance=torch.full((rows,), 3.5) if config["guidance_embeds"] else None, return_dict=False)
    if model_name in ("hunyuan_video", "skyreels_i2v"):
        frames = (options.get("frames", 1) - 1) // 4 + 1
        text = options.get("max_sequence_length", 256)
        return dict(hidden_states=torch.randn(rows, config["in_channels"], frames, height // 8, width // 8),
                    timestep=t * 1000, encoder_hidden_states=torch.randn(rows, text, config["text_embed_dim"]),
                    encoder_attention_mask=torch.ones(rows, text),
                    pooled_projections=torch.randn(rows, config["pooled_projection_dim"]),
                    guidance=torch.full((rows,), 1000.0), return_dict=False)
    raise ValueError(f"model {model_name!r}: the memory estimate knows {sorted(MODELS)}")


def measure_denoiser(model_name: str, config: dict, options: dict, batch: int, checkpointing: bool,
                     autocast_dtype: torch.dtype | None = torch.bfloat16, fake: bool = True) -> StepMemory:
    """Activation memory of one training micro-batch of the real denoiser class built from `config`.

    `fake=True` builds and runs it under FakeTensorMode (shapes only: any size runs on a CPU);
    `fake=False` runs real tensors (tiny configs; tests compare the two).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    cls = diffusers_class(MODELS[model_name].denoiser)
    with (FakeTensorMode() if fake else contextlib.nullcontext()):
        torch.manual_seed(0)
        model = cls.from_config(config).train()
        if checkpointing:
            # diffusers' own wrapper (non-reentrant torch checkpoint); RNG-state saving is off because
            # fake tensors have no RNG state, which changes nothing measurable here.
            model.enable_gradient_checkpointing(functools.partial(_checkpoint_call))
        inputs = denoiser_inputs(model_name, config, options, batch)
        return measure_training_step(model, lambda: model(**inputs)[0], autocast_dtype)


def _checkpoint_call(module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)


# ---------------------------------------------------------------------------------------------
# The recipe-level estimate

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Row:
    part: str
    bytes: int
    how: str


@dataclass
class Estimate:
    recipe: str
    model: str
    summary: str                       # shapes the estimate is for
    state: list[Row] = field(default_factory=list)       # held for the whole run
    buffers: list[Row] = field(default_factory=list)     # held through one iteration
    activations: dict[bool, StepMemory] = field(default_factory=dict)   # by activation checkpointing
    decoded: Row | None = None         # pixels of the whole iteration while the rewards score them

    def persistent(self) -> int:
        return sum(r.bytes for r in self.state + self.buffers)

    def peak(self, checkpointing: bool) -> int:
        """Persistent memory plus the larger transient phase: the update's activations or scoring."""
        return self.persistent() + max(self.activations[checkpointing].peak, self.decoded.bytes)


def estimate_recipe(path: str | Path, prompts_per_device: int | None = None, overrides: tuple[str, ...] = ()
                    ) -> Estimate:
    """The memory estimate of one YAML recipe (see the module docstring for the method).

    `overrides` are `key=value` config overrides, as `dancegrpo train --set` takes them.
    """
    from .config import load_config
    cfg = load_config(str(path), overrides)
    name = cfg.model.name
    if name not in MODELS:
        raise ValueError(f"{path}: model.name = {name!r}; the memory estimate knows {sorted(MODELS)}")
    spec, options = MODELS[name], dict(cfg.model.options)
    defaults = {"sd14": (512, 512), "flux": (720, 720), "hunyuan_video": (480, 480), "skyreels_i2v": (400, 640)}
    options.setdefault("height", defaults[name][0])
    options.setdefault("width", defaults[name][1])
    if name in ("hunyuan_video", "skyreels_i2v"):
        options.setdefault("frames", 53)
    if options.get("lora"):
        raise ValueError(f"{path}: LoRA recipes are not covered by the memory estimate yet (full fine-tunes only)")
    t, g = cfg.trainer, cfg.grpo
    micro = t.micro_batch_size
    prompts = prompts_per_device or g.prompts_per_iteration
    samples = prompts * g.group_size
    height, width, frames = options["height"], options["width"], options.get("frames", 0)
    summary = (f"{height}x{width}" + (f"x{frames} frames" if frames > 1 else "") +
               f", micro-batch {micro}" + (" (x2 with CFG)" if options.get("cfg_scale", 1.0) != 1.0 else "") +
               f", {prompts} prompts x {g.group_size} samples per iteration, {cfg.sampler.num_steps} steps")
    est = Estimate(recipe=str(path), model=name, summary=summary)

    n_denoiser = count_diffusers_parameters(spec.denoiser, spec.denoiser_config)
    n_vae = count_diffusers_parameters(spec.vae, spec.vae_config)
    gp = f"{n_denoiser / 1e9:.3f} B params"
    est.state += [
        Row("denoiser weights (fp32 master)", 4 * n_denoiser, f"{gp} x 4 B"),
        Row("gradients (fp32)", 4 * n_denoiser, f"{gp} x 4 B"),
        Row("AdamW moments (fp32 exp_avg + exp_avg_sq)", 8 * n_denoiser, f"{gp} x 8 B"),
    ]
    if t.ema_decay:
        est.state.append(Row("EMA copy (fp32)", 4 * n_denoiser, f"trainer.ema_decay = {t.ema_decay}: {gp} x 4 B"))
    if g.kl_coef > 0:
        est.state.append(Row("frozen reference copy (fp32)", 4 * n_denoiser, f"grpo.kl_coef = {g.kl_coef}: {gp} x 4 B"))
    frozen = options.get("frozen_dtype", "float32")
    est.state.append(Row(f"VAE ({frozen}, frozen)", DTYPE_BYTES[frozen] * n_vae,
                         f"{n_vae / 1e6:.1f} M params x {DTYPE_BYTES[frozen]} B"))
    for reward in cfg.rewards:
        n_reward, dtype = reward_parameters(reward.name)
        dtype = reward.options.get("dtype", dtype)
        est.state.append(Row(f"reward {reward.name} ({dtype})", DTYPE_BYTES[dtype] * n_reward,
                             f"{n_reward / 1e9:.3f} B params x {DTYPE_BYTES[dtype]} B"))
    est.state.append(Row("text encoders", 0, "none: prompts come from the prompt cache"))

    latent = _latent_numel(name, options)
    steps = cfg.sampler.num_steps
    est.buffers += [
        Row("rollout latents (fp32, every step)", 4 * samples * (steps + 1) * latent,
            f"{samples} samples x {steps + 1} x {latent} x 4 B"),
        Row("rollout log-probs", 4 * samples * steps, f"{samples} x {steps} x 4 B"),
        Row("conditioning per sample", samples * _cond_bytes(name, options),
            f"{samples} x {_cond_bytes(name, options) / 2 ** 20:.2f} MiB, as the prompt cache stores it "
            "(CFG: plus the empty prompt's)"),
    ]
    pixels = 3 * height * width * max(frames, 1)
    if getattr(t, "overlap_rewards", False):   # one chunk decoded and scored at a time
        est.decoded = Row("decoded pixels for the rewards (fp32)", 4 * micro * pixels,
                          f"{micro} x {pixels} x 4 B (trainer.overlap_rewards: one chunk at a time)")
    else:
        est.decoded = Row("decoded pixels for the rewards (fp32)", 4 * samples * pixels,
                          f"{samples} x {pixels} x 4 B (all samples decoded before scoring)")
    for checkpointing in (False, True):
        est.activations[checkpointing] = measure_denoiser(name, spec.denoiser_config, options, micro, checkpointing)
    return est


def _latent_numel(name: str, options: dict) -> int:
    h, w = options["height"] // 8, options["width"] // 8
    if name == "sd14":
        return 4 * h * w
    if name == "flux":
        return 16 * h * w
    return 16 * ((options["frames"] - 1) // 4 + 1) * h * w


def _cond_bytes(name: str, options: dict) -> int:
    """Bytes of one sample's conditioning as the prompt cache stores it (bf16 unless float32)."""
    if name == "sd14":   # CLIP last hidden state, fp32 cache, plus the empty prompt's for CFG
        return 2 * 77 * 768 * 4
    if name == "flux":   # T5 sequence + CLIP pooled, bf16
        return (options.get("max_sequence_length", 512) * 4096 + 768) * 2
    text = options.get("max_sequence_length", 256)
    one = (text * 4096 + 768) * 2 + text * 8   # Llama sequence + CLIP pooled (bf16) + int64 mask
    if name == "skyreels_i2v":   # + the empty prompt's text for CFG and the image latent
        return 2 * one + 16 * (options["height"] // 8) * (options["width"] // 8) * 2
    return one


# ---------------------------------------------------------------------------------------------
# Output

def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def format_markdown(est: Estimate) -> str:
    """A markdown table of one estimate."""
    lines = [f"### `{est.recipe}` ({est.model})", "", est.summary, "",
             "| part | GiB | how |", "|---|---:|---|"]
    lines += [f"| {r.part} | {_gib(r.bytes)} | {r.how} |" for r in est.state + est.buffers]
    for ac in (False, True):
        m = est.activations[ac]
        lines.append(f"| activations, {'with' if ac else 'without'} activation checkpointing | {_gib(m.peak)} | "
                     f"measured peak over forward + backward (saved for backward: {_gib(m.saved)} GiB) |")
    lines.append(f"| {est.decoded.part} | {_gib(est.decoded.bytes)} | {est.decoded.how} |")
    for ac in (False, True):
        lines.append(f"| **peak, {'with' if ac else 'without'} activation checkpointing** | "
                     f"**{_gib(est.peak(ac))}** | persistent + max(activations, decoded pixels) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dancegrpo.memory_estimate",
                                     description="estimated peak GPU memory per training process of recipes")
    parser.add_argument("recipes", nargs="+", help="YAML recipes, e.g. configs/flux_hps.yaml")
    parser.add_argument("--prompts-per-device", type=int, default=None,
                        help="prompts one process rolls out per iteration (default: grpo.prompts_per_iteration, "
                             "as the single-process trainer does)")
    args = parser.parse_args(argv)
    for recipe in args.recipes:
        print(format_markdown(estimate_recipe(recipe, args.prompts_per_device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
