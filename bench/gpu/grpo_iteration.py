"""(e) One whole GRPO iteration of the FLUX.1-dev recipe on one GPU, in images per GPU-second.

What runs: dancegrpo.trainer.Trainer.step() on configs/flux_hps.yaml's settings (16 sampler
steps, eta, shift, the group size 12, tau 0.6, clip range, 4 optimizer updates per
iteration, micro-batch 1, bf16 autocast, gradient checkpointing, 720x720), with one prompt
group per iteration on the GPU, on a FluxGenerator built in memory:

- the transformer: diffusers' FluxTransformer2DModel from FLUX.1-dev's published config
  (dancegrpo.models.flux.FLUX_DEV_TRANSFORMER, 12 B parameters), random weights;
- the VAE: AutoencoderKL from FLUX.1-dev's VAE config, random weights, bf16;
- the conditioning: a prompt cache of random T5 sequences (512 x 4096) and CLIP pooled
  vectors (768), written here (no text encoder runs in training, as with a real cache);
- the reward: an open_clip ViT-H-14 (dancegrpo.rewards.openclip_compat, HPS v2.1's
  architecture, ~1 B parameters, bf16) with random weights, through the HPS reward class
  (OpenCLIPCosineReward, HPS's pad-to-224 transform); prompts are tokenized by a stand-in
  (no tokenizer files offline), which changes no tensor shape.

Weights: the recipe keeps fp32 master weights and fp32 AdamW state, about 16 bytes per
parameter (~190 GB for 12 B): more than one GPU holds. Here the denoiser's weights and
AdamW state are bf16 ("full-bf16", ~100 GB with activations, needs >= 120 GiB of device
memory, e.g. an H200); on a smaller GPU the release's LoRA setting (rank 128, alpha 256 on the
bf16 base) runs instead ("lora"). The optimizer step is a small part of the iteration either way.

Reported: seconds per iteration, images per GPU-second (= images / seconds), its split into
rollout, reward and update (the trainer's timings), the model FLOPs of the iteration
(rollout: 16 forwards per image; training: ceil(tau * 16) steps x 3 forwards per image;
bench.throughput.forward_flops), the MFU they make, and the bound at 100% MFU; with gradient
checkpointing the GPU also recomputes one forward per trained step (the "hardware" FLOPs, HFU
and the bound with recompute). For reference:
the authors' release, about 0.056 images per GPU-second on H800s (200 iterations in 12 h on 16 GPUs).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch
import yaml

from .common import Context, markdown_table, sync

NAME = "grpo_iteration"
TITLE = "(e) One GRPO iteration of the FLUX.1-dev recipe on one GPU"
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "flux_hps.yaml"
PROMPTS = ["a red fox sleeping in fresh snow", "a lighthouse on a cliff at dawn", "a bowl of ramen, studio photo"]
RELEASE_IMAGES_PER_GPU_S = 0.056
FULL_BF16_MIN_GIB = 120

# Tiny stand-ins (the CPU smoke run): same classes, small widths.
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=0.36, shift_factor=0.11)
TINY_SIZE = 32   # pixels; VAE factor 2 and 2x2 packing: 64 tokens


def units(ctx: Context) -> list[str]:
    return ["flux_recipe"]


class _StandInTokenizer:
    """Token ids of open_clip's layout (start, ..., end = the largest id, zero padding) from the
    prompt's bytes: the real BPE files are not at hand offline; the reward's cost does not depend on them."""

    def __init__(self, context_length: int, vocab_size: int):
        self.context_length, self.vocab_size = context_length, vocab_size

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.context_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            body = [1 + b % (self.vocab_size - 3) for b in prompt.encode()][: self.context_length - 2]
            tokens = [self.vocab_size - 2, *body, self.vocab_size - 1]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


def _reward(ctx: Context, dtype: torch.dtype):
    from dancegrpo.rewards.clip_rewards import OpenCLIPCosineReward
    from dancegrpo.rewards.image_transforms import ImageTransform
    from dancegrpo.rewards.openclip_compat import OpenCLIP, OpenCLIPConfig, TextConfig, VisionConfig
    cfg = OpenCLIPConfig() if not ctx.tiny else OpenCLIPConfig(
        embed_dim=16, vision_cfg=VisionConfig(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
        text_cfg=TextConfig(context_length=16, vocab_size=1000, width=32, heads=2, layers=1))
    torch.manual_seed(1)
    with torch.device(ctx.device):
        model = OpenCLIP(cfg)
    model = model.to(dtype).eval().requires_grad_(False)
    size = cfg.vision_cfg.image_size
    reward = OpenCLIPCosineReward(model, _StandInTokenizer(cfg.text_cfg.context_length, cfg.text_cfg.vocab_size),
                                  ImageTransform(crop_size=(size, size), resize_to=size, mode="pad"),
                                  dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    return reward, sum(p.numel() for p in model.parameters())


def _weights_mode(ctx: Context) -> str:
    wanted = ctx.options.get("grpo_weights", "auto")
    if wanted != "auto":
        return wanted
    if not ctx.cuda:
        return "full"
    total = torch.cuda.get_device_properties(ctx.device).total_memory / 2 ** 30
    return "full-bf16" if total >= FULL_BF16_MIN_GIB else "lora"


def _adapter(ctx: Context, tmp: Path, recipe: dict, mode: str):
    from diffusers import AutoencoderKL

    from bench import throughput
    from dancegrpo.models import get_model_spec
    from dancegrpo.models.diffusers_generator import parse_options
    from dancegrpo.models.flux import FluxGenerator, FluxOptions
    from dancegrpo.models.prompt_cache import PromptCache, PromptCacheWriter

    work = throughput.recipe_workload("flux", tiny=ctx.tiny)
    gpu_dtype = torch.bfloat16 if ctx.cuda else torch.float32
    denoiser = throughput.build_denoiser(work, ctx.device, gpu_dtype)
    options = dict(recipe["model"]["options"])
    if ctx.tiny:
        options.update(height=TINY_SIZE, width=TINY_SIZE)
    options.update(prompt_cache=str(tmp / "cache"), frozen_dtype="bfloat16" if ctx.cuda else "float32")
    if mode == "lora":
        options["lora"] = {"rank": 128, "alpha": 256.0}
    known = {f.name for f in dataclasses.fields(FluxOptions)}
    attention = ctx.options.get("attention_backend")
    if "attention_backend" in known:
        if attention:
            options["attention_backend"] = attention
        attention_note = attention or "the adapter's default"
    else:
        attention_note = "torch default (no model.options.attention_backend in this checkout)"
    # The prompt cache: random conditioning of the transformer's widths.
    config = denoiser.config
    text_tokens = work.options.get("max_sequence_length", 512) if ctx.tiny else 512
    writer = PromptCacheWriter(tmp / "cache", "flux", meta={"max_sequence_length": text_tokens})
    gen = torch.Generator().manual_seed(2)
    writer.add(PROMPTS, {
        "prompt_embeds": torch.randn(len(PROMPTS), text_tokens, config.joint_attention_dim,
                                     generator=gen, device="cpu").to(gpu_dtype),
        "pooled_embeds": torch.randn(len(PROMPTS), config.pooled_projection_dim, generator=gen, device="cpu").to(gpu_dtype)})
    writer.close()
    torch.manual_seed(3)
    with torch.device(ctx.device):
        vae = AutoencoderKL.from_config(TINY_VAE if ctx.tiny else get_model_spec("flux").vae_config)
    vae = vae.to(gpu_dtype)
    opts = parse_options(FluxOptions, "flux", options)
    adapter = FluxGenerator(tmp, denoiser, vae, PromptCache(tmp / "cache", ("flux",)), opts)
    return adapter, options, attention_note, work


def run_unit(ctx: Context, unit: str) -> list[dict]:
    from bench import throughput
    from bench.machine import device_name
    from dancegrpo.trainer import Trainer

    recipe = yaml.safe_load(RECIPE.read_text())
    mode = _weights_mode(ctx)
    prompts = int(ctx.options.get("grpo_prompts", 1))
    iterations = int(ctx.options.get("grpo_iterations", 1))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        adapter, options, attention, work = _adapter(ctx, tmp, recipe, mode)
        reward, reward_params = _reward(ctx, torch.bfloat16 if ctx.cuda else torch.float32)
        cfg = copy.deepcopy(recipe)
        cfg["run"].update(output_dir=str(tmp / "run"), device=str(ctx.device))
        if not ctx.cuda:
            cfg["run"]["autocast_dtype"] = "none"   # the CPU smoke run: float32 throughout
        cfg["model"].update(path=str(tmp), options=options)
        cfg["data"] = {"train_prompts": str(tmp / "cache" / "prompts.txt"), "eval_prompts": None}
        cfg["rewards"] = [{"name": "hps_sized"}]
        cfg["grpo"]["prompts_per_iteration"] = prompts
        trainer = Trainer(cfg, rewards={"hps_sized": reward}, adapter=adapter)
        g, s = trainer.cfg.grpo, trainer.cfg.sampler
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        per_iteration = []
        for _ in range(iterations):
            sync(ctx.device)
            start = time.perf_counter()
            metrics = trainer.step()
            sync(ctx.device)
            per_iteration.append((time.perf_counter() - start, metrics))
        peak_gib = torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30 if ctx.cuda else None
        trainable = sum(p.numel() for p in trainer.params)
        _, h, w = adapter.latent_shape()
        image_tokens, text_tokens = (h // 2) * (w // 2), adapter.cache.lookup(PROMPTS[:1])["prompt_embeds"].shape[1]
    seconds, metrics = per_iteration[-1]
    images = prompts * g.group_size
    forward = throughput.forward_flops("flux", work.config, image_tokens, text_tokens, 1)
    trained_steps = math.ceil(g.tau * len(trainer.sampler.stochastic_steps) - 1e-9)
    flops_per_image = forward * (s.num_steps + 3 * trained_steps)
    # what the GPU computes: + 1 forward per trained step when activations are recomputed
    recompute = trained_steps if options.get("gradient_checkpointing") else 0
    hardware_flops_per_image = flops_per_image + forward * recompute
    peak = throughput.peak_tflops(device_name(ctx.device)) if ctx.cuda else None
    reward_name = next(iter(k for k in metrics if k.startswith("reward/") and k.endswith("_mean")), None)
    valid = metrics.get("updates") == trainer.cfg.trainer.updates_per_iteration and metrics.get("skipped_updates") == 0
    row = dict(model="flux", weights=mode, resolution=f"{options['height']}x{options['width']}",
               prompts=prompts, group_size=g.group_size, images=images, sampler_steps=s.num_steps, tau=g.tau,
               trained_steps=trained_steps, updates=metrics.get("updates"),
               micro_batch=trainer.cfg.trainer.micro_batch_size,
               autocast=trainer.cfg.run.autocast_dtype, trainable_params=trainable, reward_params=reward_params,
               attention=attention, iterations=iterations,
               iteration_s=seconds, images_per_gpu_s=images / seconds,
               rollout_s=metrics.get("time/rollout"), reward_s=metrics.get("time/reward"),
               update_s=metrics.get("time/update"), all_iteration_s=" ".join(f"{t:.3f}" for t, _ in per_iteration),
               model_tflop_per_image=flops_per_image / 1e12,
               mfu=(flops_per_image * images / seconds / (peak * 1e12)) if peak else None,
               bound_images_per_gpu_s_at_100pct_mfu=(peak * 1e12 / flops_per_image) if peak else None,
               hardware_tflop_per_image=hardware_flops_per_image / 1e12,
               hfu=(hardware_flops_per_image * images / seconds / (peak * 1e12)) if peak else None,
               bound_images_per_gpu_s_with_recompute=(peak * 1e12 / hardware_flops_per_image) if peak else None,
               release_images_per_gpu_s=RELEASE_IMAGES_PER_GPU_S,
               reward_mean=metrics.get(reward_name) if reward_name else None,
               first_update_logp_max_dev=metrics.get("first_update_logp_max_dev"),
               peak_memory_gib=peak_gib, device=device_name(ctx.device),
               status="ok" if valid else "invalid: optimizer updates were skipped (non-finite rewards or gradients)")
    return [row]


def summarize(rows: list[dict], ctx: Context) -> str:
    measured = [r for r in rows if r.get("model")]
    text = markdown_table(measured, ["weights", "resolution", "images", "sampler_steps", "trained_steps", "updates",
                                     "iteration_s", "rollout_s", "reward_s", "update_s", "images_per_gpu_s", "mfu",
                                     "bound_images_per_gpu_s_at_100pct_mfu", "bound_images_per_gpu_s_with_recompute",
                                     "peak_memory_gib", "status"],
                          ["weights", "resolution", "images", "steps", "trained steps", "updates", "s per iteration",
                           "rollout s", "reward s", "update s", "images per GPU-s", "MFU", "bound at 100% MFU",
                           "bound with recompute", "peak GiB", "status"])
    if ctx.tiny:  # a toy-size smoke run: its rate says nothing about FLUX.1-dev
        text += ("\n\nTiny sizes (a functional check of this section, not a measurement): the rate above is "
                 "not comparable with the authors' release or the 100% MFU bound of the real recipe.")
    else:
        text += (f"\n\nThe authors' release: about {RELEASE_IMAGES_PER_GPU_S} images per GPU-second on H800s. "
                 "Random weights at the published configs; see bench/gpu/grpo_iteration.py for what stands in for "
                 "what (weights in bf16 or LoRA on one GPU, a random-weight ViT-H-14 reward).")
    if measured:
        text += f" Attention: {measured[0].get('attention')}."
    return text
