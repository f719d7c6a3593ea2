"""(f) The quickstart trainer against the reference loop (bench.e2e) on the device.

bench.e2e.run on configs/quickstart.yaml with run.device set to the device: seconds per
iteration of Trainer.step() and of bench.reference_loop.reference_iteration (the published
implementation's structure: one sample per call, one reward call per image, a backward per
sample and step, a host sync per micro-step) on the same model, config and device,
alternating iteration by iteration, 2 measured after 1 warm-up. --tiny: 1 prompt x 2
samples, one measured iteration, a tiny random toy_flux, on the CPU.
"""
from __future__ import annotations

import tempfile

from .common import Context, markdown_table

# --tiny: a random toy_flux of these sizes (those of tests/conftest.py's tiny checkpoint).
TINY_TRANSFORMER = dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
TINY_TEXT = dict(dim=16, num_heads=2, ff_dim=32)

NAME = "quickstart"
TITLE = "(f) Quickstart trainer vs the reference loop (bench.e2e)"


def units(ctx: Context) -> list[str]:
    return ["quickstart"]


def run_unit(ctx: Context, unit: str) -> list[dict]:
    from bench import e2e
    from bench.machine import REPO
    from dancegrpo.models.toy_flux import build_toy_flux
    overrides = [f"run.device={ctx.device}"]
    iterations, warmup = (1, 0) if ctx.tiny else (2, 1)
    if not ctx.tiny:
        return [dict(e2e.run(str(REPO / "configs" / "quickstart.yaml"), iterations, warmup, overrides), status="ok")]
    with tempfile.TemporaryDirectory() as tmp:
        # The recipe's structure (its sampler, SDE window, tau, updates) on a tiny random toy_flux.
        build_toy_flux(seed=0, transformer_overrides=TINY_TRANSFORMER, text_overrides=TINY_TEXT).save_pretrained(tmp)
        overrides += [f"model.path={tmp}", "grpo.prompts_per_iteration=1", "grpo.group_size=2", "run.num_threads=1",
                      "trainer.ema_decay=null"]
        row = e2e.run(str(REPO / "configs" / "quickstart.yaml"), iterations, warmup, overrides)
    return [dict(row, config=row["config"].replace(tmp, "<tiny toy_flux>"), status="ok")]


def summarize(rows: list[dict], ctx: Context) -> str:
    measured = [r for r in rows if r.get("config")]
    return markdown_table(measured, ["config", "samples_per_iteration", "ours_s_per_it", "reference_s_per_it",
                                     "speedup", "device"],
                          ["config", "samples/iteration", "ours s/it", "reference loop s/it", "speed-up", "device"])
