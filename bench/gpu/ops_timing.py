"""(b) Fused SDE step timings: every ops backend, torch eager, torch.compile of the same math, copy ceiling.

Per latent size and mode, the median time per call of:
- each dancegrpo.ops backend available on the device, through the public entry points:
  `fused_sde_step` with float schedule values (row "<backend>") and `sampler_step` with a
  FlowSampler and a (B,) step tensor, as the trainer calls it (row "<backend>/sampler_step");
- "eager": the same step written as plain torch in float32 (the DanceGRPO flow step, the
  latents up-cast, the action cast back to the latent dtype), and "compile": torch.compile of
  that function (inductor on a GPU; aot_eager with --tiny, which checks tracing without C++ codegen);
- "copy": `x.clone()` of one latent, the device's bandwidth ceiling for these bytes.
Modes: "rollout" (sample the action and its log-prob; no gradient) and "logprob_fwd_bwd" (the
log-prob of a recorded action and its backward w.r.t. the model output, as in training).

Bytes counted per call: 4 latents in both modes (rollout reads v, x, noise and writes the
action; training reads v, x, the action and writes the gradient), the minimum either needs.
GB/s = those bytes / time; frac_of_copy = GB/s over the copy's (2 latents / copy time).
Timing: triton.testing.do_bench on a GPU, a perf_counter median on a CPU (bench.gpu.common.time_ms).
"""
from __future__ import annotations

import math

import torch

from .common import Context, markdown_table, time_ms

NAME = "ops_timing"
TITLE = "(b) Fused SDE step: time per call"
# (shape, dtype) at the sizes: FLUX 720x720 latents x 8, HunyuanVideo 480x480x53, 720p x 129 frames x 4.
FULL_SIZES = [((8, 16, 90, 90), "float32"), ((1, 16, 14, 60, 60), "bfloat16"), ((4, 16, 21, 90, 160), "float32")]
TINY_SIZES = [((2, 4, 8, 8), "float32"), ((1, 4, 2, 6, 6), "bfloat16")]
MODES = ("rollout", "logprob_fwd_bwd")
SIGMA, SIGMA_NEXT, ETA = 0.7, 0.62, 0.7
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def units(ctx: Context) -> list[str]:
    sizes = TINY_SIZES if ctx.tiny else FULL_SIZES
    return [f"{'x'.join(map(str, shape))}/{dtype}/{mode}" for shape, dtype in sizes for mode in MODES]


def _mean_std(v, x, s, s_next, eta):
    """The DanceGRPO flow step in float32 (see bench.gpu.correctness for the formula)."""
    x, v = x.float(), v.float()
    dt = s_next - s
    x0 = x - s * v
    score = -(x - (1 - s) * x0) / s ** 2
    return x + dt * v - 0.5 * eta ** 2 * score * dt, eta * math.sqrt(s - s_next)


def plain_rollout(v, x, noise, s, s_next, eta):
    mean, std = _mean_std(v, x, s, s_next, eta)
    action = (mean + std * noise.float()).to(x.dtype)
    logp = (-((action.float() - mean) ** 2) / (2 * std ** 2) - math.log(std) - HALF_LOG_2PI).flatten(1).mean(1)
    return action, logp


def plain_log_prob(v, x, prev, s, s_next, eta):
    mean, std = _mean_std(v, x, s, s_next, eta)
    return (-((prev.float() - mean) ** 2) / (2 * std ** 2) - math.log(std) - HALF_LOG_2PI).flatten(1).mean(1)


def run_unit(ctx: Context, unit: str) -> list[dict]:
    from dancegrpo import ops
    from dancegrpo.sampler import FlowSampler
    shape_text, dtype_name, mode = unit.split("/")
    shape = tuple(int(n) for n in shape_text.split("x"))
    dtype, device = getattr(torch, dtype_name), ctx.device
    gen = torch.Generator(device).manual_seed(0)
    v, x, noise = (torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(3))
    nbytes = x.numel() * x.element_size()
    compile_backend = "aot_eager" if ctx.tiny else "inductor"
    backends = [b for b in ops.BACKENDS if b in ops.available_backends(device)]
    skipped = {b: _why_unavailable(b, device) for b in ops.BACKENDS if b not in backends}
    # A sampler whose step 5 is at some sigma: the trainer's path through precomputed schedules.
    sampler = FlowSampler(16, shift=3.0, eta=ETA, device=device)
    step = torch.full((shape[0],), 5, device=device, dtype=torch.long)
    prev = plain_rollout(v, x, noise, SIGMA, SIGMA_NEXT, ETA)[0]
    weights = torch.ones(shape[0], device=device)
    impls: dict[str, callable] = {}
    if mode == "rollout":
        compiled = torch.compile(plain_rollout, backend=compile_backend, dynamic=False)
        for b in backends:
            impls[b] = lambda b=b: ops.fused_sde_step(v, x, prediction="flow", sigma=SIGMA, sigma_next=SIGMA_NEXT,
                                                      eta=ETA, noise=noise, backend=b)
            impls[f"{b}/sampler_step"] = lambda b=b: ops.sampler_step(sampler, v, x, step, noise=noise, backend=b)
        impls["eager"] = lambda: plain_rollout(v, x, noise, SIGMA, SIGMA_NEXT, ETA)
        impls["compile"] = lambda: compiled(v, x, noise, SIGMA, SIGMA_NEXT, ETA)
    else:
        compiled = torch.compile(plain_log_prob, backend=compile_backend, dynamic=False)
        vg = v.detach().clone().requires_grad_(True)

        def train(fn):
            vg.grad = None
            fn().backward(weights)

        for b in backends:
            impls[b] = lambda b=b: train(lambda: ops.fused_sde_step(
                vg, x, prediction="flow", sigma=SIGMA, sigma_next=SIGMA_NEXT, eta=ETA, prev_sample=prev,
                backend=b).log_prob)
            impls[f"{b}/sampler_step"] = lambda b=b: train(
                lambda: ops.sampler_step(sampler, vg, x, step, prev_sample=prev, backend=b).log_prob)
        impls["eager"] = lambda: train(lambda: plain_log_prob(vg, x, prev, SIGMA, SIGMA_NEXT, ETA))
        impls["compile"] = lambda: train(lambda: compiled(vg, x, prev, SIGMA, SIGMA_NEXT, ETA))
    impls["copy"] = lambda: x.clone()
    base = dict(shape=shape_text, dtype=dtype_name, mode=mode, latent_mb=nbytes / 1e6, device=str(device))
    rows, copy_gbs = [], None
    for name in ["copy", *[k for k in impls if k != "copy"]]:
        row = dict(base, impl=name)
        try:
            with torch.no_grad() if mode == "rollout" or name == "copy" else torch.enable_grad():
                ms = time_ms(impls[name], device, ctx.tiny)
            moved = 2 * nbytes if name == "copy" else 4 * nbytes
            gbs = moved / ms / 1e6
            if name == "copy":
                copy_gbs = gbs
            row.update(status="ok", ms=ms, us=ms * 1e3, gb_per_s=gbs,
                       frac_of_copy=gbs / copy_gbs if copy_gbs else None)
        except Exception as exc:   # one implementation failing must not hide the others
            row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        rows.append(row)
    for b, why in skipped.items():
        rows.append(dict(base, impl=b, status="skipped", reason=why))
    compile_row = next((r for r in rows if r["impl"] == "compile" and r["status"] == "ok"), None)
    for row in rows:
        if compile_row and row.get("status") == "ok":
            row["vs_compile"] = compile_row["ms"] / row["ms"]
    return rows


def _why_unavailable(backend: str, device: torch.device) -> str:
    from dancegrpo import ops
    try:
        ops.resolve_backend(backend, device)
    except (RuntimeError, ValueError) as exc:
        return str(exc).split(". Available")[0]
    return "not available"


def summarize(rows: list[dict], ctx: Context) -> str:
    measured = [r for r in rows if r.get("status") == "ok"]
    table = markdown_table(measured, ["shape", "dtype", "mode", "impl", "us", "gb_per_s", "frac_of_copy", "vs_compile"],
                           ["latent", "dtype", "mode", "implementation", "us per call", "GB/s", "of copy bandwidth",
                            "speed vs compile"])
    skipped = sorted({f"{r['impl']}: {r.get('reason', '')}" for r in rows if r.get("status") == "skipped"})
    errors = [f"{r['impl']} at {r['shape']} {r['mode']}: {r.get('error')}" for r in rows if r.get("status") == "error"]
    text = table + "\n\n'speed vs compile' > 1 means faster than torch.compile of the same math."
    if skipped:
        text += "\n\nSkipped backends: " + "; ".join(skipped) + "."
    if errors:
        text += "\n\nErrors:\n" + "\n".join(f"- {e}" for e in errors)
    return text
