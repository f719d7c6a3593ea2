"""Training throughput and MFU of the registered models' denoisers (FLUX.1-dev, HunyuanVideo, Wan, SD3.5, ...) on one GPU.

    python -m bench.throughput [--model flux hunyuan_video] [--settings none,full,selective,full+compile,...]
                               [--batch N] [--iterations 10] [--warmup 3] [--peak-tflops X]
    python -m bench.throughput --tiny      # tiny configs, any device (what the test runs on a CPU)

What is timed: the denoiser part of one GRPO training micro-step, forward and backward
through the real diffusers class built from the published config (random weights, bf16
parameters and gradients, as FSDP's bf16 compute copy holds them) at the recipe's
resolution and micro-batch (configs/flux_hps.yaml: 720x720, 2025 image + 512 text tokens;
configs/hunyuan_t2v.yaml: 480x480x53, 14x30x30 = 12600 video + 256 text tokens), followed
by a latent-sized loss. The optimizer step, the SDE log-prob arithmetic (element-wise on
the latent) and collectives are not included.

Rows (bench/results/throughput.csv): samples/s and tokens/s per GPU (tokens = the image or
video tokens of the samples; the text tokens ride along and are not counted), the model
TFLOP per step and the achieved TFLOP/s, MFU and HFU, and the peak memory allocated.

Settings: activation checkpointing none | full | selective (dancegrpo.distributed.blocks),
each optionally "+compile" (compile_blocks: torch.compile per block). A setting that runs
out of memory is recorded with status "OOM".

Sliding-tile attention (HunyuanVideo only): `--sta 1x3x3` (a window in tiles, `tile: auto`)
or `--sta '{"window": [1, 3, 3], "tile": [6, 8, 8]}'` (any `model.options.sta` mapping, see
docs/sta.md) adds, after each dense row, a row with the joint attention through STA
(`install_sta`; the CSV's "sta" column holds the options). Options that depend on the
sampling step (full_attention_steps, table) are measured at `--sta-step` (default 0).
FLOPs, MFU and HFU stay those of the dense model (the work the step replaces), so an STA
row's MFU is an effective figure: dense FLOPs per second of the sparse step.

Models: every registered model whose `ModelSpec` (dancegrpo.models.spec) gives a benchmark
recipe, a tiny config, token counts and forward FLOPs (today flux, hunyuan_video, sd35, qwen_image,
wan_t2v and wan_i2v: `python -m bench.throughput --model wan_t2v`); the
denoiser class, the published config, its inputs and its costs all come from the spec.
A row's batch counts denoiser rows: a CFG model (wan_t2v, wan_i2v, sd35, qwen_image) runs two rows
(conditional and unconditional) per training sample when cfg_scale != 1, so its samples/s per
training sample are half the row's. Every parameter is cast to the benchmark dtype, including the
modules diffusers keeps in fp32 when Wan is loaded with `torch_dtype` (its norms, time embedder,
modulation tables: small element-wise work, which the FLOP count leaves out anyway).

FLOPs (`forward_flops`: the spec's, exact for the matrix products and attention; tests compare
it with torch.utils.flop_counter on tiny configs): the double- and single-stream blocks,
HunyuanVideo's text token refiner blocks, the embeddings (patch / text projections, timestep,
guidance, pooled text) and the output head, as dancegrpo/models/transformer_costs.py counts them
with N = N_i + N_t tokens (N_i image/video, N_t text); Wan's self- and cross-attention blocks as
dancegrpo/models/wan_costs.py counts them, SD3.5's joint blocks and Qwen-Image's in their
modules. Non-matmul work (norms, RoPE, activations) is not counted. A training step is counted as
3 x forward (backward = 2 x forward) whatever the checkpointing: MFU counts the model's
FLOPs, not the recomputation's (which "hfu" in the CSV adds: +1 forward for full).
MFU = 3 x forward FLOPs x samples/s / (peak dense bf16 FLOP/s of the device): H100 SXM, H800
and H200: 989 TFLOP/s; A100: 312.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import REPO, RESULTS, append_csv_row, commit, device_name, load_average, today  # noqa: E402
from dancegrpo.attention.backends import BACKENDS as ATTENTION_BACKENDS, install_attention_backend  # noqa: E402
from dancegrpo.distributed.blocks import apply_activation_checkpointing, compile_blocks  # noqa: E402
from dancegrpo.memory_estimate import denoiser_inputs  # noqa: E402
from dancegrpo.models import get_model_spec, model_names  # noqa: E402

CSV = RESULTS / "throughput.csv"
FIELDS = ["model", "shape", "batch", "image_tokens", "text_tokens", "checkpointing", "compile", "dtype", "status",
          "step_s", "samples_per_s", "tokens_per_s", "model_tflop_per_step", "achieved_tflops", "peak_tflops", "mfu",
          "hfu", "peak_memory_gib", "iterations", "device", "load_average", "commit", "date", "sta", "attention_backend"]

# Dense bf16 tensor-core peak (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H100": 989.0, "H800": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0}

#: What the benchmark reads from a model's spec (dancegrpo.models.spec.ModelSpec).
SPEC_FIELDS = ("denoiser_class", "denoiser_config", "denoiser_inputs", "token_counts", "forward_flops", "bench_recipe",
               "tiny_config", "tiny_options")
SETTINGS = ("none", "full", "selective", "full+compile", "selective+compile")


# ---------------------------------------------------------------------------------------------
# Shapes and FLOPs

def bench_models() -> list[str]:
    """Registered models this benchmark can run (their specs set every field of SPEC_FIELDS)."""
    return model_names(*SPEC_FIELDS)


def token_counts(model_name: str, config: dict, options: dict) -> tuple[int, int]:
    """(image or video tokens, text tokens) of one sample, as the adapters feed the transformer."""
    return get_model_spec(model_name).require("bench.throughput", "token_counts").token_counts(config, options)


def forward_flops(model_name: str, config: dict, image_tokens: int, text_tokens: int, batch: int = 1) -> int:
    """Matmul + attention FLOPs of one forward of the denoiser on `batch` samples (see the module docstring)."""
    spec = get_model_spec(model_name).require("forward_flops", "forward_flops")
    return batch * spec.forward_flops(config, image_tokens, text_tokens)


def peak_tflops(device: str) -> float | None:
    """Dense bf16 peak of a device by name, or None if unknown (pass --peak-tflops)."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# The measurement

@dataclass
class Workload:
    model_name: str
    class_name: str
    config: dict
    options: dict
    batch: int

    @property
    def tokens(self) -> tuple[int, int]:
        return token_counts(self.model_name, self.config, self.options)

    @property
    def shape(self) -> str:
        o = self.options
        return f"{o['height']}x{o['width']}" + (f"x{o['frames']}" if "frames" in o else "")


def recipe_workload(model_name: str, batch: int | None = None, tiny: bool = False) -> Workload:
    """The recipe's resolution and micro-batch (the spec's `bench_recipe`), or the tiny test size."""
    spec = get_model_spec(model_name).require("bench.throughput", *SPEC_FIELDS)
    if tiny:
        config, options, micro_batch = spec.tiny_config, spec.tiny_options, spec.tiny_batch
    else:
        config = spec.denoiser_config
        cfg = yaml.safe_load((REPO / spec.bench_recipe).read_text())
        keys = ("height", "width", "frames", "max_sequence_length")   # the text length, where a recipe sets it
        options = {k: v for k, v in cfg["model"]["options"].items() if k in keys}
        micro_batch = cfg["trainer"]["micro_batch_size"]
    return Workload(model_name, spec.denoiser_class, dict(config), dict(options), batch or micro_batch)


def build_denoiser(work: Workload, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The diffusers class from its config, random weights, created on `device` (no host copy)."""
    import diffusers
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(diffusers, work.class_name).from_config(work.config)
    return model.to(dtype).train()


def _inputs(work: Workload, device: torch.device, dtype: torch.dtype) -> dict:
    options = {**work.options, "max_sequence_length": work.tokens[1]}
    raw = denoiser_inputs(work.model_name, work.config, options, work.batch)
    return {k: v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in raw.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_step(model: torch.nn.Module, inputs: dict, device: torch.device, iterations: int,
                       warmup: int) -> tuple[float, float | None]:
    """(median seconds per forward + backward, peak GiB allocated on CUDA or None)."""
    def step() -> None:
        for p in model.parameters():
            p.grad = None                      # as zero_grad(set_to_none=True) before each micro-step's backward
        out = model(**inputs)[0]
        out.float().square().mean().backward()

    for _ in range(warmup):                    # compilation and allocator warm-up
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iterations):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 1024 ** 3 if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def parse_setting(setting: str) -> tuple[str, bool]:
    """"selective+compile" -> ("selective", True)."""
    mode, _, extra = setting.partition("+")
    if mode not in ("none", "full", "selective") or extra not in ("", "compile"):
        raise ValueError(f"setting {setting!r}: use none | full | selective, optionally with +compile "
                         f"(e.g. {', '.join(SETTINGS)})")
    return mode, extra == "compile"


def parse_sta(spec: str) -> dict:
    """`--sta` value -> `model.options.sta` mapping: "TxHxW" (a window in tiles, tile auto) or a JSON mapping.

    Raises ValueError naming the value when it is neither, or when the options are invalid."""
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            options = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--sta {spec!r} is not valid JSON ({exc}); give e.g. 1x3x3 or "
                             f"'{{\"window\": [1, 3, 3]}}'") from None
    else:
        parts = spec.split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"--sta {spec!r}: give a window in tiles TxHxW (e.g. 1x3x3) or a JSON mapping of "
                             f"model.options.sta")
        options = {"window": [int(p) for p in parts]}
    from dancegrpo.attention.hunyuan_processor import STAOptions
    problems = STAOptions.from_dict(options).validate()
    if problems:
        raise ValueError(f"--sta {spec!r}: " + "; ".join(problems))
    return options


def install_attention(model: torch.nn.Module, work: Workload, sta: dict | None, sta_step: int | None = 0) -> None:
    """Route the denoiser's joint attention through STA (`sta` = model.options.sta) or leave it dense (None)."""
    if sta is None:
        return
    if not get_model_spec(work.model_name).sliding_tile_attention:
        raise ValueError(f"--sta: sliding-tile attention is for {', '.join(model_names('sliding_tile_attention'))}, "
                         f"not {work.model_name!r}")
    from dancegrpo.attention.hunyuan_processor import install_sta
    install_sta(model, sta).set_step(sta_step)


def measure(work: Workload, setting: str, device: torch.device, dtype: torch.dtype, iterations: int, warmup: int,
            peak: float | None, compile_kwargs: dict | None = None, sta: dict | None = None,
            sta_step: int | None = 0, attention_backend: str = "auto") -> dict:
    """One CSV row: throughput, FLOP rates and memory of `work` under `setting`.

    sta: a `model.options.sta` mapping to run the joint attention through sliding-tile attention
    (None = dense, as before); sta_step: the sampling step its step-dependent windows use.
    attention_backend: the dense attention kernels, as `model.options.attention_backend` chooses
    them in training (dancegrpo.attention.backends; "auto" never picks cuDNN on CUDA, whose
    backward failed on the FLUX.1-dev step on an H200)."""
    mode, compiled = parse_setting(setting)
    gc.collect()   # what a previous setting (an OOM's traceback) may still hold
    image_tokens, text_tokens = work.tokens
    flops = 3 * forward_flops(work.model_name, work.config, image_tokens, text_tokens, work.batch)
    recompute = forward_flops(work.model_name, work.config, image_tokens, text_tokens, work.batch) \
        if mode == "full" else 0
    row = dict(model=work.model_name, shape=work.shape, batch=work.batch, image_tokens=image_tokens,
               text_tokens=text_tokens, checkpointing=mode, compile=compiled, dtype=str(dtype).replace("torch.", ""),
               model_tflop_per_step=f"{flops / 1e12:.6g}", peak_tflops=peak or "", iterations=iterations,
               device=device_name(device), load_average=load_average(), commit=commit(), date=today(),
               sta=json.dumps(sta, sort_keys=True) if sta is not None else "", attention_backend=attention_backend)
    model = None
    try:
        model = build_denoiser(work, device, dtype)
        install_attention(model, work, sta, sta_step)
        install_attention_backend(model, attention_backend, work.model_name,
                                  masked=get_model_spec(work.model_name).attention_masked)
        apply_activation_checkpointing(model, mode)
        if compiled:
            compile_blocks(model, **(compile_kwargs or {}))
        seconds, memory = time_training_step(model, _inputs(work, device, dtype), device, iterations, warmup)
    except torch.OutOfMemoryError:
        row.update(status="OOM")
        return row
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    achieved = flops / seconds
    row.update(status="ok", step_s=f"{seconds:.6g}", samples_per_s=f"{work.batch / seconds:.6g}",
               tokens_per_s=f"{work.batch * image_tokens / seconds:.6g}", achieved_tflops=f"{achieved / 1e12:.6g}",
               mfu=f"{achieved / (peak * 1e12):.6g}" if peak else "",
               hfu=f"{(flops + recompute) / seconds / (peak * 1e12):.6g}" if peak else "",
               peak_memory_gib=f"{memory:.2f}" if memory is not None else "")
    return row


def main(argv: list[str] | None = None, measure_fn: Callable[..., dict] = measure) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=bench_models(), choices=bench_models())
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated checkpointing[+compile] settings (default {','.join(SETTINGS)})")
    parser.add_argument("--batch", type=int, default=None, help="samples per micro-step (default: the recipe's)")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default=None, help="default cuda; cpu only with --tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, if not known")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--tiny", action="store_true", help="tiny configs and shapes (a functional check, any device)")
    parser.add_argument("--csv", type=Path, default=CSV)
    parser.add_argument("--sta", default=None, help="also measure HunyuanVideo with sliding-tile attention: a "
                        "window in tiles TxHxW (tile auto) or a JSON model.options.sta mapping")
    parser.add_argument("--sta-step", type=int, default=0, help="sampling step for step-dependent STA windows")
    parser.add_argument("--attention-backend", default="auto", choices=list(ATTENTION_BACKENDS),
                        help="dense attention kernels, as model.options.attention_backend (docs/attention.md)")
    args = parser.parse_args(argv)
    sta = parse_sta(args.sta) if args.sta is not None else None

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        parser.exit(2, f"bench.throughput: device {device} is not a GPU; the full-size FLUX (12 B) and "
                       f"HunyuanVideo (13 B) steps need one (run on a CUDA machine, or pass --tiny for a "
                       f"functional check with tiny configs)\n")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for setting in settings:
        parse_setting(setting)
    name = device_name(device)
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    rows = []
    for model_name in args.model:
        work = recipe_workload(model_name, args.batch, tiny=args.tiny)
        sta_rows = sta is not None and get_model_spec(model_name).sliding_tile_attention
        attention = [None] + ([sta] if sta_rows else [])
        for setting in settings:
            for sta_options in attention:
                extra = {"attention_backend": args.attention_backend}
                if sta_options is not None:
                    extra.update(sta=sta_options, sta_step=args.sta_step)
                row = measure_fn(work, setting, device, getattr(torch, args.dtype), args.iterations, args.warmup,
                                 peak, {"backend": args.compile_backend}, **extra)
                append_csv_row(args.csv, FIELDS, row)
                rows.append(row)
                label = setting + ("" if sta_options is None else " +sta")
                print(f"{model_name} {work.shape} x{work.batch} {label}: {row.get('status')} "
                      f"{row.get('samples_per_s', '-')} samples/s, {row.get('tokens_per_s', '-')} tokens/s, "
                      f"MFU {row.get('mfu') or '-'}, peak {row.get('peak_memory_gib') or '-'} GiB", flush=True)
    return rows


if __name__ == "__main__":
    main()
