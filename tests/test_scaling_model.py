"""bench.scaling_model: parameter counts vs the diffusers classes, collective volumes vs brute-force
counts from the real tensors' shapes, and the time model's consistency."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel

from bench import scaling_model as sm
from bench.throughput import recipe_workload
from dancegrpo.distributed.blocks import transformer_blocks
from dancegrpo.models import get_model_spec
from test_bench_throughput import FLUX_ODD, HUNYUAN_ODD

FLUX, HUNYUAN = get_model_spec("flux"), get_model_spec("hunyuan_video")
CASES = [("flux", FluxTransformer2DModel, FLUX.tiny_config), ("flux", FluxTransformer2DModel, FLUX_ODD),
         ("hunyuan_video", HunyuanVideoTransformer3DModel, HUNYUAN.tiny_config),
         ("hunyuan_video", HunyuanVideoTransformer3DModel, HUNYUAN_ODD)]


def build(cls, config):
    torch.manual_seed(0)
    return cls(**config)


@pytest.mark.parametrize("name,cls,config", CASES)
def test_parameter_counts_equal_the_diffusers_models(name, cls, config):
    model = build(cls, config)
    assert sm.parameter_count(name, config) == sum(p.numel() for p in model.parameters())
    assert sm.block_parameter_counts(name, config) == [sum(p.numel() for p in b.parameters())
                                                       for b in transformer_blocks(model)]


def test_full_size_parameter_counts_are_the_published_sizes():
    assert sm.parameter_count("flux", FLUX.denoiser_config) == pytest.approx(11.90e9, rel=1e-3)   # FLUX.1-dev 12 B
    assert sm.parameter_count("hunyuan_video", HUNYUAN.denoiser_config) == pytest.approx(12.82e9, rel=1e-3)  # 13 B


def ring_all_gather_bytes_sent(shard_bytes: list[int]) -> list[int]:
    """Simulate a ring all-gather: at step k rank r forwards the shard it got k steps ago to rank r+1."""
    n = len(shard_bytes)
    sent = [0] * n
    for step in range(n - 1):
        for rank in range(n):
            sent[rank] += shard_bytes[(rank - step) % n]
    return sent


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_all_gather_volume_equals_a_ring_simulation_over_the_real_shards(world):
    model = build(HunyuanVideoTransformer3DModel, HUNYUAN.tiny_config)
    sent = [0] * world
    for p in model.parameters():   # FSDP2 shards each parameter on dim 0; bf16 compute copies are gathered
        shards = [c.numel() * 2 for c in p.detach().chunk(world, 0)]
        shards += [0] * (world - len(shards))
        assert all(s == shards[0] for s in shards), "the tiny dims divide the world size (no padding)"
        sent = [a + b for a, b in zip(sent, ring_all_gather_bytes_sent(shards))]
    volumes = sm.fsdp_bytes(sm.parameter_count("hunyuan_video", HUNYUAN.tiny_config), world, grad_bytes=4)
    assert sent == [volumes["all_gather_forward"]] * world
    assert volumes["all_gather_backward"] == volumes["all_gather_forward"]
    assert volumes["reduce_scatter"] == 2 * volumes["all_gather_forward"]        # fp32 gradients, same pattern
    assert sm.fsdp_bytes(1000, world, grad_bytes=4, accumulation=5)["reduce_scatter"] == pytest.approx(
        sm.fsdp_bytes(1000, world, grad_bytes=4)["reduce_scatter"] / 5)


@pytest.mark.parametrize("sp", [2, 4, 3])
def test_ulysses_volume_equals_a_count_over_the_attention_calls(sp):
    """Hook every attention layer of the joint blocks, take the video and text shapes it sees, and
    count the bytes leaving a rank exactly as dancegrpo.distributed.ulysses splits its buffers."""
    name, config = "hunyuan_video", dict(HUNYUAN.tiny_config, num_attention_heads=12)
    work = recipe_workload(name, tiny=True)
    model = build(HunyuanVideoTransformer3DModel, config)
    calls = []
    for block in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        block.attn.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    from dancegrpo.memory_estimate import denoiser_inputs
    with torch.no_grad():
        model(**denoiser_inputs(name, config, dict(work.options), work.batch))
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    image_tokens, text_tokens = sm.recipe_workload(name, tiny=True).tokens
    a2a = text = 0
    for kw in calls:
        hidden, encoder = kw["hidden_states"], kw["encoder_hidden_states"]
        if hidden.shape[1] != image_tokens:     # single blocks see the joint sequence: cut the text off
            hidden = hidden[:, :image_tokens]
        batch, tokens = hidden.shape[:2]
        padded = -(-tokens // sp) * sp
        local = torch.empty(batch, padded // sp, heads, head_dim, device="meta", dtype=torch.bfloat16)
        for _ in ("q", "k", "v", "out"):
            chunks = local.chunk(sp, 2)                    # scatter over heads, as _all_to_all does
            a2a += sum(c.numel() * 2 for j, c in enumerate(chunks) if j != 0)   # rank 0 keeps chunk 0
        text_piece = batch * encoder.shape[1] * heads // sp * head_dim * 2
        text += (sp - 1) * text_piece                     # all-gather: its piece to each other rank
    assert len(calls) == sm.attention_layers(name, config)
    volumes = sm.ulysses_bytes(name, config, image_tokens, text_tokens, work.batch, sp, checkpointing="none")
    assert volumes["all_to_all_forward"] == pytest.approx(a2a, rel=1e-12)
    assert volumes["all_to_all_backward"] == volumes["all_to_all_forward"]
    assert volumes["all_to_all_recompute"] == 0
    assert volumes["text_gather"] == pytest.approx(2 * text, rel=1e-12)        # + its reduce-scatter in backward
    full = sm.ulysses_bytes(name, config, image_tokens, text_tokens, work.batch, sp, checkpointing="full")
    assert full["all_to_all_recompute"] == full["all_to_all_forward"]          # the recomputed forward's all-to-alls
    assert full["text_gather"] == pytest.approx(3 * text, rel=1e-12)


def test_volumes_scale_as_expected():
    work = recipe_workload("hunyuan_video")
    config, (ni, nt) = work.config, work.tokens
    per_rank = {sp: sm.ulysses_bytes("hunyuan_video", config, ni, nt, 1, sp)["all_to_all_forward"]
                for sp in (1, 2, 4, 8)}
    assert per_rank[1] == 0
    # tokens divisible by sp: a rank sends (sp-1)/sp of its 1/sp shard, so bytes x sp^2/(sp-1) is constant
    assert ni % 8 == 0
    scaled = [per_rank[sp] * sp * sp / (sp - 1) for sp in (2, 4, 8)]
    assert scaled == pytest.approx([scaled[0]] * 3, rel=1e-12)
    # FSDP: independent of sp, approaches the parameter bytes with the world size
    params = sm.parameter_count("hunyuan_video", config)
    assert [sm.fsdp_bytes(params, w)["all_gather_forward"] for w in (8, 64)] == pytest.approx(
        [params * 2 * 7 / 8, params * 2 * 63 / 64])


def test_time_model_consistency():
    cluster = sm.Cluster(nvlink_alpha_us=0.0, network_alpha_us=0.0)
    assert sm.collective_seconds(8e9, 8, cluster) == pytest.approx(8e9 / (450e9 * 0.8))        # NVLink
    assert sm.collective_seconds(8e9, 16, cluster) == pytest.approx(8e9 / (50e9 * 0.8))        # network
    faster = replace(cluster, network_gb_s=100.0)
    assert sm.collective_seconds(8e9, 16, faster) == pytest.approx(sm.collective_seconds(8e9, 16, cluster) / 2)
    assert sm.collective_seconds(8e9, 1, cluster) == 0.0

    base = sm.Layout(world=64, sp=1)
    for model_name in ("flux", "hunyuan_video"):
        runs = {sp: sm.estimate(model_name, replace(base, sp=sp), sm.Cluster()) for sp in (1, 2, 4)}
        assert runs[1].ulysses_s == 0 and runs[2].ulysses_s > 0
        assert runs[1].compute_s > runs[2].compute_s > runs[4].compute_s    # sequence parallelism splits the work
        assert runs[2].compute_s >= runs[1].compute_s / 2                     # ... but text tokens are replicated
        assert all(0 < r.efficiency <= 1 + 1e-12 for r in runs.values())
        assert len({round(r.fsdp_s, 9) for r in runs.values()}) == 1          # FSDP volume does not depend on sp
        hsdp = sm.estimate(model_name, replace(base, sharding="hsdp"), sm.Cluster())
        assert hsdp.fsdp_s < runs[1].fsdp_s                                   # all-gathers over NVLink instead
        single_node = sm.estimate(model_name, replace(base, world=8), sm.Cluster())
        assert single_node.fsdp_s < runs[1].fsdp_s
    with pytest.raises(ValueError, match="sp = 16"):
        sm.estimate("flux", replace(base, sp=16), sm.Cluster())
    with pytest.raises(ValueError, match="'zero'"):
        sm.estimate("flux", replace(base, sharding="zero"), sm.Cluster())


def test_report_and_figure(tmp_path):
    path = tmp_path / "scaling.png"
    text = sm.main(["--plot", str(path), "--mfu", "0.5"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in text.splitlines() if line.startswith("| 64 | 8 |")]
    assert len(rows) == 3   # hunyuan volume table + its two time tables
    with pytest.raises(ValueError, match="1.5"):
        sm.main(["--mfu", "1.5"])


def test_iteration_counts_from_the_recipes():
    assert sm.recipe_micro_steps("flux") == 32 * 12 * 10             # 32 prompts x 12 samples x ceil(0.6 x 16)
    assert sm.recipe_micro_steps("hunyuan_video") == 32 * 8 * 10     # best-of-24 keeps the top 4 + bottom 4
    layout = sm.Layout(world=64, sp=4, micro_batch=3)
    step = sm.estimate("flux", layout, sm.Cluster()).step_s
    assert sm.iteration_seconds("flux", layout, sm.Cluster()) == pytest.approx(-(-1280 // 16) * step)
