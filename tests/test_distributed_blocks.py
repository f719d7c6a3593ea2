"""Per-block activation checkpointing and torch.compile (dancegrpo.distributed.blocks).

References: the unwrapped model's own forward and gradients; diffusers' gradient checkpointing
(which modules it checkpoints, recorded through its `gradient_checkpointing_func` hook); the
bytes alive at the end of the forward, measured by a dispatch-mode tracker.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers import (
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    WanTransformer3DModel,
)

from dancegrpo.distributed.blocks import (
    apply_activation_checkpointing,
    checkpointed_blocks,
    compile_blocks,
    transformer_blocks,
)
from dancegrpo.memory_estimate import LiveMemoryTracker
from dancegrpo.models.toy_flux import latent_image_ids

# The tiny configs of tests/tiny_models.py, with more blocks so every_n has something to skip.
FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
HUNYUAN = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
               num_single_layers=2, num_refiner_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=32,
               pooled_projection_dim=32, rope_axes_dim=(2, 2, 4), guidance_embeds=True)
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=8, ffn_dim=32, num_layers=3, rope_max_seq_len=32)
# tests/tiny_models.py's SD3.5 transformer with 3 blocks: one with MMDiT-X's second attention, one plain,
# and the last (context_pre_only: no text output projection and MLP).
SD35 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=48,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(2, 2, 4))
SD14 = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cls, config = {"flux": (FluxTransformer2DModel, FLUX), "hunyuan": (HunyuanVideoTransformer3DModel, HUNYUAN),
                   "wan": (WanTransformer3DModel, WAN), "sd14": (UNet2DConditionModel, SD14),
                   "sd35": (SD3Transformer2DModel, SD35), "qwen_image": (QwenImageTransformer2DModel, QWEN)}[name]
    return cls(**config).train()


def inputs(name: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if name == "flux":
        return dict(hidden_states=torch.randn(2, 16, 16, generator=g),
                    encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                    pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.3, 0.7]),
                    img_ids=latent_image_ids(8, 8), txt_ids=torch.zeros(5, 3), guidance=torch.full((2,), 3.5),
                    return_dict=False)
    if name == "hunyuan":
        mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])   # a padded text token: the mask path
        return dict(hidden_states=torch.randn(2, 4, 2, 4, 4, generator=g), timestep=torch.tensor([300.0, 700.0]),
                    encoder_hidden_states=torch.randn(2, 4, 32, generator=g), encoder_attention_mask=mask,
                    pooled_projections=torch.randn(2, 32, generator=g), guidance=torch.full((2,), 1000.0),
                    return_dict=False)
    if name == "wan":
        return dict(hidden_states=torch.randn(2, 4, 2, 4, 4, generator=g), timestep=torch.tensor([300.0, 700.0]),
                    encoder_hidden_states=torch.randn(2, 5, 16, generator=g), return_dict=False)
    if name == "sd35":
        return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([300.0, 700.0]),
                    encoder_hidden_states=torch.randn(2, 5, 64, generator=g),
                    pooled_projections=torch.randn(2, 48, generator=g), return_dict=False)
    if name == "qwen_image":
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])   # padded text tokens: the mask path
        return dict(hidden_states=torch.randn(2, 6, 16, generator=g), timestep=torch.tensor([0.3, 0.7]),
                    encoder_hidden_states=torch.randn(2, 5, 32, generator=g), encoder_hidden_states_mask=mask,
                    img_shapes=[[(1, 2, 3)]] * 2, return_dict=False)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10.0, 500.0]),
                encoder_hidden_states=torch.randn(2, 3, 32, generator=g), return_dict=False)


def output_and_grads(model: torch.nn.Module, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs(name))[0]
    (out.square().mean() + out.mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(model: torch.nn.Module, reference: torch.nn.Module, name: str, atol: float = 1e-6) -> None:
    out, grads = output_and_grads(model, name)
    ref_out, ref_grads = output_and_grads(reference, name)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=0)
    # Qwen-Image's last block computes a text output (to_add_out, txt_mlp) that nothing reads: no gradient.
    unused = {f"transformer_blocks.{QWEN['num_layers'] - 1}.{p}.{w}" for p in ("attn.to_add_out", "txt_mlp.net.0.proj",
                                                                          "txt_mlp.net.2") for w in ("weight", "bias")}
    expected = [n for n, _ in reference.named_parameters() if name != "qwen_image" or n not in unused]
    assert sorted(grads) == sorted(ref_grads) == sorted(expected)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=atol, rtol=0, msg=key)


def record_diffusers_checkpointed(model: torch.nn.Module, name: str) -> tuple[list, torch.nn.Module]:
    """(modules diffusers checkpoints, in call order; the copy of `model` they belong to)."""
    called = []

    def record(module, *args):
        called.append(module)
        return module(*args)

    model = copy.deepcopy(model)
    model.enable_gradient_checkpointing(record)
    model(**inputs(name))
    return called, model


def test_blocks_are_the_units_diffusers_checkpoints():
    flux = build("flux")
    called, copied = record_diffusers_checkpointed(flux, "flux")
    assert [id(m) for m in transformer_blocks(copied)] == [id(m) for m in called]
    assert len(transformer_blocks(flux)) == FLUX["num_layers"] + FLUX["num_single_layers"]

    hunyuan = build("hunyuan")
    called, copied = record_diffusers_checkpointed(hunyuan, "hunyuan")
    blocks, refiners = transformer_blocks(copied), HUNYUAN["num_refiner_layers"]
    assert [id(m) for m in blocks[refiners:]] == [id(m) for m in called]   # + the text token refiner's blocks
    assert blocks[:refiners] == list(copied.context_embedder.token_refiner.refiner_blocks)

    wan = build("wan")
    called, copied = record_diffusers_checkpointed(wan, "wan")
    assert [id(m) for m in transformer_blocks(copied)] == [id(m) for m in called]
    assert len(called) == WAN["num_layers"]


@pytest.mark.parametrize("name", ["sd35", "qwen_image"])
def test_sd35_and_qwen_image_blocks_are_the_units_diffusers_checkpoints(name):
    model = build(name)
    called, copied = record_diffusers_checkpointed(model, name)
    assert [id(m) for m in transformer_blocks(copied)] == [id(m) for m in called]
    assert len(called) == 3 and [type(m).__name__ for m in called] == [
        {"sd35": "JointTransformerBlock", "qwen_image": "QwenImageTransformerBlock"}[name]] * 3


def test_blocks_come_from_the_registered_specs():
    """The lists are the registry's (ModelSpec.denoiser_blocks): a class no spec names is refused with
    the known ones, a spec that registers one makes it known, and two specs cannot disagree on a class."""
    from dancegrpo.models import BlockLists, ModelSpec, register_model, unregister_model

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Module()
            self.inner.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
            self.head = torch.nn.ModuleList([torch.nn.Linear(2, 1)])

    model = Stack()
    with pytest.raises(ValueError, match=r"Stack is not a denoiser .*SD3Transformer2DModel.*QwenImageTransformer2DModel"):
        transformer_blocks(model)
    register_model(ModelSpec(name="stack_model", load=lambda path, options: None,
                             denoiser_blocks={"Stack": BlockLists("inner.layers", "head")}))
    try:
        assert transformer_blocks(model) == [*model.inner.layers, *model.head]
        with pytest.raises(ValueError, match=r"differs from registered model 'stack_model'"):
            register_model(ModelSpec(name="stack_other", load=lambda path, options: None,
                                     denoiser_blocks={"Stack": BlockLists("inner.layers")}))
        del model.head
        with pytest.raises(ValueError, match=r"Stack has no block list 'head'"):
            transformer_blocks(model)
    finally:
        unregister_model("stack_model")
    with pytest.raises(ValueError, match="attribute paths"):
        BlockLists()


def test_unet_blocks_cover_every_resnet_and_attention_once_and_contain_what_diffusers_checkpoints():
    unet = build("sd14")
    called, copied = record_diffusers_checkpointed(unet, "sd14")
    blocks = transformer_blocks(copied)
    names = {id(m): n for n, m in copied.named_modules()}
    unit = re.compile(r"((down|up)_blocks\.\d+|mid_block)\.(resnets|attentions)\.\d+")
    expected = [n for n, _ in copied.named_modules() if unit.fullmatch(n)]
    assert sorted(names[id(b)] for b in blocks) == sorted(expected) and len(set(map(id, blocks))) == len(blocks)
    # Each unit diffusers checkpoints lies inside exactly one of ours (ours are the same or coarser).
    for module in called:
        owners = [b for b in blocks if any(m is module for m in b.modules())]
        assert len(owners) == 1, names[id(module)]


@pytest.mark.parametrize("name", ["flux", "hunyuan", "wan", "sd35", "qwen_image"])
@pytest.mark.parametrize("mode,every_n", [("none", 1), ("full", 1), ("selective", 1), ("full", 2), ("selective", 3)])
def test_checkpointing_gives_the_unwrapped_output_and_gradients(name, mode, every_n):
    reference = build(name)
    model = copy.deepcopy(reference)
    count = apply_activation_checkpointing(model, mode, every_n)
    n_blocks = len(transformer_blocks(model))
    assert count == (0 if mode == "none" else -(-n_blocks // every_n))
    assert checkpointed_blocks(model) == ([] if mode == "none" else list(range(0, n_blocks, every_n)))
    assert_same_step(model, reference, name)


def test_unet_full_checkpointing_gives_the_unwrapped_gradients():
    reference = build("sd14")
    model = copy.deepcopy(reference)
    assert apply_activation_checkpointing(model, "full") == len(transformer_blocks(model))
    assert_same_step(model, reference, "sd14")


def test_every_n_counts():
    for every_n, expected in [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3]), (5, [0]), (9, [0])]:
        model = build("flux")
        assert apply_activation_checkpointing(model, "full", every_n) == len(expected)
        assert checkpointed_blocks(model) == expected


def forward_bytes_kept(model: torch.nn.Module, name: str) -> int:
    """Bytes allocated during the forward that are still alive when it returns (kept for backward + output)."""
    with LiveMemoryTracker() as tracker:
        out = model(**inputs(name))[0]
    kept = tracker.current
    out.sum().backward()   # the saved activations are released, and recomputation works
    return kept


@pytest.mark.parametrize("name", ["flux", "hunyuan"])
def test_full_keeps_less_than_selective_which_keeps_less_than_none(name):
    kept = {}
    for mode in ("none", "selective", "full"):
        model = build(name)
        apply_activation_checkpointing(model, mode)
        kept[mode] = forward_bytes_kept(model, name)
    assert kept["full"] < kept["selective"] < kept["none"], kept
    # Selective recomputes the element-wise work: a real cut, not a rounding difference.
    assert kept["selective"] < 0.8 * kept["none"], kept


def test_no_grad_forward_does_not_checkpoint():
    model, reference = build("flux"), build("flux")
    apply_activation_checkpointing(model, "full")
    with torch.no_grad(), LiveMemoryTracker():
        out = model(**inputs("flux"))[0]
    torch.testing.assert_close(out, reference(**inputs("flux"))[0].detach(), atol=1e-6, rtol=0)
    assert not out.requires_grad


def test_state_dict_keys_unchanged_and_checkpoints_load_either_way():
    plain = build("hunyuan")
    wrapped = build("hunyuan")
    with torch.no_grad():
        for p in wrapped.parameters():
            p.add_(0.01)   # different weights, so a load is visible
    apply_activation_checkpointing(wrapped, "selective", every_n=2)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    wrapped.load_state_dict(plain.state_dict(), strict=True)     # unwrapped checkpoint -> wrapped model
    assert_same_step(wrapped, plain, "hunyuan")
    fresh = build("hunyuan")
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(0.5)
    fresh.load_state_dict(wrapped.state_dict(), strict=True)     # wrapped checkpoint -> unwrapped model
    assert_same_step(fresh, plain, "hunyuan")


def test_deepcopy_of_a_wrapped_model_runs_its_own_weights():
    model = build("flux")
    apply_activation_checkpointing(model, "full")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.9)
    reference = build("flux")
    reference.load_state_dict(twin.state_dict())
    assert_same_step(twin, reference, "flux")
    assert all(b.forward.__self__ is b for b in transformer_blocks(twin))


def test_bad_arguments_are_refused_with_their_value():
    model = build("flux")
    with pytest.raises(ValueError, match="'partial'"):
        apply_activation_checkpointing(model, "partial")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"every_n = {bad!r}"):
            apply_activation_checkpointing(model, "full", bad)
    assert apply_activation_checkpointing(model, "full") == 5
    with pytest.raises(RuntimeError, match="already called"):
        apply_activation_checkpointing(model, "selective")
    with_diffusers = build("flux")
    with_diffusers.enable_gradient_checkpointing()
    with pytest.raises(RuntimeError, match="disable_gradient_checkpointing"):
        apply_activation_checkpointing(with_diffusers, "full")
    with pytest.raises(ValueError, match="Linear"):
        transformer_blocks(torch.nn.Linear(2, 2))


def test_compile_blocks_same_output_and_gradients_with_checkpointing():
    # backend aot_eager: dynamo capture + AOT autograd (the joint forward/backward graph, the
    # selective-checkpoint partition) as inductor gets them, without inductor's C++ build
    # (~90 s cold for these blocks on this CPU). fullgraph=True: a graph break fails the test.
    torch._dynamo.reset()
    reference = build("flux")
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, "selective")
    assert compile_blocks(model, backend="aot_eager", fullgraph=True) == len(transformer_blocks(model))
    assert all(b._compiled_call_impl is not None for b in transformer_blocks(model))
    assert list(model.state_dict()) == list(reference.state_dict())
    assert_same_step(model, reference, "flux", atol=1e-5)
    with pytest.raises(RuntimeError, match="already compiled"):
        compile_blocks(model)
    compiled_first = build("flux")
    compile_blocks(compiled_first, backend="aot_eager")
    with pytest.raises(RuntimeError, match="before compile_blocks"):
        apply_activation_checkpointing(compiled_first, "full")
    torch._dynamo.reset()


def _sequence_parallel_worker(rank: int, port: int, world: int) -> None:
    """Each mode on top of Ulysses (2 gloo ranks) gives the single-process unwrapped step: the
    recomputed blocks re-run their all-to-alls in backward, in the same order on every rank.
    Then checkpointing under FSDP2 sharding over the 2 ranks."""
    import os

    import torch.distributed as dist

    from dancegrpo.distributed import build_mesh, init_distributed, install_ulysses
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_distributed("gloo")
    try:
        group = build_mesh(sp_size=world, device_type="cpu")["sp"].get_group()
        config = dict(HUNYUAN, num_attention_heads=4, num_layers=1, num_single_layers=1, num_refiner_layers=1)
        torch.manual_seed(0)
        reference = HunyuanVideoTransformer3DModel(**config).train()
        ref_out, ref_grads = output_and_grads(reference, "hunyuan")
        for mode in ("full", "selective"):
            model = copy.deepcopy(reference)
            apply_activation_checkpointing(model, mode)
            handle = install_ulysses(model, group)
            out, grads = output_and_grads(model, "hunyuan")
            handle.remove()
            torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
            for key, grad in grads.items():
                dist.all_reduce(grad, group=group)   # the ranks' shares of each gradient
                torch.testing.assert_close(grad, ref_grads[key], atol=1e-5, rtol=1e-5, msg=f"{mode} {key}")

        # Checkpointing, then FSDP2 per block (the documented order): the same inputs on both ranks,
        # so the averaged sharded gradients are the single-process ones; the FSDP subclass keeps its blocks.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        model = copy.deepcopy(reference)
        apply_activation_checkpointing(model, "selective", every_n=2)
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(model).__name__.startswith("FSDP") and len(transformer_blocks(model)) == 3
        assert list(model.state_dict()) == list(reference.state_dict())
        out, grads = output_and_grads(model, "hunyuan")
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for key, grad in grads.items():
            torch.testing.assert_close(grad.full_tensor(), ref_grads[key], atol=1e-5, rtol=1e-5, msg=f"fsdp {key}")
    finally:
        dist.destroy_process_group()


def test_checkpointing_under_sequence_parallelism_and_fsdp_equals_single_process():
    import torch.multiprocessing as mp

    from gloo_helpers import free_port
    mp.spawn(_sequence_parallel_worker, args=(free_port(), 2), nprocs=2, join=True)
