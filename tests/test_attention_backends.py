"""model.options.attention_backend: the auto rule, refusals, and that the choice really holds
for every adapter, in rollout, in the training forward and in the checkpointing recompute of backward."""
from __future__ import annotations

import contextlib
import itertools
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

import dancegrpo.attention.backends as backends_module
from dancegrpo.attention.backends import (AUTO_SDPA, BACKENDS, AttentionBackend, AttentionBackendError,
                                          _package_attention, attention_modules, install_attention_backend,
                                          installed_backend, select_backend)
from dancegrpo.config import ConfigError, load_config
from dancegrpo.models import load_model
from dancegrpo.models.base import FrozenReference
from dancegrpo.models.prompt_cache import EMPTY_PROMPT, PromptCacheWriter
from dancegrpo.models.toy_flux import ToyFluxGenerator
from dancegrpo.trainer import Trainer
from tiny_models import build_flux, build_hunyuan_video, build_sd14, build_skyreels_i2v

FLAGS = ("math", "flash", "efficient", "cudnn")
ONLY_MATH = (True, False, False, False)
ALL_ON = (True, True, True, True)


def sdp_flags() -> tuple[bool, ...]:
    b = torch.backends.cuda
    return (b.math_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled())


class SDPASpy(TorchFunctionMode):
    """Records, for each SDPA call that reaches torch, the kernels SDPA may use at that moment."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls.append({"flags": sdp_flags(), "grad": torch.is_grad_enabled(),
                               "masked": (kwargs or {}).get("attn_mask") is not None})
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------- the pure rule

def test_auto_on_cuda_never_picks_cudnn_whatever_the_call():
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    packages = ("flash_attn", "flash_attn3", "xformers")
    installed_sets = [set(c) for r in range(4) for c in itertools.combinations(packages, r)]
    seen = set()
    for dtype, head_dim, masked, dropout, installed, capability in itertools.product(
            dtypes, (64, 128, 256, 512), (False, True), (False, True), installed_sets,
            ((7, 5), (8, 0), (8, 9), (9, 0), (10, 0), (12, 0))):
        choice = select_backend("auto", "cuda", dtype, head_dim, masked, dropout, installed, capability)
        seen.add(choice.backend)
        assert choice.backend not in ("cudnn", "xformers")
        if choice.package is None:
            assert choice.sdpa == (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
            assert SDPBackend.CUDNN_ATTENTION not in choice.sdpa
    assert seen == {"auto", "flash_attn", "flash_attn3"}


@pytest.mark.parametrize("dtype,head_dim,masked,dropout,installed,capability,expected", [
    (torch.bfloat16, 128, False, False, {"flash_attn3", "flash_attn"}, (9, 0), "flash_attn3"),   # H100/H200
    (torch.bfloat16, 128, False, False, {"flash_attn"}, (9, 0), "flash_attn"),
    (torch.float16, 256, False, False, {"flash_attn"}, (8, 0), "flash_attn"),                  # A100
    (torch.bfloat16, 128, False, False, {"flash_attn3"}, (8, 0), "auto"),      # FA3 is for Hopper
    (torch.bfloat16, 128, False, False, {"flash_attn"}, (10, 0), "auto"),      # beyond sm90: SDPA
    (torch.float32, 128, False, False, {"flash_attn3", "flash_attn"}, (9, 0), "auto"),   # packages: half only
    (torch.bfloat16, 512, False, False, {"flash_attn3", "flash_attn"}, (9, 0), "auto"),  # head_dim > 256
    (torch.bfloat16, 128, True, False, {"flash_attn3", "flash_attn"}, (9, 0), "auto"),   # HunyuanVideo's mask
    (torch.bfloat16, 128, False, True, {"flash_attn3"}, (9, 0), "auto"),       # FA3 has no dropout
    (torch.bfloat16, 128, False, False, {"xformers"}, (9, 0), "auto"),
    (torch.bfloat16, 128, False, False, set(), (9, 0), "auto"),
])
def test_auto_rule_on_cuda(dtype, head_dim, masked, dropout, installed, capability, expected):
    choice = select_backend("auto", "cuda", dtype, head_dim, masked, dropout, installed, capability)
    assert choice.backend == expected
    assert (choice.sdpa == AUTO_SDPA) == (expected == "auto")


def test_auto_on_cpu_is_torchs_own_choice():
    for dtype, masked in itertools.product((torch.float32, torch.bfloat16), (False, True)):
        choice = select_backend("auto", "cpu", dtype, 64, masked, installed={"flash_attn", "flash_attn3"})
        assert (choice.backend, choice.sdpa, choice.package) == ("default", None, None)


@pytest.mark.parametrize("name,device,dtype,head_dim,masked,installed,words", [
    ("flash", "cuda", torch.float32, 128, False, (), ["'flash'", "float16/bfloat16", "float32", "autocast_dtype"]),
    ("flash", "cuda", torch.bfloat16, 512, False, (), ["head_dim <= 256", "head_dim 512"]),
    ("flash", "cuda", torch.bfloat16, 128, True, (), ["no attention mask"]),
    ("cudnn", "cpu", torch.float32, 64, False, (), ["'cudnn'", "only on CUDA", "'cpu'"]),
    ("efficient", "cpu", torch.float32, 64, False, (), ["only on CUDA"]),
    ("flash_attn", "cpu", torch.bfloat16, 64, False, {"flash_attn"}, ["only on CUDA"]),
    ("flash_attn", "cuda", torch.bfloat16, 64, False, (), ["flash-attn 2", "not installed", "pip install flash-attn"]),
    ("flash_attn3", "cuda", torch.bfloat16, 64, False, (), ["flash_attn_interface", "not installed", "hopper"]),
    ("xformers", "cuda", torch.bfloat16, 64, False, (), ["xformers", "pip install xformers"]),
    ("xformers", "cuda", torch.bfloat16, 64, True, {"xformers"}, ["no attention mask"]),
    ("flash_attn", "cuda", torch.float16, 320, False, {"flash_attn"}, ["head_dim 320"]),
])
def test_a_backend_that_cannot_run_is_refused_by_name(name, device, dtype, head_dim, masked, installed, words):
    with pytest.raises(AttentionBackendError) as info:
        select_backend(name, device, dtype, head_dim, masked, installed=installed, capability=(9, 0),
                       where="q (1, 2, 16, 64)")
    message = str(info.value)
    for word in [f"attention_backend = {name!r}", "q (1, 2, 16, 64)", "efficient", "auto", *words]:
        assert word in message, (word, message)


def test_explicit_choices_that_can_run():
    assert select_backend("math", "cpu", torch.float32, 64).sdpa == (SDPBackend.MATH,)
    # torch has a CPU flash kernel that takes float32 and masks
    assert select_backend("flash", "cpu", torch.float32, 512, masked=True).sdpa == (SDPBackend.FLASH_ATTENTION,)
    assert select_backend("cudnn", "cuda", torch.bfloat16, 128).sdpa == (SDPBackend.CUDNN_ATTENTION,)
    assert select_backend("efficient", "cuda", torch.float32, 512, masked=True).sdpa == \
        (SDPBackend.EFFICIENT_ATTENTION,)
    assert select_backend("flash_attn", "cuda", torch.bfloat16, 128, installed={"flash_attn"}).package == "flash_attn"
    listed = "auto, flash, efficient, cudnn, math, flash_attn, flash_attn3, xformers"
    with pytest.raises(ValueError, match=f"flsh.*{listed}"):
        select_backend("flsh", "cpu", torch.float32, 64)


# ------------------------------------------------------------------------------- config and build

def _config(tiny_config, backend, device="cpu"):
    cfg = dict(tiny_config)
    cfg["model"] = {**tiny_config["model"], "options": {"attention_backend": backend}}
    cfg["run"] = {**tiny_config["run"], "device": device}
    return cfg


def test_unknown_name_is_refused_at_config_load_listing_the_values(tiny_config):
    with pytest.raises(ConfigError) as info:
        load_config(_config(tiny_config, "flash-attn"))
    assert "model.options.attention_backend = 'flash-attn'" in str(info.value)
    assert ", ".join(BACKENDS) in str(info.value)


@pytest.mark.parametrize("backend", ["efficient", "cudnn", "flash_attn", "flash_attn3", "xformers"])
def test_cuda_only_backend_on_a_cpu_run_is_refused_before_any_work(tiny_config, backend, monkeypatch):
    built = []
    monkeypatch.setattr("dancegrpo.run_context.load_model", lambda *a, **k: built.append(a))
    with pytest.raises(ConfigError, match=f"attention_backend = '{backend}' runs only on CUDA.*run.device = 'cpu'"):
        Trainer(_config(tiny_config, backend))
    assert built == []                     # refused before the model was even loaded
    load_config(_config(tiny_config, backend, device="cuda"))   # the same is fine on a CUDA run


def test_missing_package_is_refused_when_the_adapter_is_built(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr("dancegrpo.attention.backends.installed_packages", lambda: frozenset())
    with pytest.raises(AttentionBackendError, match="flash-attn 2 package .flash_attn. is not installed; pip install"):
        load_model("toy_flux", str(tiny_checkpoint), {"attention_backend": "flash_attn"})


def _tiny_hunyuan():
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32,
        rope_axes_dim=(2, 2, 4), guidance_embeds=True)


def test_model_facts_are_checked_at_build_mask_and_head_dim():
    with pytest.raises(AttentionBackendError, match="'flash_attn' cannot run the hunyuan_video denoiser.*no attention"):
        install_attention_backend(_tiny_hunyuan(), "flash_attn", "hunyuan_video", masked=True,
                                  installed={"flash_attn"})
    wide = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=0,
                                  attention_head_dim=288, num_attention_heads=1, joint_attention_dim=8,
                                  pooled_projection_dim=8, axes_dims_rope=(96, 96, 96))
    with pytest.raises(AttentionBackendError, match="head_dim <= 256, and this model has head_dim 288"):
        install_attention_backend(wide, "flash_attn3", "flux", installed={"flash_attn3"})
    install_attention_backend(wide, "efficient", "flux")      # efficient takes any head_dim


def test_attention_modules_found_and_installed_once():
    model = _tiny_hunyuan()
    modules = attention_modules(model)
    # dual-stream, single-stream and the token refiner's self-attention
    assert len(modules) == 3
    install_attention_backend(model, "math", "hunyuan_video", masked=True)
    assert [installed_backend(m) for m in modules] == ["math"] * 3
    with pytest.raises(RuntimeError, match="already installed"):
        install_attention_backend(model, "auto", "hunyuan_video")


# ------------------------------------------------------------------------------- at run time

def toy_inputs(adapter, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *adapter.latent_shape(), generator=g, device="cpu")
    cond = adapter.encode_prompts(["a red circle", "two blue squares above a green triangle"][:batch])
    return x, torch.tensor([0.35, 0.8][:batch]), cond


def test_toy_auto_on_cpu_is_bit_for_bit_the_plain_diffusers_forward(tiny_checkpoint):
    adapter = load_model("toy_flux", str(tiny_checkpoint), {})
    assert adapter.attention_backend.requested == "auto"
    plain = ToyFluxGenerator.from_pretrained(tiny_checkpoint)
    for m in attention_modules(plain.transformer):     # the same model with the class's own forwards back
        del m.forward
    x, t, cond = toy_inputs(adapter)
    with torch.no_grad(), SDPASpy() as spy:
        ours = adapter.predict(x, t, cond)
    assert spy.calls and all(c["flags"] == ALL_ON for c in spy.calls)   # nothing constrained on the CPU
    with torch.no_grad():
        assert torch.equal(ours, plain.predict(x, t, cond))


def test_runtime_refusal_before_any_kernel_names_backend_shapes_and_dtype(tiny_checkpoint):
    adapter = ToyFluxGenerator.from_pretrained(tiny_checkpoint, attention_backend="cudnn")   # API: no config check
    x, t, cond = toy_inputs(adapter)
    with SDPASpy() as spy, pytest.raises(AttentionBackendError) as info:
        adapter.predict(x, t, cond)
    assert spy.calls == []                       # no attention kernel ran
    message = str(info.value)
    for word in ["attention_backend = 'cudnn'", "toy_flux denoiser's attention (head_dim up to 8)",
                 "hidden_states (2, 64, 48)", "float32 on cpu", "only on CUDA", "attention_backend: efficient"]:
        assert word in message, (word, message)


class DropoutAttention:
    """A processor whose SDPA call asks for attention dropout, which torch's CPU flash kernel lacks."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q = hidden_states.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5).transpose(1, 2).flatten(2)
        return out if encoder_hidden_states is None else (out, encoder_hidden_states)


@pytest.mark.filterwarnings("ignore:.*(kernel not used|do not support non-zero dropout)")
def test_kernel_failure_is_wrapped_with_backend_module_and_shapes(tiny_checkpoint):
    adapter = ToyFluxGenerator.from_pretrained(tiny_checkpoint, attention_backend="flash")
    for module in attention_modules(adapter.transformer):
        module.set_processor(DropoutAttention())
    x, t, cond = toy_inputs(adapter)
    with pytest.raises(AttentionBackendError) as info:
        adapter.predict(x, t, cond)
    message = str(info.value)
    for word in ["attention_backend = 'flash' (torch SDPA (flash_attention))", "FluxAttention (2 heads)",
                 "hidden_states (2, 64, 16), encoder_hidden_states (2, 12, 16), float32 on cpu failed",
                 "No available kernel", "attention_backend: efficient"]:
        assert word in message, (word, message)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert sdp_flags() == ALL_ON                                  # the context was left on the error too


@pytest.mark.filterwarnings("ignore:.*(kernel not used|do not support non-zero dropout)")
def test_package_route_call_failure_is_wrapped_with_qkv_shapes():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(AttentionBackendError) as info:
        AttentionBackend("flash").attend(q, q, q, dropout_p=0.5)
    message = str(info.value)
    assert "attention_backend = 'flash' (torch SDPA (flash_attention)) failed on q (1, 2, 8, 16)" in message
    assert "No available kernel" in message and "auto" in message


def test_sdpa_routes_compile_without_graph_breaks(tiny_checkpoint):
    import torch._dynamo
    adapter = ToyFluxGenerator.from_pretrained(tiny_checkpoint, attention_backend="math")
    x, t, cond = toy_inputs(adapter)
    with torch.no_grad():
        eager = adapter.predict(x, t, cond)
    torch._dynamo.reset()
    # the joint-attention block; fullgraph: a graph break would raise
    adapter.transformer.transformer_blocks[0].compile(backend="eager", fullgraph=True)
    with torch.no_grad():
        compiled = adapter.predict(x, t, cond)
    torch._dynamo.reset()
    assert torch.equal(compiled, eager)


def _fake_package(monkeypatch, name, returns_tuple=False):
    seen = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        seen.append((tuple(q.shape), softmax_scale, causal))
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * softmax_scale
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).to(q.dtype)
        return (out, None) if returns_tuple else out

    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(flash_attn_func=flash_attn_func))
    return seen


@pytest.mark.parametrize("package,module,returns_tuple", [("flash_attn", "flash_attn", False),
                                                          ("flash_attn3", "flash_attn_interface", True)])
def test_package_route_converts_layouts_and_passes_the_scale(monkeypatch, package, module, returns_tuple):
    seen = _fake_package(monkeypatch, module, returns_tuple)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))       # (B, H, N, D) as SDPA takes
    out = _package_attention(package, q, k, v, 0.0, False, 0.25, False)
    assert seen == [((2, 5, 3, 8), 0.25, False)]                            # the package got (B, N, H, D)
    expected = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.25, -1) @ v.double()
    torch.testing.assert_close(out, expected.float(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- every adapter

HUNYUAN = {"height": 32, "width": 48, "frames": 5}
ADAPTERS = {
    # name: (builder, options, cache tensors per prompt, cache meta)
    "sd14": (build_sd14, {"height": 16, "width": 16}, {"prompt_embeds": (8, 32)}, {}),
    "flux": (build_flux, {"height": 16, "width": 24}, {"prompt_embeds": (6, 16), "pooled_embeds": (32,)}, {}),
    "hunyuan_video": (build_hunyuan_video, HUNYUAN,
                      {"prompt_embeds": (6, 32), "prompt_attention_mask": (6,), "pooled_embeds": (32,)}, {}),
    "skyreels_i2v": (build_skyreels_i2v, HUNYUAN,
                     {"prompt_embeds": (6, 32), "prompt_attention_mask": (6,), "pooled_embeds": (32,),
                      "image_latents": (4, 1, 4, 6)}, {"height": 32, "width": 48}),
}
PROMPTS = ["a red cat", "two green birds"]


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory):
    """Each real adapter's tiny checkpoint and a prompt cache of random conditioning (no text encoder run)."""
    made = {}
    for name, (build, options, tensors, meta) in ADAPTERS.items():
        root = tmp_path_factory.mktemp(name)
        ckpt = build(root / "ckpt")
        writer = PromptCacheWriter(root / "cache", name, meta)
        g = torch.Generator().manual_seed(0)
        prompts = PROMPTS + [EMPTY_PROMPT]
        rows = {}
        for key, shape in tensors.items():
            if key == "prompt_attention_mask":   # valid text first, then 2 padded tokens (masked keys)
                rows[key] = torch.tensor([[1] * (shape[0] - 2) + [0, 0]] * len(prompts))
            else:
                rows[key] = torch.randn(len(prompts), *shape, generator=g)
        writer.add(prompts, rows)
        writer.close()
        made[name] = (ckpt, {"prompt_cache": str(root / "cache"), **options})
    return made


def _predict(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *adapter.latent_shape(), generator=g)
    t = torch.tensor([0.4, 0.7]) if adapter.prediction == "flow" else torch.tensor([801, 301])
    return adapter.predict(x, t, adapter.encode_prompts(PROMPTS))


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_math_equals_auto_on_cpu_and_math_is_what_ran(tiny_adapters, name):
    ckpt, options = tiny_adapters[name]
    auto = load_model(name, str(ckpt), options)
    math = load_model(name, str(ckpt), {**options, "attention_backend": "math"})
    with torch.no_grad():
        with SDPASpy() as spy_auto:
            out_auto = _predict(auto)
        with SDPASpy() as spy_math:
            out_math = _predict(math)
    assert spy_auto.calls and all(c["flags"] == ALL_ON for c in spy_auto.calls)
    assert len(spy_math.calls) == len(spy_auto.calls) and all(c["flags"] == ONLY_MATH for c in spy_math.calls)
    assert any(c["masked"] for c in spy_math.calls) == name.startswith(("hunyuan", "skyreels"))
    assert sdp_flags() == ALL_ON                                             # restored after the call
    torch.testing.assert_close(out_math, out_auto, rtol=1e-5, atol=1e-5)


def test_training_backward_recompute_runs_under_the_chosen_backend(tiny_adapters, monkeypatch):
    ckpt, options = tiny_adapters["flux"]
    adapter = load_model("flux", str(ckpt), {**options, "attention_backend": "math", "gradient_checkpointing": True})
    adapter.train()
    entered = []
    real = backends_module.sdpa_kernel

    @contextlib.contextmanager
    def spy_kernel(kernels, *args, **kwargs):
        with real(kernels, *args, **kwargs):
            entered.append((tuple(kernels), torch.is_grad_enabled(), sdp_flags()))
            yield

    monkeypatch.setattr(backends_module, "sdpa_kernel", spy_kernel)
    out = _predict(adapter)
    assert entered == [((SDPBackend.MATH,), True, ONLY_MATH)] * 2          # one double-, one single-stream block
    entered.clear()
    out.square().mean().backward()
    # diffusers' gradient checkpointing recomputes each block's forward inside backward: same kernel
    assert entered == [((SDPBackend.MATH,), True, ONLY_MATH)] * 2
    assert sdp_flags() == ALL_ON


def test_sta_dense_fallback_follows_the_chosen_backend(tiny_adapters):
    ckpt, options = tiny_adapters["hunyuan_video"]
    sta = {"window": [1, 1, 1], "tile": [1, 2, 2], "full_attention_steps": 1, "backend": "torch"}
    runs = {}
    for backend in ("auto", "math"):
        adapter = load_model("hunyuan_video", str(ckpt), {**options, "sta": sta, "attention_backend": backend})
        adapter.sta.set_step(0)                       # step 0: full attention, the processor's dense fallback
        with torch.no_grad(), SDPASpy() as spy:
            runs[backend] = _predict(adapter)
        runs[backend + "_flags"] = {c["flags"] for c in spy.calls}
    assert runs["math_flags"] == {ONLY_MATH} and runs["auto_flags"] == {ALL_ON}
    torch.testing.assert_close(runs["math"], runs["auto"], rtol=1e-5, atol=1e-5)


def test_frozen_reference_copy_routes_through_its_own_weights(tiny_checkpoint):
    adapter = load_model("toy_flux", str(tiny_checkpoint), {"attention_backend": "math"})
    reference = FrozenReference(adapter, "transformer")
    for module in attention_modules(reference.module):
        assert module.forward.__self__ is module and installed_backend(module) == "math"
    x, t, cond = toy_inputs(adapter)
    with torch.no_grad():
        before = adapter.predict(x, t, cond)
        for p in adapter.transformer.parameters():
            p.add_(0.1)
        with reference.active(), SDPASpy() as spy:
            ref = adapter.predict(x, t, cond)
    assert torch.equal(ref, before) and all(c["flags"] == ONLY_MATH for c in spy.calls)


def test_trainer_rollout_and_training_forward_use_the_chosen_backend(tiny_config):
    cfg = _config(tiny_config, "math")
    cfg["trainer"] = {**cfg["trainer"], "iterations": 1}
    cfg["data"] = {**cfg["data"], "eval_prompts": ""}
    trainer = Trainer(cfg)
    spy = SDPASpy()
    predict = trainer.adapter.predict

    def spied(*args, **kwargs):
        with spy:
            return predict(*args, **kwargs)

    trainer.adapter.predict = spied
    trainer.train(progress=False)
    assert {c["grad"] for c in spy.calls} == {False, True}          # rollout (no grad) and training (grad)
    assert all(c["flags"] == ONLY_MATH for c in spy.calls)


def test_auto_on_a_simulated_hopper_holds_every_attention_call_off_cudnn(tiny_checkpoint, monkeypatch):
    real = backends_module.select_backend

    def as_if_on_an_h200(requested, device_type, dtype, head_dim, masked=False, dropout=False, installed=(),
                         capability=None, where=""):
        return real(requested, "cuda", dtype, head_dim, masked, dropout, installed, (9, 0), where)

    monkeypatch.setattr(backends_module, "select_backend", as_if_on_an_h200)
    monkeypatch.setattr(backends_module, "installed_packages", lambda: frozenset())
    adapter = ToyFluxGenerator.from_pretrained(tiny_checkpoint)          # auto
    x, t, cond = toy_inputs(adapter)
    with SDPASpy() as spy:
        adapter.predict(x, t, cond).square().mean().backward()
    assert spy.calls and all(c["flags"] == (True, True, True, False) for c in spy.calls)   # math, flash, efficient
    assert sdp_flags() == ALL_ON
