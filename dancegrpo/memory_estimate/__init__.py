"""Estimate the peak GPU memory of one training process for a recipe, without a GPU.

    python -m dancegrpo.memory_estimate configs/flux_hps.yaml [more.yaml ...] [--markdown]

Method (docs/memory.md explains it with the results):

- Parameter counts are exact: the real diffusers / transformers classes are built from the
  published config.json of each checkpoint (kept in each generator's `ModelSpec`, in
  dancegrpo/models/<name>.py, each with its source) with fake tensors, and their parameters
  counted.
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

Layout: `instruments` (parameter counts, saved-tensor bytes, live-memory peaks), `estimate`
(the recipe-level estimate, its markdown table and the command line).
"""
from __future__ import annotations

from .estimate import (
    DTYPE_BYTES,
    QWEN2_VL_2B,
    SPEC_FIELDS,
    Estimate,
    Row,
    cfg_rows,
    denoiser_inputs,
    estimate_recipe,
    format_markdown,
    main,
    measure_denoiser,
    reward_parameters,
)
from .instruments import (
    LiveMemoryTracker,
    StepMemory,
    count_diffusers_parameters,
    count_parameters,
    cuda_like_numerics,
    diffusers_class,
    measure_training_step,
    saved_tensor_bytes,
)

__all__ = ["DTYPE_BYTES", "QWEN2_VL_2B", "SPEC_FIELDS", "Estimate", "LiveMemoryTracker", "Row", "StepMemory",
           "cfg_rows", "count_diffusers_parameters", "count_parameters", "cuda_like_numerics", "denoiser_inputs",
           "diffusers_class", "estimate_recipe", "format_markdown", "main", "measure_denoiser",
           "measure_training_step", "reward_parameters", "saved_tensor_bytes"]
