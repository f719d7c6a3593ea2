"""Fused ops x backends x sizes, forward and forward+backward (pytest-benchmark).

    python -m pytest bench/test_bench_ops.py -q          # or python -m bench

Sizes: latents of real models (FLUX 720x720 image: 16x90x90, batch 8; HunyuanVideo
480x480x53 frames: 16x14x60x60, batch 1) and a small one; loss sizes N = 16 (one
micro-batch), 4096, 262144. Backends: every one available for the device.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.conftest import SHORT
from dancegrpo import ops

DEVICE = torch.device(os.environ.get("DANCEGRPO_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
if DEVICE.type == "cpu":
    ops.build_cpu_extension()
BACKENDS = ops.available_backends(DEVICE)

LATENTS = {"small": (8, 16, 16, 16), "image": (8, 16, 90, 90), "video": (1, 16, 14, 60, 60)}
if SHORT:
    LATENTS = {"small": (8, 16, 16, 16), "image": (8, 16, 90, 90)}
LOSS_SIZES = [16, 4096] if SHORT else [16, 4096, 262144]
DTYPES = [torch.float32, torch.bfloat16]
# Tensors of the latent's size that the fused kernel reads or writes, per mode.
TRAFFIC = {"rollout": 4, "forward": 3, "forward+backward": 7}


def _latents(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype) for _ in range(3)]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", list(LATENTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(TRAFFIC))
def test_sde_step(record, backend, size, dtype, mode):
    shape = LATENTS[size]
    x, v, noise = _latents(shape, dtype)
    sigma = torch.linspace(0.9, 0.3, shape[0], device=DEVICE)
    kw = dict(prediction="flow", sigma=sigma, sigma_next=sigma - 0.05, eta=0.3, backend=backend)
    prev, _ = ops.fused_sde_step(v, x, noise=noise, **kw)

    if mode == "rollout":
        def fn():
            with torch.no_grad():
                ops.fused_sde_step(v, x, noise=noise, **kw)
            _sync()
    elif mode == "forward":
        def fn():
            with torch.no_grad():
                ops.fused_sde_step(v, x, prev_sample=prev, **kw)
            _sync()
    else:
        v_grad = v.clone().requires_grad_()
        weights = torch.randn(shape[0], device=DEVICE)

        def fn():
            _, logp = ops.fused_sde_step(v_grad, x, prev_sample=prev, **kw)
            torch.autograd.grad((logp * weights).sum(), v_grad)
            _sync()

    nbytes = TRAFFIC[mode] * x.numel() * x.element_size()
    record(fn, op="sde_step", backend=backend, mode=mode, shape=shape, dtype=dtype, nbytes=nbytes, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", LOSS_SIZES)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_clipped_loss(record, backend, n, mode):
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(n, generator=gen).to(DEVICE)
    new = (old + 1e-3 * torch.randn(n, generator=gen).to(DEVICE)).requires_grad_(mode != "forward")
    adv = torch.randn(n, generator=gen).to(DEVICE)

    def fn():
        out = ops.fused_clipped_loss(new, old, adv, 1e-3, 5.0, backend=backend)
        if mode != "forward":
            torch.autograd.grad(out.loss, new)
        _sync()

    # reads new, old, adv; writes ratio and grad
    record(fn, op="clipped_loss", backend=backend, mode=mode, shape=(n,), dtype=torch.float32, nbytes=5 * 4 * n,
           device=DEVICE)
