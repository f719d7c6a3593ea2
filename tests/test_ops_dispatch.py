"""Backend choice, fallback, stale builds, and torch.compile tracing through the fused ops."""
from __future__ import annotations

import logging
import types

import pytest
import torch

from dancegrpo import grpo, ops
from dancegrpo.ops import backends, extension
from ops_helpers import backends_under_test

CPU = torch.device("cpu")
COMPILED_BACKENDS = [b for b in backends_under_test() if b in ("torch", "cpp")]


@pytest.fixture(autouse=True)
def _clean_choice(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    ops.set_default_backend(None)
    yield
    ops.set_default_backend(None)


def test_auto_picks_the_cpu_extension_when_built():
    assert "cpp" in ops.available_backends(CPU) and "torch" in ops.available_backends(CPU)
    assert ops.resolve_backend(None, CPU) == "cpp"
    assert ops.resolve_backend("auto", CPU) == "cpp"


def test_argument_beats_env_var_beats_configured_default(monkeypatch):
    ops.set_default_backend("torch")
    assert ops.resolve_backend(None, CPU) == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "cpp")
    assert ops.resolve_backend(None, CPU) == "cpp"
    assert ops.resolve_backend("torch", CPU) == "torch"


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown ops backend 'fast' \(from the backend argument\); choose one of"):
        ops.resolve_backend("fast", CPU)
    with pytest.raises(ValueError, match="unknown ops backend 'cudnn'"):
        ops.set_default_backend("cudnn")
    monkeypatch.setenv(backends.ENV_VAR, "mps")
    with pytest.raises(ValueError, match=r"'mps' \(from environment variable DANCEGRPO_OPS_BACKEND\)"):
        ops.resolve_backend(None, CPU)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="unknown ops backend 'fast'"):
        ops.fused_sde_step(x, x, sigma=0.5, sigma_next=0.4, eta=0.5, noise=x, backend="fast")


def test_gpu_only_backends_refuse_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors only"):
        ops.resolve_backend("cuda", CPU)
    with pytest.raises(RuntimeError, match="need a GPU.*TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", CPU)


def test_without_extension_auto_falls_back_to_torch_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(backends, "load_extension", lambda kind: None)
    monkeypatch.setattr(backends, "_fallback_logged", set())
    with caplog.at_level(logging.INFO, logger="dancegrpo.ops.backends"):
        assert ops.resolve_backend(None, CPU) == "torch"
        assert ops.resolve_backend(None, CPU) == "torch"
        x = torch.randn(2, 3)
        _, logp = ops.fused_sde_step(x, x, sigma=0.5, sigma_next=0.4, eta=0.5, noise=x)
    fallback = [r for r in caplog.records if "using the torch reference ops" in r.getMessage()]
    assert len(fallback) == 1 and "dancegrpo._ops_cpu is not built" in fallback[0].getMessage()
    assert logp.shape == (2,)
    with pytest.raises(RuntimeError, match=r"ops backend 'cpp' \(from the backend argument\) cannot run the fused ops "
                                           r"here: the CPU extension"):
        ops.resolve_backend("cpp", CPU)


def test_a_stale_build_is_not_used(monkeypatch, caplog):
    stale = types.SimpleNamespace(source_hash=12345)
    monkeypatch.setattr(extension.importlib, "import_module", lambda name: stale)
    with caplog.at_level(logging.WARNING, logger="dancegrpo.ops.extension"):
        assert extension._prebuilt("dancegrpo._ops_cpu", "cpu") is None
    assert "built from older sources than csrc/" in caplog.text
    current = types.SimpleNamespace(source_hash=extension._build_description()["source_hash"]("cpu"))
    monkeypatch.setattr(extension.importlib, "import_module", lambda name: current)
    assert extension._prebuilt("dancegrpo._ops_cpu", "cpu") is current


# ------------------------------------------------------------------ one rule: fused ops and sliding-tile attention
ENV_SOURCE = r"\(from environment variable DANCEGRPO_OPS_BACKEND\)"
GPU_ONLY = "triton kernels need a GPU"
# What DANCEGRPO_OPS_BACKEND=<name> gives on CPU tensors (no Triton interpreter, the C++ extension built), for
# the fused ops and for sliding-tile attention: a backend name, or (error type, message pattern).
ENV_OUTCOMES = {
    "torch": ("torch", "torch"),
    "auto": ("cpp", "torch"),
    "cpp": ("cpp", (RuntimeError, rf"ops backend 'cpp' {ENV_SOURCE} cannot run sliding-tile attention here: there "
                                  r"is no cpp implementation of sliding-tile attention \(implemented: torch, triton, "
                                  r"flex\)\. Available for cpu: \['torch', 'flex'\]")),
    "flex": ((RuntimeError, rf"ops backend 'flex' {ENV_SOURCE} cannot run the fused ops here: there is no flex "
                            r"implementation of the fused ops \(implemented: torch, cpp, triton, cuda\)"), "flex"),
    "triton": ((RuntimeError, rf"ops backend 'triton' {ENV_SOURCE} cannot run the fused ops here: {GPU_ONLY}"),
               (RuntimeError, rf"ops backend 'triton' {ENV_SOURCE} cannot run sliding-tile attention here: "
                              rf"{GPU_ONLY}")),
    "bogus": ((ValueError, rf"unknown ops backend 'bogus' {ENV_SOURCE}; choose one of \('auto', 'torch', 'cpp', "
                           r"'triton', 'cuda', 'flex'\)"),) * 2,
}


@pytest.mark.parametrize("name", list(ENV_OUTCOMES))
def test_fused_ops_and_sta_honour_the_env_var_the_same_way(monkeypatch, name):
    from dancegrpo.attention.sta import STA_OP
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(backends.ENV_VAR, name)
    for op, expected in zip((backends.FUSED_OPS, STA_OP), ENV_OUTCOMES[name]):
        if isinstance(expected, str):
            assert ops.resolve_backend(None, CPU, op) == expected, op
        else:
            with pytest.raises(expected[0], match=expected[1]):
                ops.resolve_backend(None, CPU, op)
        assert ops.resolve_backend("torch", CPU, op) == "torch"   # the argument beats the environment variable


def test_sta_attention_runs_the_backend_the_rule_picks(monkeypatch):
    """The env var, then set_default_backend, choose what sta_attention runs; its results agree."""
    from dancegrpo.attention import sta
    ran = []
    for name in ("flex_sta_attention", "sta_reference"):
        original = getattr(sta, name)
        monkeypatch.setattr(sta, name, lambda *a, _f=original, _n=name, **k: (ran.append(_n), _f(*a, **k))[1])
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 32 + 3, 8, generator=gen) for _ in range(3))   # canvas 2x4x4, 3 text tokens
    args = (q, k, v, (2, 4, 4), [1, 1, 1], (1, 4, 4))                           # two tiles, each attends itself
    outs = {}
    monkeypatch.setenv(backends.ENV_VAR, "flex")
    outs["flex"] = sta.sta_attention(*args)
    monkeypatch.delenv(backends.ENV_VAR)
    ops.set_default_backend("torch")
    outs["torch"] = sta.sta_attention(*args)
    ops.set_default_backend(None)
    outs["auto"] = sta.sta_attention(*args)                   # auto on CPU: torch
    assert ran == ["flex_sta_attention", "sta_reference", "sta_reference"]
    torch.testing.assert_close(outs["flex"], outs["torch"], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match=r"ops backend 'cpp' \(from the backend argument\) cannot run "
                                           r"sliding-tile attention here"):
        sta.sta_attention(*args, backend="cpp")
    with pytest.raises(ValueError, match="'reference' was renamed 'torch'"):
        sta.sta_attention(*args, backend="reference")


def _training_step(v, x, prev, old_logp, adv, sigma, sigma_next, backend):
    _, logp = ops.fused_sde_step(v, x, prediction="flow", sigma=sigma, sigma_next=sigma_next, eta=0.7,
                                 prev_sample=prev, backend=backend)
    out = ops.fused_clipped_loss(logp, old_logp, adv, 1e-2, 5.0, backend=backend)
    return out.loss, out.clip_fraction


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_torch_compile_fullgraph_traces_through_the_ops(backend):
    """Dynamo captures the whole function (fullgraph=True) and AOTAutograd runs the registered
    fake and backward implementations; aot_eager skips inductor's code generation to stay fast."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x, prev = torch.randn(3, 2, 5, 7, generator=gen), torch.randn(3, 2, 5, 7, generator=gen)
    sigma = torch.tensor([0.9, 0.6, 0.3])
    old_logp, adv = torch.randn(3, generator=gen) - 5, torch.randn(3, generator=gen)
    v_eager = torch.randn(3, 2, 5, 7, generator=gen, requires_grad=True)
    v_compiled = v_eager.detach().clone().requires_grad_()

    loss, frac = _training_step(v_eager, x, prev, old_logp, adv, sigma, sigma - 0.1, backend)
    loss.backward()
    compiled = torch.compile(_training_step, fullgraph=True, backend="aot_eager")
    c_loss, c_frac = compiled(v_compiled, x, prev, old_logp, adv, sigma, sigma - 0.1, backend)
    c_loss.backward()
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(c_frac, frac)
    torch.testing.assert_close(v_compiled.grad, v_eager.grad, rtol=1e-5, atol=1e-9)
    # the loss really depends on the model output through the ops
    assert v_eager.grad.abs().sum() > 0


def test_torch_compile_keeps_the_std_check():
    compiled = torch.compile(lambda v, x, eta: ops.fused_sde_step(v, x, sigma=0.5, sigma_next=0.4, eta=eta,
                                                                  noise=x, backend="cpp").log_prob,
                             fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3)
    assert compiled(x, x, torch.tensor([0.5, 0.5])).shape == (2,)
    with pytest.raises(RuntimeError, match="std must be > 0"):
        compiled(x, x, torch.tensor([0.5, 0.0]))


def test_fused_loss_is_a_drop_in_for_the_grpo_loss():
    new = torch.randn(9)
    out = ops.fused_clipped_loss(new, new + 1e-3, torch.randn(9), 1e-4, 5.0, backend="cpp")
    assert isinstance(out, grpo.ClippedLossOutput)
