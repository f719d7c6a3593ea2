"""Bench fields of Wan (text- and image-to-video), SD3.5 and Qwen-Image: the FLOP formula against
torch's FLOP counter, the token counts against what the first block receives, the parameter formulas
against sum(numel) of the diffusers classes (tiny, odd and published configs)."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import scaling_model
from bench.throughput import Workload, build_denoiser, forward_flops, recipe_workload
from dancegrpo.distributed.blocks import transformer_blocks
from dancegrpo.memory_estimate import denoiser_inputs
from dancegrpo.models import get_model_spec, sd35

CLASSES = {"wan_t2v": "WanTransformer3DModel", "wan_i2v": "WanTransformer3DModel", "sd35": "SD3Transformer2DModel",
           "qwen_image": "QwenImageTransformer2DModel"}
# Odd sizes (distinct widths, 3 heads, batch 3, non-square canvas) so that a wrong term cannot cancel out;
# Wan's added_kv_proj_dim is d, as published (its image tokens reach the keys after the image embedder).
WAN_ODD = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=8, in_channels=6, out_channels=5,
               text_dim=10, freq_dim=12, ffn_dim=20, num_layers=2, rope_max_seq_len=32, cross_attn_norm=False)
WAN_I2V_ODD = {**WAN_ODD, "in_channels": 10, "image_dim": 14, "added_kv_proj_dim": 24, "cross_attn_norm": True}
SD35_ODD = dict(sample_size=8, patch_size=2, in_channels=6, out_channels=5, num_layers=3, attention_head_dim=8,
                num_attention_heads=3, joint_attention_dim=10, caption_projection_dim=24, pooled_projection_dim=14,
                pos_embed_max_size=16, dual_attention_layers=(1,), qk_norm="rms_norm")
QWEN_ODD = dict(patch_size=2, in_channels=12, out_channels=5, num_layers=2, attention_head_dim=8, num_attention_heads=3,
                joint_attention_dim=10, axes_dims_rope=(2, 2, 4))
ODD = dict(height=48, width=80, frames=9, max_sequence_length=7)


def workloads():
    for name in CLASSES:
        yield recipe_workload(name, tiny=True)
    yield Workload("wan_t2v", CLASSES["wan_t2v"], WAN_ODD, ODD, 3)
    yield Workload("wan_i2v", CLASSES["wan_i2v"], WAN_I2V_ODD, {**ODD, "max_sequence_length": 512}, 3)  # see TINY_I2V
    yield Workload("sd35", CLASSES["sd35"], SD35_ODD, ODD, 3)
    yield Workload("qwen_image", CLASSES["qwen_image"], QWEN_ODD, ODD, 3)


WORKLOADS = list(workloads())
IDS = [f"{w.model_name}-{'tiny' if i < len(CLASSES) else 'odd'}" for i, w in enumerate(WORKLOADS)]


@pytest.mark.parametrize("work", WORKLOADS, ids=IDS)
def test_forward_flops_and_tokens_equal_the_model(work):
    model = build_denoiser(work, torch.device("cpu"), torch.float32)
    image_tokens, text_tokens = work.tokens
    seen = {}

    def record(module, args, kwargs):   # the first block: its image/video and text (+ CLIP image) tokens
        names = ("hidden_states", "encoder_hidden_states")
        values = {**dict(zip(names, args)), **kwargs}
        seen.update({name: values[name].shape[1] for name in names})

    transformer_blocks(model)[0].register_forward_pre_hook(record, with_kwargs=True)
    inputs = denoiser_inputs(work.model_name, work.config, dict(work.options), work.batch)
    # The math backend runs attention as matmuls, which the counter sees (the fused CPU kernel it does not).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    clip_tokens = 257 if work.config.get("image_dim") else 0
    assert (seen["hidden_states"], seen["encoder_hidden_states"]) == (image_tokens, text_tokens + clip_tokens)
    assert forward_flops(work.model_name, work.config, image_tokens, text_tokens, work.batch) == \
        counter.get_total_flops()


@pytest.mark.parametrize("work", WORKLOADS, ids=IDS)
def test_parameter_counts_equal_the_diffusers_models(work):
    model = build_denoiser(work, torch.device("cpu"), torch.float32)
    assert scaling_model.parameter_count(work.model_name, work.config) == sum(p.numel() for p in model.parameters())
    assert scaling_model.block_parameter_counts(work.model_name, work.config) == [
        sum(p.numel() for p in block.parameters()) for block in transformer_blocks(model)]


@pytest.mark.parametrize("name,config", [("wan_t2v", get_model_spec("wan_t2v").denoiser_config),
                                         ("wan_i2v", get_model_spec("wan_i2v").denoiser_config),
                                         ("sd35", sd35.SD35_MEDIUM_TRANSFORMER), ("sd35", sd35.SD35_LARGE_TRANSFORMER),
                                         ("qwen_image", get_model_spec("qwen_image").denoiser_config)])
def test_published_parameter_counts_equal_the_diffusers_models(name, config):
    """Full size, built on the meta device (shapes only, no memory)."""
    import diffusers
    with torch.device("meta"):
        model = getattr(diffusers, CLASSES[name])(**config)
    assert scaling_model.parameter_count(name, config) == sum(p.numel() for p in model.parameters())


def test_recipe_token_counts():
    cases = {"wan_t2v": ((512, 512, 33, 1), (9 * 32 * 32, 512)),      # 1 + 32/4 latent frames, 64/2 patches
             "wan_i2v": ((480, 832, 33, 1), (9 * 30 * 52, 512)),
             "sd35": ((512, 512, None, 9), (32 * 32, 77 + 128)),      # the recipe's T5 length (flow_grpo's)
             "qwen_image": ((512, 512, None, 4), (32 * 32, 512))}
    for name, ((height, width, frames, batch), tokens) in cases.items():
        work = recipe_workload(name)
        assert (work.options["height"], work.options["width"], work.options.get("frames"), work.batch) == \
            (height, width, frames, batch), name
        assert work.tokens == tokens, name
