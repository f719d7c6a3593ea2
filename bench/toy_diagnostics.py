"""What a toy checkpoint draws, beyond its accuracy: object sizes, shapes, background, exploration.

    python -m bench.toy_diagnostics [--checkpoint runs/quickstart] [--set key=value ...]

Two measurements, for the committed base and (with --checkpoint) a fine-tuned run:
- sample statistics over the held-out set (ODE sampler): objects the checker detects, their
  mean area in pixels, the share of each shape (None = a blob that fits no shape), and the
  share of near-black pixels; a policy that drifts globally (bigger or brighter blobs, a
  textured background) shows here even when accuracy does not move;
- exploration within a group: for "on the left" / "on the right" prompts, the within-group
  standard deviation of the object's horizontal position and of the training reward, with
  shared and with independent initial noise. GRPO only learns what varies within a group.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections import Counter

import torch

from bench.gradient_snr import with_grpo
from dancegrpo.collect import collect
from dancegrpo.data import load_prompts
from dancegrpo.eval.evaluate import load_checkpoint_weights
from dancegrpo.eval.heldout import EvalModel
from dancegrpo.run_context import RunContext
from dancegrpo.toy.detect import detect_objects

DARK = 0.25  # a pixel whose brightest channel is below this counts as background


def sample_statistics(images: torch.Tensor) -> dict[str, float]:
    detections = [d for found in detect_objects(images) for d in found]
    shapes = Counter(str(d.shape) for d in detections)
    stats = {"objects_per_image": len(detections) / len(images),
             "mean_object_area_px": sum(d.area for d in detections) / max(len(detections), 1),
             "dark_pixel_fraction": (images.max(1).values < DARK).float().mean().item()}
    stats.update({f"shape_share/{name}": count / max(len(detections), 1) for name, count in sorted(shapes.items())})
    return stats


def horizontal_centre(images: torch.Tensor) -> torch.Tensor:
    """Brightness-weighted mean x in [0, 1] of each image."""
    mass = images.max(1).values
    weights = mass / mass.sum((1, 2), keepdim=True).clamp_min(1e-6)
    return (weights.sum(1) * torch.linspace(0, 1, images.shape[-1], device=images.device)).sum(-1)


def group_spread(ctx: RunContext, group_size: int = 8) -> dict[str, float]:
    """Within-group spread of the object's x position and of each reward, on the batch training
    collects for 8 left/right prompts, with shared and with independent initial noise."""
    prompts = [f"a {colour} {shape} on the {side}" for colour in ("red", "blue") for shape in ("circle", "square")
               for side in ("left", "right")]
    result = {}
    for shared in (True, False):
        run = with_grpo(ctx, prompts_per_iteration=len(prompts), group_size=group_size, shared_group_noise=shared,
                        best_of_n_keep=None)
        batch = collect(dataclasses.replace(run, train_prompts=prompts), 0)
        with torch.no_grad():
            images = ctx.adapter.decode(batch.rollout.final).cpu()
        x = horizontal_centre(images).view(len(prompts), group_size)
        name = "shared" if shared else "independent"
        result[f"{name}/within_group_std_x"] = x.std(1).mean().item()
        for reward_name, value in batch.scores.values.items():
            result[f"{name}/within_group_std_{reward_name}"] = value.view(len(prompts), group_size).std(1).mean().item()
    return result


def diagnose(model: EvalModel) -> dict[str, float]:
    images = model.evaluate(load_prompts("toy:eval"), return_images=True)["images"]
    return {**sample_statistics(images), **group_spread(model.ctx)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--checkpoint", help="a run folder or checkpoint to compare with the base")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    model = EvalModel.build(args.config, overrides=["run.output_dir=runs/toy_diagnostics", *args.set])
    rows = {"base": diagnose(model)}
    if args.checkpoint:
        load_checkpoint_weights(model, args.checkpoint)
        rows[args.checkpoint] = diagnose(model)
    names = list(dict.fromkeys(k for row in rows.values() for k in row))
    print(f"{'':44s}" + "".join(f"{label[-24:]:>26s}" for label in rows))
    for name in names:
        print(f"{name:44s}" + "".join(f"{row.get(name, float('nan')):26.3f}" for row in rows.values()))


if __name__ == "__main__":
    main()
