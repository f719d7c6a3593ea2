"""(d) FLUX.1-dev and HunyuanVideo training-step throughput, MFU and peak memory.

One unit per (model, activation-checkpointing setting, compile or not), measured by
bench.throughput.measure: the denoiser built from its published config with random weights
(bf16), forward and backward at the recipe's resolution and micro-batch, samples/s, MFU
(3 x forward FLOPs, bench.throughput.forward_flops, over the device's dense bf16 peak) and
the peak memory allocated. Units run in priority order (selective and full checkpointing
first, then with compile, then none, which may not fit), so a section that runs out of its
time budget still has the most useful rows. Few timed steps (2 after 1 warm-up, 2 warm-ups
with compile): a quick reading; `python -m bench.throughput` takes more.

Attention: when bench.throughput.measure accepts an `attention_backend` argument, the
suite's --attention-backend is passed through; otherwise torch chooses (recorded as "torch default").
"""
from __future__ import annotations

import inspect

import torch

from .common import Context, markdown_table

NAME = "model_steps"
TITLE = "(d) FLUX.1-dev and HunyuanVideo training steps: throughput, MFU, peak memory"
FULL_ORDER = ["selective", "full", "selective+compile", "full+compile", "none", "none+compile"]
TINY_UNITS = ["flux/selective", "hunyuan_video/full", "flux/full+compile"]


def units(ctx: Context) -> list[str]:
    if ctx.tiny:
        return list(TINY_UNITS)
    return [f"{model}/{setting}" for setting in FULL_ORDER for model in ("flux", "hunyuan_video")]


def _attention_kwargs(ctx: Context, measure) -> tuple[dict, str]:
    wanted = ctx.options.get("attention_backend")
    if "attention_backend" in inspect.signature(measure).parameters:
        return ({"attention_backend": wanted} if wanted else {}), wanted or "the bench's default"
    return {}, "torch default (bench.throughput has no attention_backend option in this checkout)"


def run_unit(ctx: Context, unit: str) -> list[dict]:
    from bench import throughput
    from bench.machine import device_name
    model, setting = unit.split("/")
    compiled = setting.endswith("+compile")
    work = throughput.recipe_workload(model, tiny=ctx.tiny)
    dtype = torch.float32 if ctx.tiny and not ctx.cuda else torch.bfloat16
    peak = throughput.peak_tflops(device_name(ctx.device)) if ctx.cuda else (0.5 if ctx.tiny else None)
    kwargs, attention = _attention_kwargs(ctx, throughput.measure)
    # --tiny: dynamo's "eager" backend traces the blocks (the compile path) without code generation
    compile_kwargs = {"backend": "eager" if ctx.tiny else "inductor"}
    row = throughput.measure(work, setting, ctx.device, dtype, iterations=1 if ctx.tiny else 2,
                             warmup=(2 if compiled else 1), peak=peak, compile_kwargs=compile_kwargs, **kwargs)
    return [dict(row, attention=attention, compile_backend=compile_kwargs["backend"] if compiled else "")]


def summarize(rows: list[dict], ctx: Context) -> str:
    measured = [r for r in rows if r.get("model")]
    for r in measured:
        for key in ("samples_per_s", "mfu", "peak_memory_gib", "step_s"):
            try:
                r[key] = float(r[key])
            except (KeyError, TypeError, ValueError):
                pass
    text = markdown_table(measured, ["model", "shape", "batch", "checkpointing", "compile", "status", "step_s",
                                     "samples_per_s", "mfu", "peak_memory_gib"],
                          ["model", "shape", "batch", "checkpointing", "compile", "status", "s per step",
                           "samples/s", "MFU", "peak GiB"])
    attention = sorted({r.get("attention", "") for r in measured})
    text += ("\n\nForward + backward of the denoiser only (no optimizer, no SDE arithmetic); MFU counts 3 x the "
             "forward FLOPs of bench.throughput.forward_flops over the dense bf16 peak. Attention: "
             + "; ".join(a for a in attention if a) + ".")
    return text
