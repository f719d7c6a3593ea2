"""dancegrpo.memory_estimate: exact parameter counts, the two memory instruments, fake vs real runs."""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, HunyuanVideoTransformer3DModel, UNet2DConditionModel
from torch import nn

from dancegrpo import memory_estimate as me
from dancegrpo.models import get_model_spec, register_model

TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(2, 2, 4))
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                 norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_HUNYUAN = dict(in_channels=8, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                    num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
                    pooled_projection_dim=32, rope_axes_dim=(2, 2, 4), guidance_embeds=True)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=8)


@contextlib.contextmanager
def swapped_spec(spec):
    """Register `spec` in place of the spec of the same name for the duration of the block."""
    original = get_model_spec(spec.name)
    register_model(spec, replace=True)
    try:
        yield spec
    finally:
        register_model(original, replace=True)


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_equal_the_instantiated_models():
    for cls, config in [(FluxTransformer2DModel, TINY_FLUX), (UNet2DConditionModel, TINY_UNET),
                        (HunyuanVideoTransformer3DModel, TINY_HUNYUAN), (AutoencoderKL, TINY_VAE)]:
        assert me.count_diffusers_parameters(cls.__name__, config) == numel(cls(**config)), cls.__name__


def test_published_configs_build_the_known_model_sizes():
    # Public sizes: SD v1.4 UNet 859.5 M, HunyuanVideo 12.8 B (the "13B" model), SD VAE 83.7 M.
    sd14, hunyuan = get_model_spec("sd14"), get_model_spec("hunyuan_video")
    assert me.count_diffusers_parameters("UNet2DConditionModel", sd14.denoiser_config) == 859_520_964
    assert round(me.count_diffusers_parameters("HunyuanVideoTransformer3DModel", hunyuan.denoiser_config),
                 -8) == 12_800_000_000
    assert round(me.count_diffusers_parameters("AutoencoderKL", sd14.vae_config), -5) == 83_700_000


def test_saved_tensor_bytes_of_a_tiny_mlp_by_hand():
    torch.manual_seed(0)
    batch, d_in, hidden = 3, 5, 7
    mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    x = torch.randn(batch, d_in)
    saved = me.saved_tensor_bytes(lambda: mlp(x).sum(), exclude=tuple(mlp.parameters()))
    # linear 1 keeps its input x (for the weight gradient); tanh keeps its output, which is also
    # what linear 2 keeps (one buffer, counted once); weights are parameters; sum keeps nothing.
    assert saved == 4 * batch * d_in + 4 * batch * hidden
    # Without excluding parameters, linear 2's weight (kept for the gradient of its input) is
    # counted too; linear 1 keeps no weight: its input x needs no gradient.
    assert me.saved_tensor_bytes(lambda: mlp(x).sum()) == saved + 4 * 2 * hidden
    # In bf16 autocast the kept tensors are bf16, and linear 2's bf16 weight copy is no parameter.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = me.saved_tensor_bytes(lambda: mlp(x).sum(), exclude=tuple(mlp.parameters()))
    assert low == 2 * batch * d_in + 2 * batch * hidden + 2 * 2 * hidden


def test_live_memory_tracker_counts_allocations_until_freed():
    with me.LiveMemoryTracker() as tracker:
        a = torch.ones(1000)                  # 4000 B
        view = a.view(10, 100)                # an alias: nothing new
        b = view * 2                          # 4000 B
        assert (tracker.current, tracker.peak) == (8000, 8000)
        del a, view
        assert tracker.current == 4000 and tracker.peak == 8000
        c = b.double()                        # 8000 B
        del b
        assert tracker.current == 8000 and tracker.peak == 12000
        b2 = torch.empty(10).add_(1)          # in place: the one allocation of empty
        assert tracker.current == 8040
    del c, b2


def test_training_step_of_a_tiny_mlp_by_hand():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(5, 6)
    memory = me.measure_training_step(mlp, lambda: mlp(x), autocast_dtype=None)
    assert memory.saved == 4 * 5 * 6 + 4 * 5 * 8 + 4 * 5 * 4   # x, tanh output, the output kept by square
    # No parameter gradient stays (they are model state, counted apart); the peak covers at least
    # what backward needs, and no more than saved + the largest gradient pair around it.
    assert all(p.grad is None for p in mlp.parameters())
    assert memory.saved <= memory.peak <= memory.saved + 2 * 4 * (8 * 6 + 8 * 4)


def test_fake_run_measures_what_a_real_run_measures():
    options = dict(height=32, width=32, max_sequence_length=8)
    for checkpointing in (False, True):
        fake = me.measure_denoiser("flux", TINY_FLUX, options, batch=2, checkpointing=checkpointing, fake=True)
        real = me.measure_denoiser("flux", TINY_FLUX, options, batch=2, checkpointing=checkpointing, fake=False)
        assert fake == real


def test_checkpointing_keeps_block_inputs_but_autocast_keeps_bf16_weights():
    options = dict(height=32, width=32, max_sequence_length=8)
    config = {**TINY_FLUX, "num_layers": 3, "num_single_layers": 4}
    full = me.measure_denoiser("flux", config, options, batch=2, checkpointing=False)
    ac = me.measure_denoiser("flux", config, options, batch=2, checkpointing=True)
    assert ac.saved < full.saved / 3
    # The autocast cache holds a bf16 copy of every weight used in the forward until autocast
    # exits, checkpointing or not: the peak with checkpointing cannot fall below it.
    params = me.count_diffusers_parameters("FluxTransformer2DModel", config)
    assert ac.peak >= ac.saved + 2 * params * 0.9
    fp32 = me.measure_denoiser("flux", config, options, batch=2, checkpointing=True, autocast_dtype=None)
    assert fp32.peak < ac.peak


def test_recipe_estimate_counts_the_trainer_state():
    flux = get_model_spec("flux")
    tiny = replace(flux, denoiser_config=TINY_FLUX, vae_config={**TINY_VAE, "latent_channels": 16})
    with swapped_spec(tiny):
        overrides = ("model.options.height=32", "model.options.width=32", "model.options.max_sequence_length=8",
                     "trainer.ema_decay=0.99", "grpo.kl_coef=0.1", "grpo.prompts_per_iteration=2", "grpo.group_size=3")
        est = me.estimate_recipe("configs/flux_hps.yaml", overrides=overrides)
        n = numel(FluxTransformer2DModel(**TINY_FLUX))
        rows = {row.part: row.bytes for row in est.state + est.buffers}
        assert rows["denoiser weights (fp32 master)"] == rows["gradients (fp32)"] == 4 * n
        assert rows["AdamW moments (fp32 exp_avg + exp_avg_sq)"] == 8 * n
        assert rows["EMA copy (fp32)"] == rows["frozen reference copy (fp32)"] == 4 * n
        assert rows["VAE (float32, frozen)"] == 4 * numel(AutoencoderKL(**{**TINY_VAE, "latent_channels": 16}))
        assert rows["reward hps (float32)"] == 4 * 986_109_441   # open_clip ViT-H-14
        assert rows["rollout latents (fp32, every step)"] == 4 * 6 * 17 * 16 * 4 * 4   # 6 samples, 16+1 steps
        assert est.decoded.bytes == 4 * 6 * 3 * 32 * 32
        assert est.peak(True) == est.persistent() + max(est.activations[True].peak, est.decoded.bytes)
        table = me.format_markdown(est)
        assert "| **peak, with activation checkpointing** |" in table and "EMA copy" in table
