"""Ulysses sequence parallelism on a tiny HunyuanVideo transformer: 2 gloo processes vs one process."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dancegrpo.attention.hunyuan_processor import install_sta
from dancegrpo.distributed.ulysses_sta import install_ulysses_sta
from dancegrpo.distributed import (build_mesh, heads_to_sequence, init_distributed, install_ulysses, plan_layout,
                                   sequence_to_heads, shard_sequence)
from gloo_helpers import assert_sp_step_matches, free_port, join_gloo

WORLD = 2


def _tiny_transformer(heads: int):
    from diffusers import HunyuanVideoTransformer3DModel
    torch.manual_seed(0)
    # tests/tiny_models.py's HunyuanVideo transformer, with more heads so each rank gets several.
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=32, rope_axes_dim=(2, 2, 4), guidance_embeds=True).float()


def _inputs(frames: int, height: int, width: int):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, frames, height, width, generator=gen)
    text = torch.randn(2, 5, 32, generator=gen)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # right padding, as the tokenizer gives
    pooled = torch.randn(2, 32, generator=gen)
    weight = torch.randn(latents.shape, generator=gen)            # a loss that touches every output element
    return latents, text, text_mask, pooled, weight


def _loss_and_grads(model, latents, text, text_mask, pooled, weight):
    latents, text, pooled = (x.clone().requires_grad_(True) for x in (latents, text, pooled))
    model.zero_grad(set_to_none=True)
    out = model(hidden_states=latents, timestep=torch.tensor([300.0, 700.0]), encoder_hidden_states=text,
                encoder_attention_mask=text_mask, pooled_projections=pooled, guidance=torch.tensor([3.5, 3.5]),
                return_dict=False)[0]
    (out * weight).sum().backward()
    params = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), {"latents": latents.grad, "text": text.grad, "pooled": pooled.grad}, params


def _check_all_to_all(group, rank: int) -> None:
    """The layouts against plain slicing of one full (B, N, H, D) tensor every rank holds."""
    full = torch.randn(2, 6, 4, 3, generator=torch.Generator().manual_seed(2))
    by_heads = sequence_to_heads(shard_sequence(full, group), group)
    torch.testing.assert_close(by_heads, full[:, :, 2 * rank:2 * rank + 2], rtol=0, atol=0)
    torch.testing.assert_close(heads_to_sequence(by_heads, group), full[:, 3 * rank:3 * rank + 3], rtol=0, atol=0)


def _assert_matches_reference(model, group, inputs, reference, install=install_ulysses) -> None:
    handle = install(model, group)
    result = _loss_and_grads(model, *inputs)
    handle.remove()
    assert_sp_step_matches(result, reference, group)


def _worker(rank: int, port: int) -> None:
    join_gloo(rank, port, WORLD)
    try:
        group = build_mesh(sp_size=WORLD, device_type="cpu")["sp"].get_group()
        _check_all_to_all(group, rank)
        model = _tiny_transformer(heads=4)
        # 2 x 2 x 4 = 16 video tokens after patchify (8 per rank); 3 x 1 x 3 = 9 (padded to 10).
        for canvas in ((2, 4, 8), (3, 2, 6)):
            inputs = _inputs(*canvas)
            # Reference: the whole sequence in this process, diffusers' own attention processor.
            reference = _loss_and_grads(model, *inputs)
            _assert_matches_reference(model, group, inputs, reference)
            # remove() restored the single-process model: the reference again.
            torch.testing.assert_close(_loss_and_grads(model, *inputs)[0], reference[0], rtol=0, atol=1e-6)

        # Activation checkpointing recomputes the blocks, collectives included, in backward.
        model.enable_gradient_checkpointing()
        _assert_matches_reference(model, group, inputs, reference)

        handle = install_ulysses(model, group)
        with pytest.raises(RuntimeError, match=r"already called"):  # a second install would shard twice
            install_ulysses(model, group)
        handle.remove()
        with pytest.raises(ValueError, match=r"sequence-parallel size 2 does not divide the attention head count 3"):
            install_ulysses(_tiny_transformer(heads=3), group)

        # With sliding-tile attention: per-head windows, each rank keeps its heads' windows.
        sta = {"window": [[1, 1, 2], [3, 1, 1], [1, 1, 1], [3, 2, 2]], "tile": [1, 4, 4], "backend": "torch"}
        reference_model, inputs = _tiny_transformer(heads=4), _inputs(3, 8, 12)  # tokens (3, 4, 6)
        install_sta(reference_model, sta)
        reference = _loss_and_grads(reference_model, *inputs)
        assert not torch.allclose(reference[0], _loss_and_grads(_tiny_transformer(heads=4), *inputs)[0], atol=1e-3)
        _assert_matches_reference(_tiny_transformer(heads=4), group, inputs, reference,
                                  install=lambda model, group: install_ulysses_sta(model, group, sta)[1])
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_forward_backward_equal_single_process():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)


def test_layout_refuses_sp_size_not_dividing_world_size():
    assert plan_layout(8, 2).dp_size == 4
    with pytest.raises(ValueError, match=r"sp_size = 3 does not divide the world size 8"):
        plan_layout(8, 3)
    with pytest.raises(ValueError, match=r"sp_size = 0"):
        plan_layout(4, 0)


def test_init_without_torchrun_environment_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match=r"torchrun"):
        init_distributed()
    with pytest.raises(RuntimeError, match=r"init_distributed"):
        build_mesh(sp_size=1, device_type="cpu")
