"""Ulysses sequence parallelism and FSDP2 on a tiny WanTransformer3DModel: 2 gloo processes vs one process.

The reference is the same model in one process with diffusers' own attention processors.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import WanTransformer3DModel

from dancegrpo.config import FSDPConfig, ParallelConfig
from dancegrpo.distributed import build_mesh
from dancegrpo.distributed.blocks import apply_activation_checkpointing, checkpointed_blocks, transformer_blocks
from dancegrpo.distributed.fsdp import fsdp_mesh, shard_model
from dancegrpo.distributed.parallelize import _install_sequence_parallel, parallelize_denoiser
from dancegrpo.distributed.wan_ulysses import install_ulysses
from gloo_helpers import assert_sp_step_matches, free_port, join_gloo

WORLD = 2
# Wan 2.1 text-to-video's layout at toy size: 4 heads of 8 channels (RoPE t, h, w: 4, 2, 2 channels).
T2V = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=8, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
# Wan 2.1 image-to-video: image tokens (CLIP features) through added k/v projections in cross-attention.
I2V = dict(T2V, image_dim=12, added_kv_proj_dim=32)
IMAGE_TOKENS = 3
TEXT_TOKENS_I2V = 512   # diffusers' Wan I2V processor takes the last 512 context tokens as text


def _model(**overrides) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**{**T2V, **overrides}).train()


def _inputs(frames: int, height: int, width: int, image: bool = False, per_token_timestep: bool = False) -> dict:
    """Latents of (frames, height, width): frames x height/2 x width/2 video tokens."""
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, frames, height, width, generator=gen)
    inputs = dict(hidden_states=latents, timestep=torch.tensor([300.0, 700.0]),
                  encoder_hidden_states=torch.randn(2, TEXT_TOKENS_I2V if image else 5, 16, generator=gen))
    if image:
        inputs["encoder_hidden_states_image"] = torch.randn(2, IMAGE_TOKENS, 12, generator=gen)
    if per_token_timestep:  # Wan 2.2 TI2V: one timestep per video token
        tokens = frames * (height // 2) * (width // 2)
        inputs["timestep"] = torch.rand(2, tokens, generator=gen) * 1000
    inputs["weight"] = torch.randn(latents.shape, generator=gen)   # a loss that touches every output element
    return inputs


def _loss_and_grads(model, inputs: dict, loss_scale: float = 1.0):
    """(output, input grads, parameter grads) of sum(output * weight) * loss_scale."""
    inputs = dict(inputs)
    weight = inputs.pop("weight")
    leaves = {name: inputs[name].clone().requires_grad_(True) for name in inputs if name != "timestep"}
    model.zero_grad(set_to_none=True)
    out = model(**{**inputs, **leaves}, return_dict=False)[0]
    ((out * weight).sum() * loss_scale).backward()
    params = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), {name: x.grad for name, x in leaves.items()}, params


def _ulysses_worker(rank: int, port: int) -> None:
    join_gloo(rank, port, WORLD)
    try:
        group = build_mesh(sp_size=WORLD, device_type="cpu")["sp"].get_group()
        t2v, i2v = _model(), _model(**I2V)
        cases = [(t2v, _inputs(2, 4, 8)),                           # 2 x 2 x 4 = 16 tokens, 8 per rank
                 (t2v, _inputs(3, 2, 6)),                           # 3 x 1 x 3 = 9 tokens, padded to 10
                 (i2v, _inputs(3, 2, 6, image=True)),               # padded, with image tokens
                 (t2v, _inputs(1, 6, 2, per_token_timestep=True))]  # 3 tokens, padded to 4; per-token timestep
        for model, inputs in cases:
            reference = _loss_and_grads(model, inputs)
            handle = install_ulysses(model, group)
            result = _loss_and_grads(model, inputs)
            handle.remove()
            assert_sp_step_matches(result, reference, group)
            # remove() restored the single-process model: the reference again.
            torch.testing.assert_close(_loss_and_grads(model, inputs)[0], reference[0], rtol=0, atol=1e-6)

        # diffusers' own gradient checkpointing recomputes the blocks, all-to-alls included, in backward.
        model, inputs = _model(), _inputs(3, 2, 6)
        reference = _loss_and_grads(model, inputs)
        model.enable_gradient_checkpointing()
        handle = install_ulysses(model, group)
        assert_sp_step_matches(_loss_and_grads(model, inputs), reference, group)

        # Refusals, each naming its values.
        with pytest.raises(RuntimeError, match=r"already called"):   # a second install would shard twice
            install_ulysses(model, group)
        bad = dict(_inputs(3, 2, 6), timestep=torch.zeros(2, 4))
        with pytest.raises(ValueError, match=r"timestep of shape \(2, 4\).*one value per video token \(9 "):
            model(**{k: v for k, v in bad.items() if k != "weight"})
        handle.remove()
        with pytest.raises(ValueError, match=r"sequence-parallel size 2 does not divide the attention head count 3"):
            install_ulysses(_model(num_attention_heads=3), group)
    finally:
        dist.destroy_process_group()


def test_ulysses_forward_backward_equal_single_process():
    mp.spawn(_ulysses_worker, args=(free_port(),), nprocs=WORLD, join=True)


def _fsdp_worker(rank: int, port: int) -> None:
    join_gloo(rank, port, WORLD)
    try:
        reference_model, inputs = _model(), _inputs(3, 2, 6)
        reference = _loss_and_grads(reference_model, inputs)

        # Selective checkpointing, then FSDP2 per block and root: the same inputs on both ranks, so
        # FSDP's average of the ranks' gradients is the single-process gradient.
        model = copy.deepcopy(reference_model)
        assert apply_activation_checkpointing(model, "selective") == T2V["num_layers"]
        shard_model(model, fsdp_mesh("cpu", WORLD))
        assert type(model).__name__ == "FSDPWanTransformer3DModel" and len(transformer_blocks(model)) == 2
        assert list(model.state_dict()) == list(reference_model.state_dict())
        out, _, grads = _loss_and_grads(model, inputs)
        _assert_full_grads_equal(out, grads, reference)

        # The trainer's path: Ulysses (picked by the transformer's class), selective checkpointing,
        # FSDP2 over both ranks, which are one sequence-parallel group. FSDP averages over the ranks
        # and Ulysses needs the sum of their shares: the loss is scaled by the world size, as the trainer does.
        model = copy.deepcopy(reference_model)
        par = ParallelConfig(sp_size=WORLD, fsdp=FSDPConfig(enabled=True), activation_checkpointing="selective")
        done = parallelize_denoiser(SimpleNamespace(denoiser=model, sta=None), model, par,
                                    build_mesh(sp_size=WORLD, device_type="cpu"), torch.device("cpu"))
        assert done.sharded and model._ulysses_installed and checkpointed_blocks(model) == [0, 1]
        out, _, grads = _loss_and_grads(model, inputs, loss_scale=WORLD)
        _assert_full_grads_equal(out, grads, reference)
    finally:
        dist.destroy_process_group()


def _assert_full_grads_equal(out, grads: dict, reference) -> None:
    ref_out, _, ref_grads = reference
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad.full_tensor(), ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_fsdp_with_selective_checkpointing_and_ulysses_equal_single_process():
    mp.spawn(_fsdp_worker, args=(free_port(),), nprocs=WORLD, join=True)


def test_refusals_before_any_collective():
    with pytest.raises(ValueError, match=r"Linear is not a WanTransformer3DModel \(it has no rope, patch_embedding"):
        install_ulysses(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match=r"no Ulysses sequence parallelism for Linear \(known: .*WanTransformer3DModel"):
        _install_sequence_parallel(SimpleNamespace(sta=None), torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match=r"sliding-tile attention inside Ulysses exists for HunyuanVideo"):
        _install_sequence_parallel(SimpleNamespace(sta=object()), _model(), None)
