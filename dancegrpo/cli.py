"""`dancegrpo` command line: a thin layer over the Python API.

    dancegrpo train --config configs/quickstart.yaml [--set trainer.lr=3e-5 ...] [--resume | --overwrite]
    torchrun --nproc_per_node 8 -m dancegrpo.cli train --config ... --resume-or-start   (see docs/distributed.md)
    dancegrpo sample --config configs/quickstart.yaml --checkpoint runs/quickstart --prompt "a red circle"
    dancegrpo eval --config configs/quickstart.yaml --checkpoint runs/quickstart [--prompts toy:eval] [--seeds 4]
    dancegrpo preprocess --model flux --path data/flux --prompts prompts.txt --out data/flux_cache
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads: hence before any
# import of torch). Spinning threads compete with other processes for the cores: with one busy
# process on a 2-core machine, a quickstart iteration slowed 2.90x with libgomp's default and
# 1.83x with passive waiting (bench/results/contention_cpu_2026-11-30.md). An explicit
# OMP_WAIT_POLICY is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import ConfigError  # noqa: E402


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 or a negative number is refused, never replaced)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be >= 1")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is out of range: must be a finite number > 0")
    return value


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not allowed")
    return text


def _train(args) -> int:
    from .trainer import Trainer
    overrides = list(args.set or [])
    if args.output_dir is not None:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.iterations is not None:
        overrides.append(f"trainer.iterations={args.iterations}")
    trainer = Trainer(args.config, overrides=overrides)
    resume = "auto" if args.resume_or_start else args.resume
    try:
        trainer.train(resume=resume, progress=not args.no_progress, overwrite=args.overwrite)
    finally:
        _leave_process_group()
    if trainer.is_main:
        print(f"run folder: {trainer.run_dir}")
    return 0


def _leave_process_group() -> None:
    """Under torchrun: leave the process group the trainer joined (a clean exit for every rank)."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def _sample(args) -> int:
    from .eval.evaluate import load_checkpoint_weights
    from .eval.heldout import EvalModel
    model = EvalModel.build(args.config, overrides=list(args.set or []))
    if args.checkpoint:
        load_checkpoint_weights(model, args.checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = model.evaluate(prompts=args.prompt, return_images=True)["images"]
    for i, (prompt, sample) in enumerate(zip(args.prompt, images)):
        stem = out / f"{i:03d}_{prompt.replace(' ', '_').replace('/', '_')[:60]}"
        # tiny toy images get enlarged unless --upscale says otherwise
        upscale = args.upscale if args.upscale is not None else (8 if max(sample.shape[-2:]) <= 64 else 1)
        if sample.dim() == 3:
            _to_pil(sample, upscale).save(f"{stem}.png")
            print(f"{stem}.png")
            continue
        # Video (frames, C, H, W): MP4 with PyAV, else PNG frames + GIF (dancegrpo.video_io)
        from .video_io import save_video
        written = save_video(stem, sample, fps=args.fps, upscale=upscale)
        print(f"{written} ({sample.shape[0]} frames)")
    return 0


def _eval(args) -> int:
    from .eval.evaluate import run_eval
    report = run_eval(args.config, checkpoints=args.checkpoint or [], prompts=args.prompts,
                      include_base=args.include_base, seeds=args.seeds, out_dir=args.out,
                      overrides=list(args.set or []))
    print(report.table)
    for kind, path in report.files.items():
        print(f"{kind}: {path}")
    return 0


def _to_pil(image, upscale: int):
    """(C, H, W) in [0, 1] -> an RGB PIL image, nearest-neighbour enlarged by `upscale`."""
    import torch
    from PIL import Image
    pixels = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    picture = Image.fromarray(pixels)
    return picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST) if upscale > 1 else picture


def _preprocess(args) -> int:
    import yaml

    from .devices import require_device
    from .preprocess import preprocess
    require_device(args.device, field="--device")
    options = {}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE, e.g. max_sequence_length=512")
        options[key] = yaml.safe_load(value)
    out = preprocess(args.model, args.path, args.prompts, args.out, batch_size=args.batch_size,
                     shard_size=args.shard_size, dtype=args.dtype, device=args.device, options=options,
                     progress=not args.no_progress)
    print(f"prompt cache: {out} (set model.options.prompt_cache to it; {out / 'prompts.txt'} lists the prompts)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dancegrpo", description="DanceGRPO: RL fine-tuning of image/video generators")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (repeatable): your code that registers a model "
                             "(dancegrpo.models.register_model) or prompt sets; it must be importable "
                             "(installed, or on PYTHONPATH)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a generator with DanceGRPO")
    train.add_argument("--config", default="configs/quickstart.yaml", help="YAML recipe")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. trainer.lr=3e-5")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in the run folder from its newest valid checkpoint; an error if there "
                            "is none (no folder, no checkpoints, or all invalid)")
    start.add_argument("--resume-or-start", action="store_true",
                       help="continue from the newest valid checkpoint if there is one, else start a new run (for "
                            "torchrun --max-restarts and job schedulers); still refuses to start over on top of "
                            "checkpoints that are all invalid or on another run's files")
    start.add_argument("--overwrite", action="store_true",
                       help="start a new run even if the run folder holds one, deleting its checkpoints, metrics, "
                            "TensorBoard events, final model and reports first. Without --resume, --resume-or-start "
                            "or --overwrite, a run folder that already holds a run is refused")
    train.add_argument("--output-dir", type=_non_empty, help="run folder (same as --set run.output_dir=...)")
    train.add_argument("--iterations", type=_positive_int, help="same as --set trainer.iterations=...")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", help="write PNG images or MP4 videos (GIF without PyAV) for prompts (ODE sampler)")
    sample.add_argument("--config", default="configs/quickstart.yaml")
    sample.add_argument("--set", action="append", metavar="KEY=VALUE")
    sample.add_argument("--checkpoint", help="a run folder or checkpoint directory; default: the base model")
    sample.add_argument("--prompt", action="append", required=True)
    sample.add_argument("--out", default="runs/samples", help="folder for the PNG/MP4 files (default runs/samples)")
    sample.add_argument("--upscale", type=_positive_int, default=None,
                        help="nearest-neighbour upscale factor >= 1 (default: 8 for images up to 64 px, else 1)")
    sample.add_argument("--fps", type=_positive_float, default=8.0, help="frame rate of videos (> 0)")
    sample.set_defaults(func=_sample)

    ev = sub.add_parser("eval", help="held-out metrics (ODE sampler) of the base and checkpoints side by side: "
                                     "console table, CSV, bar chart")
    ev.add_argument("--config", default="configs/quickstart.yaml")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE")
    ev.add_argument("--prompts", help="prompt file (one a line) or toy:eval; default: the config's data.eval_prompts")
    ev.add_argument("--checkpoint", action="extend", nargs="+", metavar="PATH",
                    help="a run folder (its newest checkpoint) or a checkpoint folder; several to compare")
    ev.add_argument("--include-base", dest="include_base", action="store_true", default=True,
                    help="evaluate the base model too (default)")
    ev.add_argument("--no-base", dest="include_base", action="store_false", help="only the checkpoints")
    ev.add_argument("--seeds", type=_positive_int, default=1, help="noise draws per prompt (>= 1, default 1)")
    ev.add_argument("--out", default="runs/eval", help="folder for eval.csv, eval.json, eval.png (default runs/eval)")
    ev.set_defaults(func=_eval)

    pre = sub.add_parser("preprocess", help="encode a prompt file with the model's text encoders into a prompt cache")
    pre.add_argument("--model", required=True,
                     help="a registered model (docs/models.md), e.g. sd14, flux, sd35, qwen_image, wan_t2v; "
                          "an unknown name lists them all")
    pre.add_argument("--path", required=True, help="the model's diffusers checkpoint directory")
    pre.add_argument("--prompts", required=True, help="text file (one prompt a line) or JSONL (prompt, image)")
    pre.add_argument("--out", required=True, help="cache folder to write")
    pre.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per text-encoder call")
    pre.add_argument("--shard-size", type=_positive_int, default=256, help="prompts per safetensors shard")
    pre.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="stored dtype (default per model)")
    pre.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    pre.add_argument("--option", action="append", metavar="KEY=VALUE",
                     help="encoder option, e.g. max_sequence_length=512, height=400, width=640")
    pre.add_argument("--no-progress", action="store_true")
    pre.set_defaults(func=_preprocess)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors reported in one line (exit 2), not a traceback. Evaluated only when one is raised,
    so `dancegrpo --help` does not import torch (which dancegrpo.checkpoint does)."""
    from .checkpoint import CheckpointError
    return ConfigError, CheckpointError, FileNotFoundError, ValueError


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports progress
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s" if rank == 0 else
                        f"%(levelname)s rank {rank} %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        for module in args.imports:
            _import_user_module(module)
        return args.func(args)
    except _user_errors() as err:
        print(f"dancegrpo: error: {err}", file=sys.stderr)
        return 2


def _import_user_module(module: str) -> None:
    import importlib
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"--import {module}: {err}; make it importable (pip install it, or add its folder to "
                         "PYTHONPATH)") from err


if __name__ == "__main__":
    sys.exit(main())
