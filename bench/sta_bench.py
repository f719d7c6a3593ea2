"""Sliding-tile attention benchmark: STA (Triton) vs dense SDPA vs flex_attention vs the dense-mask reference.

Times forward and forward+backward at HunyuanVideo's latent token canvases (after 2x2
patchify): 14x30x30 (480x480, 53 frames, the recipe) and 30x48x80 (720p, 117 frames), over
windows given in tiles, for `tile: auto` and the paper's 6x8x8 tile. STA and flex run on the
same packed layout and the same block lists (the kernel plan); dense is SDPA over all real
tokens with no mask (its flash backend on CUDA);
the reference is SDPA with the dense boolean mask (skipped where the N x N mask would not
fit). Dense attention runs on the real tokens (video + text, no tile padding). TFLOP/s
counts only attended blocks for the sparse backends (4*D FLOPs per query-key pair forward,
2.5x that backward) and all real pairs for dense; speedup is dense time / time; fraction is
the kernel's attended pairs (padding included) over dense's.

GPU:  python -m bench.sta_bench                       (bf16, sizes, windows and tiles above)
CPU:  python -m bench.sta_bench --tiny                (a tiny canvas, fp32, to prove it runs;
      the Triton kernel runs on a CPU only with TRITON_INTERPRET=1 set before starting)
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import RESULTS, commit, device_name, today  # noqa: E402
from dancegrpo.attention.sta import STAFunction, flex_sta_attention, kernel_plan  # noqa: E402
from dancegrpo.attention.sta_mask import resolve_tile, sta_reference  # noqa: E402

FULL_SIZES = ["14x30x30", "30x48x80"]
FULL_WINDOWS = ["1x3x3", "3x3x3", "3x5x5", "full"]
FULL_TILES = ["auto", "6x8x8"]
MASK_BYTES_LIMIT = 4 * 2 ** 30   # the reference's bool mask; larger is skipped


def tile_arg(text: str):
    """ "auto" or TxHxW."""
    return text if text == "auto" else triple(text)


def triple(text: str) -> tuple[int, int, int]:
    values = tuple(int(x) for x in text.split("x"))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not TxHxW")
    return values  # type: ignore[return-value]


def timed(fn, iters: int, device: torch.device) -> float:
    """Median seconds of fn() over iters runs, after one warm-up."""
    fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def attended_pairs(plan, batch: int) -> int:
    """Query-key pairs in attended blocks, summed over the plan's heads (1 when windows are shared)."""
    return plan.attended_pairs * batch


def run_case(canvas, window, tile, args, device, dtype) -> list[dict]:
    text = args.text
    heads, dim, batch = args.heads, args.head_dim, args.batch
    tile_name = tile if isinstance(tile, str) else "x".join(map(str, tile))
    tile = resolve_tile(tile, canvas)
    grid = [math.ceil(c / t) for c, t in zip(canvas, tile)]
    window_tiles = grid if window == "full" else list(triple(window))
    plan = kernel_plan(canvas, window_tiles, tile, text, heads, device)
    n = plan.num_tokens
    shape = (batch, heads, n, dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    key_bias = plan.key_bias(None, batch, device)
    scale = dim ** -0.5
    pairs_sparse = attended_pairs(plan, batch) * (heads if plan.block_mask.shape[0] == 1 else 1)
    n_real = math.prod(canvas) + text
    pairs_dense = batch * heads * n_real * n_real
    fraction = pairs_sparse / pairs_dense    # kernel pairs (padding included) over dense pairs on the real tokens

    packed = [q, k, v]
    unpacked = [torch.randn(batch, heads, n_real, dim, device=device, dtype=dtype, requires_grad=True)
                for _ in range(3)]
    # dense attention runs on the real tokens only (no tile padding): the speed-up is against what STA replaces
    backends = {"dense_sdpa": (lambda: _dense(*unpacked, device), unpacked, pairs_dense, True)}
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        backends["sta_triton"] = (lambda: STAFunction.apply(q, k, v, key_bias, plan, scale), packed, pairs_sparse,
                                  True)
    # flex_attention on a CPU has no backward and refuses inputs that require grad
    flex_inputs = packed if device.type == "cuda" else [x.detach() for x in packed]
    backends["flex"] = (lambda: flex_sta_attention(*flex_inputs, plan, key_bias, scale, all_text_valid=True), flex_inputs,
                        pairs_sparse, device.type == "cuda")
    mask_bytes = n_real ** 2 * (heads if plan.block_mask.shape[0] > 1 else 1)
    if mask_bytes <= MASK_BYTES_LIMIT:
        backends["dense_mask_reference"] = (lambda: sta_reference(*unpacked, canvas, window_tiles, tile), unpacked,
                                            pairs_sparse, True)
    rows = []
    for name, (forward, inputs, pairs, has_backward) in backends.items():
        with torch.no_grad():
            seconds = timed(forward, args.iters, device)
        row = dict(backend=name, canvas="x".join(map(str, canvas)), tile_choice=tile_name,
                   tile="x".join(map(str, tile)), window=window, tokens=n, fraction=fraction,
                   fwd_ms=seconds * 1e3, fwd_tflops=4 * dim * pairs / seconds / 1e12)
        if has_backward:
            grad = torch.randn_like(inputs[0])

            def forward_backward(forward=forward, inputs=inputs, grad=grad):
                torch.autograd.grad(forward(), inputs, grad)
            seconds = timed(forward_backward, args.iters, device)
            row.update(fwd_bwd_ms=seconds * 1e3, fwd_bwd_tflops=3.5 * 4 * dim * pairs / seconds / 1e12)
        rows.append(row)
    dense = rows[0]
    for row in rows:
        row["speedup_fwd"] = dense["fwd_ms"] / row["fwd_ms"]
        if "fwd_bwd_ms" in row and "fwd_bwd_ms" in dense:
            row["speedup_fwd_bwd"] = dense["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return rows


def _dense(q, k, v, device):
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="one tiny canvas in float32 (CPU smoke run)")
    parser.add_argument("--sizes", nargs="*", default=None, help="token canvases TxHxW")
    parser.add_argument("--windows", nargs="*", default=None, help="windows in tiles TxHxW, or 'full'")
    parser.add_argument("--tiles", "--tile", nargs="*", type=tile_arg, default=None, help="tiles TxHxW or 'auto'")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text", type=int, default=None, help="text tokens (HunyuanVideo: 256)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "sta.csv")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    args.sizes = args.sizes or (["2x8x8"] if tiny else FULL_SIZES)
    args.windows = args.windows or (["1x1x1", "full"] if tiny else FULL_WINDOWS)
    args.tiles = args.tiles or ([(1, 4, 4)] if tiny else [tile_arg(t) for t in FULL_TILES])
    args.heads = args.heads or (2 if tiny else 24)
    args.head_dim = args.head_dim or (16 if tiny else 128)
    args.text = args.text if args.text is not None else (8 if tiny else 256)
    args.iters = args.iters or (2 if tiny else 10)
    dtype = torch.float32 if tiny and device.type != "cuda" else torch.bfloat16
    rows = []
    cases = [(size, window, tile) for size in args.sizes for tile in args.tiles for window in args.windows]
    for size, window, tile in cases:
        for row in run_case(triple(size), window, tile, args, device, dtype):
            row.update(device=device_name(device), dtype=str(dtype).replace("torch.", ""), commit=commit(),
                       date=today())
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = sorted({key for row in rows for key in row}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
