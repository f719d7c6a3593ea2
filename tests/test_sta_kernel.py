"""The STA Triton kernels, forward and all gradients, against the dense-mask SDPA reference.

On a machine without CUDA the kernels run under the Triton interpreter, which must be
enabled before anything imports triton, so the cases run in fresh subprocesses
(TRITON_INTERPRET=1) of this same file, a few cases each; with CUDA they run on the GPU
directly (autotuned launch shapes; the interpreter runs one untuned shape, and the
`launch_shapes` test forces the others).

Tolerance (float32): the kernel accumulates in float32 with IEEE products, in a different
summation order than SDPA; errors are a few float32 ulps of O(1) values, so atol 2e-5 and
rtol 1e-4 leave ample margin while still catching any wrong mask entry (O(0.1) changes).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dancegrpo.attention import sta_reference
from dancegrpo.attention.sta import STAFunction, kernel_plan, sta_attention

RUN_KERNELS = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {
    # canvas, tile, window(s), text tokens, text valid per batch row, batch
    "per_head_windows_text": ((3, 5, 6), (2, 2, 4), [[1, 3, 1], [2, 1, 2]], 5, [4, 2], 2),
    "odd_canvas_no_text": ((5, 3, 7), (2, 2, 4), [1, 1, 1], 0, None, 1),
    "shared_window_border": ((4, 6, 4), (1, 4, 4), [3, 1, 1], 3, [3], 1),
    "full_window": ((3, 4, 5), (2, 2, 4), [9, 9, 9], 4, [2], 1),
    # 3x4x4 tiles (48 tokens, block 16) on T = 4: the second time tile holds t = 3 only, so two of its three
    # blocks are padding alone and are skipped as queries and as keys
    "fully_padded_blocks": ((4, 4, 4), (3, 4, 4), [1, 1, 1], 3, [2], 1),
    # tile "auto" on 2x3x10: 2x4x8 (64 tokens, block 64), padded to 2x4x16
    "auto_tile": ((2, 3, 10), "auto", [1, 1, 1], 3, [3], 1),
}


def _inputs(canvas, text, batch, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = canvas[0] * canvas[1] * canvas[2] + text
    return [torch.randn(batch, 2, n, 8, generator=generator, dtype=dtype).to(DEVICE).requires_grad_()
            for _ in range(3)]


def _text_valid(text, lengths):
    if lengths is None:
        return None
    return (torch.arange(text)[None] < torch.tensor(lengths)[:, None]).to(DEVICE)


if RUN_KERNELS:
    @pytest.mark.parametrize("name", list(CASES))
    def test_triton_kernel_forward_and_gradients(name):
        canvas, tile, window, text, lengths, batch = CASES[name]
        q, k, v = _inputs(canvas, text, batch, torch.float32)
        text_valid = _text_valid(text, lengths)
        out = sta_attention(q, k, v, canvas, window, tile, text_valid, backend="triton")
        ref = sta_reference(q, k, v, canvas, window, tile, text_valid)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(ref, (q, k, v), grad)
        for name_, a, b in zip("qkv", got, want):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"d{name_}")

    def test_triton_kernel_float16():
        canvas, tile, window = (2, 4, 4), (1, 4, 4), [1, 1, 1]
        q, k, v = _inputs(canvas, 3, 1, torch.float16)
        out = sta_attention(q, k, v, canvas, window, tile, backend="triton")
        ref = sta_reference(*(x.float() for x in (q, k, v)), canvas, window, tile)
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
        dq = torch.autograd.grad(out.float().square().sum(), q)[0]
        dq_ref = torch.autograd.grad(ref.square().sum(), q)[0]
        torch.testing.assert_close(dq.float(), dq_ref.float(), atol=1e-2, rtol=1e-2)

    def test_triton_kernel_skips_blocks():
        # window 1 on a 4x1x1 tile grid: each video block visits its own tile and the text block only
        plan = kernel_plan((4, 4, 4), [1, 1, 1], (1, 4, 4), text_tokens=3, device=DEVICE)
        assert plan.block == 16 and plan.kv_count[0, :4].tolist() == [2, 2, 2, 2]
        assert plan.kv_count[0, 4].item() == 5  # text queries attend everything

    def test_triton_text_only_queries():
        """Text queries over two text blocks (the second partly padding), one batch row with no valid text:
        each text row is plain attention over all real keys (checked without the STA mask code)."""
        canvas, tile, text = (1, 4, 4), (1, 4, 4), 20
        q, k, v = _inputs(canvas, text, 2, torch.float32, seed=3)
        text_valid = _text_valid(text, [20, 0])
        out = sta_attention(q, k, v, canvas, [1, 1, 1], tile, text_valid, backend="triton")
        key_valid = torch.cat([torch.ones(2, 16, dtype=torch.bool, device=DEVICE), text_valid], 1)
        want = torch.nn.functional.scaled_dot_product_attention(q[:, :, 16:], k, v, attn_mask=key_valid[:, None, None])
        torch.testing.assert_close(out[:, :, 16:], want, atol=2e-5, rtol=1e-4)
        grad = torch.zeros_like(out)
        grad[:, :, 16:] = torch.randn_like(out[:, :, 16:])   # gradients through the text rows only
        got = torch.autograd.grad(out, (q, k, v), grad)
        ref = sta_reference(q, k, v, canvas, [1, 1, 1], tile, text_valid)
        for name_, a, b in zip("qkv", got, torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"d{name_}")

    @pytest.mark.parametrize("config", [{"BLOCK_M": 16, "BLOCK_N": 32}, {"BLOCK_M": 32, "BLOCK_N": 16}])
    def test_triton_launch_shapes(config):
        """Programs of BLOCK_M queries / BLOCK_N keys inside the plan's 32-token blocks (tile 1x4x8)."""
        canvas, tile, window, text = (2, 4, 8), (1, 4, 8), [[1, 1, 1], [3, 1, 1]], 5
        q, k, v = _inputs(canvas, text, 1, torch.float32, seed=4)
        text_valid = _text_valid(text, [3])
        plan = kernel_plan(canvas, window, tile, text, heads=2, device=DEVICE)
        assert plan.block == 32
        packed = [plan.pack(x) for x in (q, k, v)]
        out = plan.unpack(STAFunction.apply(*packed, plan.key_bias(text_valid, 1, DEVICE), plan, 8 ** -0.5, config))
        ref = sta_reference(q, k, v, canvas, window, tile, text_valid)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        grad = torch.randn_like(out)
        for name_, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), grad),
                               torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"d{name_}")

    def test_triton_launch_shape_must_divide_the_block():
        plan = kernel_plan((1, 4, 4), [1, 1, 1], (1, 4, 4), device=DEVICE)
        q = torch.zeros(1, 1, 16, 8, device=DEVICE)
        with pytest.raises(ValueError, match="BLOCK_M = 32"):
            STAFunction.apply(q, q, q, plan.key_bias(None, 1, DEVICE), plan, 1.0, {"BLOCK_M": 32})

    def test_triton_backend_in_the_hunyuan_processor_trains_like_the_reference():
        """Parameter gradients of a tiny HunyuanVideo transformer through STA: Triton vs reference."""
        from test_sta_processor import TILE, inputs, tiny_transformer

        from dancegrpo.attention.hunyuan_processor import install_sta
        grads = []
        for backend in ("triton", "torch"):
            model = tiny_transformer().to(DEVICE)
            install_sta(model, {"window": [[1, 1, 1], [3, 1, 1]], "tile": list(TILE), "backend": backend})
            batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in inputs().items()}
            model(**batch)[0].square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
else:
    # Each group runs in its own interpreter subprocess (a few cases each, to keep every test short).
    GROUPS = {
        "windows_padding_text": ("per_head_windows_text or fully_padded_blocks or auto_tile or text_only_queries", 4),
        "cases_launch_shapes": ("odd_canvas_no_text or shared_window_border or full_window or float16 or skips_blocks "
                                "or launch_shape", 8),
        "processor": ("hunyuan_processor", 1),
    }

    @pytest.mark.parametrize("group", list(GROUPS))
    def test_triton_kernels_under_the_interpreter(group):
        selection, expected = GROUPS[group]
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__,
               "-k", selection]
        result = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                                text=True, timeout=600)
        tail = (result.stdout + result.stderr)[-6000:]
        assert result.returncode == 0, tail
        assert f"{expected} passed" in tail and "skipped" not in tail, tail
