"""The recipe-level memory estimate: model state, rollout buffers, measured activations, decoded pixels.

Everything model-specific comes from the model's `ModelSpec` (dancegrpo.models.spec): the
published configs, the denoiser's inputs, the latent and conditioning sizes, the option
defaults and whether it runs CFG. The method is in the package docstring and docs/memory.md.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import get_model_spec, model_names
from .instruments import (StepMemory, count_diffusers_parameters, count_parameters, diffusers_class,
                          measure_training_step)

GiB = 1024 ** 3

#: What the memory estimate reads from a model's spec.
SPEC_FIELDS = ("denoiser_class", "denoiser_config", "vae_class", "vae_config", "denoiser_inputs", "latent_numel",
               "cond_bytes")

# huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/config.json: the backbone of VideoAlign
# (KwaiVGI/VideoReward); its reward head (a few linear outputs) is not counted.
QWEN2_VL_2B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, hidden_act="quick_gelu", mlp_ratio=4,
                       num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2))


def reward_parameters(name: str) -> tuple[int, str]:
    """(parameter count, dtype name) of a reward model as dancegrpo.rewards loads it by default."""
    if name in ("hps", "clip_score"):
        from ..rewards.openclip_compat import OpenCLIP, OpenCLIPConfig
        return count_parameters(lambda: OpenCLIP(OpenCLIPConfig())), "float32"   # ViT-H-14, fp32 by default
    if name.startswith("videoalign"):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        return count_parameters(lambda: Qwen2VLForConditionalGeneration(Qwen2VLConfig(**QWEN2_VL_2B))), "bfloat16"
    raise ValueError(f"reward {name!r}: no size known to the memory estimate (known: hps, clip_score, videoalign_*)")


# ---------------------------------------------------------------------------------------------
# The denoiser calls of the adapters (dancegrpo.models), with fake inputs of the recipe's shapes

def cfg_rows(model_name: str, options: dict, batch: int) -> int:
    """Rows of one denoiser call for `batch` samples: twice the batch for a CFG model whose
    `cfg_scale` != 1 (conditional and unconditional passes in one call, as the adapters run them)."""
    cfg = get_model_spec(model_name).cfg and options.get("cfg_scale", 1.0) != 1.0
    return 2 * batch if cfg else batch


def denoiser_inputs(model_name: str, config: dict, options: dict, batch: int) -> dict:
    """Keyword inputs of one denoiser call for `batch` samples, as the adapter builds them (its
    `ModelSpec.denoiser_inputs`, with `cfg_rows` rows); ValueError for a model without them."""
    spec = get_model_spec(model_name).require("the denoiser inputs", "denoiser_inputs")
    return spec.denoiser_inputs(config, options, cfg_rows(model_name, options, batch))


def measure_denoiser(model_name: str, config: dict, options: dict, batch: int, checkpointing: bool,
                     autocast_dtype: torch.dtype | None = torch.bfloat16, fake: bool = True) -> StepMemory:
    """Activation memory of one training micro-batch of the real denoiser class built from `config`.

    `fake=True` builds and runs it under FakeTensorMode (shapes only: any size runs on a CPU);
    `fake=False` runs real tensors (tiny configs; tests compare the two).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    cls = diffusers_class(get_model_spec(model_name).require("the memory estimate", "denoiser_class").denoiser_class)
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
    """The memory estimate of one YAML recipe (see the package docstring for the method).

    `overrides` are `key=value` config overrides, as `dancegrpo train --set` takes them.
    """
    from ..config import load_config
    cfg = load_config(str(path), overrides)
    name = cfg.model.name
    known = model_names(*SPEC_FIELDS)
    if name not in known:
        raise ValueError(f"{path}: model.name = {name!r}; the memory estimate knows {sorted(known)}")
    spec = get_model_spec(name)
    options = {**spec.default_options, **cfg.model.options}   # the adapter's defaults where the recipe is silent
    if options.get("lora"):
        raise ValueError(f"{path}: LoRA recipes are not covered by the memory estimate yet (full fine-tunes only)")
    t, g = cfg.trainer, cfg.grpo
    micro = t.micro_batch_size
    prompts = prompts_per_device or g.prompts_per_iteration
    samples = prompts * g.group_size
    height, width, frames = options["height"], options["width"], options.get("frames", 0)
    summary = (f"{height}x{width}" + (f"x{frames} frames" if frames > 1 else "") +
               f", micro-batch {micro}" + (" (x2 with CFG)" if cfg_rows(name, options, 1) == 2 else "") +
               f", {prompts} prompts x {g.group_size} samples per iteration, {cfg.sampler.num_steps} steps")
    est = Estimate(recipe=str(path), model=name, summary=summary)

    n_denoiser = count_diffusers_parameters(spec.denoiser_class, spec.denoiser_config)
    n_vae = count_diffusers_parameters(spec.vae_class, spec.vae_config)
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

    latent = spec.latent_numel(options)
    cond = spec.cond_bytes(options)
    steps = cfg.sampler.num_steps
    est.buffers += [
        Row("rollout latents (fp32, every step)", 4 * samples * (steps + 1) * latent,
            f"{samples} samples x {steps + 1} x {latent} x 4 B"),
        Row("rollout log-probs", 4 * samples * steps, f"{samples} x {steps} x 4 B"),
        Row("conditioning per sample", samples * cond,
            f"{samples} x {cond / 2 ** 20:.2f} MiB, as the prompt cache stores it "
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
        try:
            print(format_markdown(estimate_recipe(recipe, args.prompts_per_device)))
        except (ValueError, OSError) as err:  # ConfigError is a ValueError: one line naming the problem
            print(f"memory_estimate: error: {err}", file=sys.stderr)
            return 2
    return 0

