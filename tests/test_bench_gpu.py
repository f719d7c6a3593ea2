"""`python -m bench.gpu --tiny` runs every section of the GPU suite on a CPU, and the suite
records a section that overruns its time budget and goes on (so the suite cannot rot)."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu import SECTIONS
from bench.gpu.suite import main

REPO = Path(__file__).resolve().parents[1]


def _rows(out: Path, section: str) -> list[dict]:
    return json.loads((out / f"{section}.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "run"
    # As a user runs it: a fresh interpreter, from the repository root.
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    return out, result


def test_tiny_suite_runs_every_section(tiny_run):
    out, result = tiny_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    suite = {r["section"]: r for r in json.loads((out / "suite.json").read_text())}
    assert list(suite) == list(SECTIONS)
    for name, record in suite.items():
        assert record["status"] == "ok", (name, record)
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.json").is_file()
        with (out / f"{name}.csv").open() as f:
            assert len(list(csv.DictReader(f))) == len(_rows(out, name)) >= 1
    summary = (out / "summary.md").read_text()
    for needle in ("Command: `python -m bench.gpu --tiny --out", "Date: ", "Commit: ", "Device: ",
                   f"torch {torch.__version__}", "Triton ", "CUDA "):
        assert needle in summary, needle
    for name in SECTIONS:
        assert f"| {name} | ok |" in summary


def test_tiny_suite_rows_are_consistent(tiny_run):
    out, _ = tiny_run
    # (a) every backend is either checked against float64 and within tolerance, or skipped with a reason
    correctness = _rows(out, "correctness")
    checked = {(r["backend"], r.get("case")) for r in correctness if r["status"] == "ok"}
    assert {("torch", "flow_dancegrpo"), ("torch", "flow_grpo"), ("torch", "ddim")} <= checked
    for row in correctness:
        assert row["status"] in ("ok", "skipped"), row
        if row["status"] == "skipped":
            assert row["reason"] and row["unit"].split("/")[1] in ("cuda", "triton", "cpp")
        elif row["op"] == "sde_step":
            assert row["rollout_train_logp_identical"] is True and row["logp_rel_err"] < 1e-4
    # (b) GB/s and the fraction of copy bandwidth follow from the times and the bytes
    timing = [r for r in _rows(out, "ops_timing") if r["status"] == "ok"]
    assert {"eager", "compile", "copy", "torch"} <= {r["impl"] for r in timing}
    for row in timing:
        moved = (2 if row["impl"] == "copy" else 4) * row["latent_mb"] * 1e6
        assert row["gb_per_s"] == pytest.approx(moved / (row["ms"] * 1e-3) / 1e9, rel=1e-6)
        copy = next(r for r in timing if r["impl"] == "copy" and r["shape"] == row["shape"]
                    and r["mode"] == row["mode"])
        assert row["frac_of_copy"] == pytest.approx(row["gb_per_s"] / copy["gb_per_s"], rel=1e-6)
    # (c) the headline compares dense attention on the real token count: T*H*W + text
    dense = [r for r in _rows(out, "sta") if r["backend"] == "dense_real"]
    assert dense and dense[0]["tokens"] == 2 * 8 * 8 + 8
    # (d) one row per unit, measured
    steps = _rows(out, "model_steps")
    assert [(r["model"], r["checkpointing"]) for r in steps] == [("flux", "selective"), ("hunyuan_video", "full"),
                                                                  ("flux", "full")]
    for row in steps:
        assert row["status"] == "ok" and float(row["samples_per_s"]) > 0
    # (e) the recipe's structure: 12 images, 16 steps, ceil(0.6 * 16) = 10 trained, 4 updates, none skipped
    (grpo,) = _rows(out, "grpo_iteration")
    assert (grpo["images"], grpo["sampler_steps"], grpo["trained_steps"], grpo["updates"]) == (12, 16, 10, 4)
    assert grpo["images_per_gpu_s"] == pytest.approx(grpo["images"] / grpo["iteration_s"])
    assert math.isfinite(grpo["reward_mean"]) and grpo["first_update_logp_max_dev"] == 0.0
    # (f) the quickstart against the reference loop
    (quick,) = _rows(out, "quickstart")
    assert float(quick["speedup"]) == pytest.approx(float(quick["reference_s_per_it"]) / float(quick["ours_s_per_it"]),
                                                    rel=1e-2)


def test_a_section_over_its_budget_is_recorded_and_the_suite_goes_on(tmp_path):
    out = tmp_path / "run"
    code = main(["--tiny", "--out", str(out), "--sections", "env,correctness", "--budget", "env=0.2"])
    assert code == 1   # not every section ok
    suite = {r["section"]: r for r in json.loads((out / "suite.json").read_text())}
    assert suite["env"]["status"] == "timeout" and suite["correctness"]["status"] == "ok"
    (env,) = _rows(out, "env")
    assert env["status"] in ("timeout", "not run")
    summary = (out / "summary.md").read_text()
    assert "| env | timeout |" in summary and "Failures:" in summary
    # the folder now holds a run: a second run there is refused
    with pytest.raises(SystemExit):
        main(["--tiny", "--out", str(out), "--sections", "env"])
