"""(c) Sliding-tile attention against dense SDPA (flash) on the real token counts.

For each HunyuanVideo token canvas (after 2x2 patchify: 14x30x30 is the recipe's 480x480x53,
30x48x80 is 720p x 117 frames) plus 256 text tokens, 24 heads of 128, bfloat16, batch 1:

- "dense_real": F.scaled_dot_product_attention over the real N = T*H*W + 256 tokens (no tile
  padding, no mask) under the flash backend, timed here (triton.testing.do_bench);
- per window: bench.sta_bench.run_case (STA Triton kernel, flex_attention on the same block
  mask, dense SDPA on the padded layout, the dense-mask reference where it fits), and if that
  fails, the public op dancegrpo.attention.sta.sta_attention alone, timed here.

The headline is dense_real time / STA time (forward, and forward + backward), > 1 = STA faster.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from .common import Context, error_tail, markdown_table, time_ms

NAME = "sta"
TITLE = "(c) Sliding-tile attention vs dense flash attention (real token counts)"
FULL = dict(cases=[("14x30x30", "1x3x3"), ("14x30x30", "3x3x3"), ("30x48x80", "3x3x3"), ("30x48x80", "5x6x10")],
            tile=(6, 8, 8), heads=24, head_dim=128, text=256, iters=3)
TINY = dict(cases=[("2x8x8", "1x1x1")], tile=(1, 4, 4), heads=2, head_dim=16, text=8, iters=2)


def _setup(ctx: Context) -> dict:
    return TINY if ctx.tiny else FULL


def units(ctx: Context) -> list[str]:
    setup = _setup(ctx)
    canvases = list(dict.fromkeys(c for c, _ in setup["cases"]))
    return [f"dense_real/{c}" for c in canvases] + [f"sta/{c}/{w}" for c, w in setup["cases"]]


def _triple(text: str) -> tuple[int, int, int]:
    return tuple(int(n) for n in text.split("x"))  # type: ignore[return-value]


def _dtype(ctx: Context) -> torch.dtype:
    return torch.bfloat16 if ctx.cuda else torch.float32


def _attention_pair(fn, inputs, device, tiny) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of fn() w.r.t. inputs."""
    with torch.no_grad():
        fwd = time_ms(fn, device, tiny)
    grad = torch.randn_like(inputs[0])
    fwd_bwd = time_ms(lambda: torch.autograd.grad(fn(), inputs, grad), device, tiny)
    return fwd, fwd_bwd


def dense_real(ctx: Context, canvas_text: str) -> dict:
    setup, canvas = _setup(ctx), _triple(canvas_text)
    n = math.prod(canvas) + setup["text"]
    shape = (1, setup["heads"], n, setup["head_dim"])
    q, k, v = (torch.randn(shape, device=ctx.device, dtype=_dtype(ctx), requires_grad=True) for _ in range(3))

    def attend():
        if ctx.cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    fwd, fwd_bwd = _attention_pair(attend, [q, k, v], ctx.device, ctx.tiny)
    flops = 4 * setup["head_dim"] * setup["heads"] * n * n
    return dict(canvas=canvas_text, window="dense", backend="dense_real", tokens=n, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                fwd_tflops=flops / fwd / 1e9, fwd_bwd_tflops=3.5 * flops / fwd_bwd / 1e9, source="bench.gpu.sta",
                status="ok")


def sta_case(ctx: Context, canvas_text: str, window: str) -> list[dict]:
    setup = _setup(ctx)
    args = argparse.Namespace(text=setup["text"], heads=setup["heads"], head_dim=setup["head_dim"], batch=1,
                              iters=setup["iters"], tiny=ctx.tiny)
    try:
        from bench import sta_bench
        rows = sta_bench.run_case(_triple(canvas_text), window, setup["tile"], args, ctx.device, _dtype(ctx))
        out = []
        for row in rows:
            row = dict(row, canvas=canvas_text, window=window, source="bench.sta_bench.run_case", status="ok")
            out.append(row)
        return out
    except Exception as exc:   # the bench's full case (flex, the dense mask) may not fit: time the op alone
        reason = error_tail(exc, 600)
    row = _sta_op_alone(ctx, canvas_text, window, setup)
    row["note"] = "bench.sta_bench.run_case failed: " + reason.strip().splitlines()[-1][:300]
    return [row]


def _sta_op_alone(ctx: Context, canvas_text: str, window: str, setup: dict) -> dict:
    from dancegrpo.attention.sta import sta_attention
    canvas = _triple(canvas_text)
    n = math.prod(canvas) + setup["text"]
    shape = (1, setup["heads"], n, setup["head_dim"])
    q, k, v = (torch.randn(shape, device=ctx.device, dtype=_dtype(ctx), requires_grad=True) for _ in range(3))
    backend = "triton" if ctx.cuda else "torch"
    fwd, fwd_bwd = _attention_pair(lambda: sta_attention(q, k, v, canvas, list(_triple(window)), setup["tile"], None,
                                                         backend=backend), [q, k, v], ctx.device, ctx.tiny)
    return dict(canvas=canvas_text, window=window, backend=f"sta_{backend}", tokens=n, fwd_ms=fwd,
                fwd_bwd_ms=fwd_bwd, source="dancegrpo.attention.sta.sta_attention", status="ok")


def run_unit(ctx: Context, unit: str) -> list[dict]:
    parts = unit.split("/")
    if parts[0] == "dense_real":
        return [dense_real(ctx, parts[1])]
    return sta_case(ctx, parts[1], parts[2])


def headline(rows: list[dict]) -> list[dict]:
    """One line per (canvas, window): dense_real against the STA kernel (Triton, else the best sparse one)."""
    dense = {r["canvas"]: r for r in rows if r.get("backend") == "dense_real" and r.get("status") == "ok"}
    out = []
    cases = list(dict.fromkeys((r["canvas"], r["window"]) for r in rows if r.get("window") not in (None, "dense")))
    for canvas, window in cases:
        candidates = [r for r in rows if r.get("canvas") == canvas and r.get("window") == window
                      and str(r.get("backend", "")).startswith("sta_") and r.get("status") == "ok"]
        if not candidates:
            candidates = [r for r in rows if r.get("canvas") == canvas and r.get("window") == window
                          and r.get("backend") == "flex" and r.get("status") == "ok"]
        sta = candidates[0] if candidates else None
        d = dense.get(canvas)
        line = dict(canvas=canvas, window=window, tokens=d["tokens"] if d else None,
                    dense_fwd_ms=d["fwd_ms"] if d else None, dense_fwd_bwd_ms=d["fwd_bwd_ms"] if d else None,
                    sparse=sta["backend"] if sta else None, sta_fwd_ms=sta["fwd_ms"] if sta else None,
                    sta_fwd_bwd_ms=sta.get("fwd_bwd_ms") if sta else None,
                    fraction=sta.get("fraction") if sta else None)
        if d and sta:
            line["speedup_fwd"] = d["fwd_ms"] / sta["fwd_ms"]
            if sta.get("fwd_bwd_ms"):
                line["speedup_fwd_bwd"] = d["fwd_bwd_ms"] / sta["fwd_bwd_ms"]
        out.append(line)
    return out


def summarize(rows: list[dict], ctx: Context) -> str:
    lines = headline(rows)
    text = markdown_table(lines, ["canvas", "window", "tokens", "fraction", "dense_fwd_ms", "sparse", "sta_fwd_ms",
                                  "speedup_fwd", "dense_fwd_bwd_ms", "sta_fwd_bwd_ms", "speedup_fwd_bwd"],
                          ["canvas", "window (tiles)", "real tokens", "attended fraction", "dense fwd ms",
                           "sparse kernel", "sparse fwd ms", "speed-up fwd", "dense fwd+bwd ms",
                           "sparse fwd+bwd ms", "speed-up fwd+bwd"])
    notes = sorted({f"{r['canvas']} {r['window']}: {r['note']}" for r in rows if r.get("note")})
    text += "\n\nDense: flash SDPA over the real tokens (no tile padding). Every backend's row (including flex, " \
            "dense SDPA on the padded layout and the dense-mask reference) is in sta.csv."
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text
