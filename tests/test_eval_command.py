"""`dancegrpo eval` on a tiny toy run: one row per model, rows equal to the trainer's own
evaluations, paired noise, readable outputs, clear errors; `sample --checkpoint` shares the loader."""
from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dancegrpo.cli import main
from dancegrpo.eval.evaluate import compare, load_checkpoint_weights, run_eval, write_outputs
from dancegrpo.eval.heldout import EvalModel
from dancegrpo.trainer import Trainer

from conftest import BASE_CONFIG

REWARDS = [{"name": "toy_geneval"}, {"name": "rewards_for_tests:mean_brightness", "weight": 0.5}]


def _config(run_dir: Path, checkpoint: Path, ema: bool) -> dict:
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["run"]["output_dir"] = str(run_dir)
    cfg["model"]["path"] = str(checkpoint)
    cfg["rewards"] = REWARDS
    cfg["trainer"].update(iterations=2, keep_last=5, ema_decay=0.5 if ema else None)
    return cfg


@pytest.fixture(scope="module", params=[False, True], ids=["raw", "ema"])
def trained(request, tmp_path_factory, tiny_checkpoint):
    """A finished 2-iteration run (checkpoints at steps 1 and 2) and its in-process trainer."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_run")
    cfg = _config(root / "run", tiny_checkpoint, ema=request.param)
    trainer = Trainer(cfg)
    trainer.train(progress=False)
    config_path = root / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    return dict(cfg=cfg, config_path=config_path, run=root / "run", trainer=trainer)


def _eval_metrics(result: dict) -> dict:
    return {key.removeprefix("eval/"): value for key, value in result.items()}


def _overall(metrics: dict) -> dict:
    """Without the per-kind accuracies, which `dancegrpo eval` adds to Trainer.evaluate's metrics."""
    return {key: value for key, value in metrics.items() if not key.startswith("toy_geneval_accuracy/")}


def test_rows_equal_the_trainers_own_base_and_final_evaluations(trained, tmp_path):
    run = trained["run"]
    report = run_eval(trained["cfg"], checkpoints=[run / "checkpoints" / "step_00000001", run], out_dir=tmp_path)
    assert [(r.label, r.step) for r in report.rows] == [("base", None), ("run/step_00000001", 1),
                                                       ("run/step_00000002", 2)]
    base, first, last = report.rows
    assert set(_overall(base.metrics)) == {"toy_geneval", "rewards_for_tests:mean_brightness", "toy_geneval_accuracy"}
    # The run evaluated its base before training and its final weights (EMA when configured) after.
    assert _overall(base.metrics) == _eval_metrics(trained["trainer"].base_eval)
    assert _overall(last.metrics) == _eval_metrics(trained["trainer"].final_eval)
    # And a fresh trainer resumed from step 1 (the resume path, not the eval loader) agrees.
    resumed = Trainer(trained["cfg"])
    resumed.resume(run / "checkpoints" / "step_00000001")
    assert _overall(first.metrics) == _eval_metrics(resumed.evaluate())
    assert last.metrics != base.metrics  # training changed the weights the last row used


def test_base_row_equals_trainer_evaluate_on_the_base(trained, tmp_path):
    report = run_eval(trained["cfg"], out_dir=tmp_path)
    assert len(report.rows) == 1
    assert _overall(report.rows[0].metrics) == _eval_metrics(Trainer(trained["cfg"]).evaluate())


def test_noise_is_paired_across_checkpoints_and_seeds_are_distinct(trained):
    run = trained["run"]
    model = EvalModel.build(trained["cfg"])
    prompts = model.eval_prompts
    step1 = run / "checkpoints" / "step_00000001"
    rows, images = compare(model, [run, step1, run], prompts, include_base=False, seeds=2)
    assert [r.label for r in rows] == ["run/step_00000002", "run/step_00000001", "run/step_00000002 (2)"]
    # Same checkpoint, evaluated before and after another one was loaded: identical noise and samples.
    assert rows[0].per_seed == rows[2].per_seed
    assert torch.equal(images["run/step_00000002"], images["run/step_00000002 (2)"])
    # Seed 0 is the trainer's own evaluation noise; seed 1 is a run with seed + 1.
    fresh = EvalModel.build(trained["cfg"])
    load_checkpoint_weights(fresh, run)
    assert _overall(rows[0].per_seed[0]) == _eval_metrics(fresh.evaluate())
    other_seed = EvalModel.build({**trained["cfg"], "run": {**trained["cfg"]["run"], "seed": 1}})
    load_checkpoint_weights(other_seed, run)
    seed1 = other_seed.evaluate(return_images=True)
    assert _overall(rows[0].per_seed[1]) == _eval_metrics({k: v for k, v in seed1.items() if k != "images"})
    assert not torch.equal(seed1["images"], images["run/step_00000002"])
    for name, value in rows[0].metrics.items():
        assert math.isclose(value, (rows[0].per_seed[0][name] + rows[0].per_seed[1][name]) / 2)


def test_cli_writes_a_parsable_csv_json_and_plot(trained, tmp_path, capsys):
    out = tmp_path / "report"
    prompts = ["a red circle", "two blue squares", "a green triangle on the left"]
    (tmp_path / "held_out.txt").write_text("\n".join(prompts) + "\n")
    code = main(["eval", "--config", str(trained["config_path"]), "--checkpoint", str(trained["run"]),
                 "--prompts", str(tmp_path / "held_out.txt"), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    with open(out / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["checkpoint"] for r in rows] == ["base", "run/step_00000002"] and rows[1]["step"] == "2"
    data = json.loads((out / "eval.json").read_text())
    assert data["prompts"] == prompts and data["seeds"] == 1
    for row, stored in zip(rows, data["rows"]):
        for name in ("toy_geneval", "toy_geneval_accuracy", "rewards_for_tests:mean_brightness"):
            assert float(row[name]) == stored["metrics"][name]
            assert f"{float(row[name]):.4f}" in printed
        assert 0.0 <= float(row["toy_geneval_accuracy"]) <= 1.0
    for name in ("eval.png", "samples_base_vs_last.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "empty_run"])
def test_bad_checkpoint_path_is_a_clear_error(trained, tmp_path, capsys, case):
    path = {"missing": tmp_path / "nowhere", "not_a_checkpoint": trained["run"] / "final_model",
            "empty_run": tmp_path / "empty_run"}[case]
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    code = main(["eval", "--config", str(trained["config_path"]), "--checkpoint", str(path),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err
    expected = {"missing": "checkpoints/step_<N>", "not_a_checkpoint": "model.path",
                "empty_run": "no complete, valid checkpoint"}[case]
    assert expected in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_nothing_to_evaluate_and_bad_seeds_are_refused(trained, tmp_path, capsys):
    assert main(["eval", "--config", str(trained["config_path"]), "--no-base", "--out", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # refused by the argument parser, before the model loads
        main(["eval", "--config", str(trained["config_path"]), "--seeds", "0", "--out", str(tmp_path)])
    assert info.value.code == 2 and "argument --seeds: 0 is out of range" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seeds = 0"):  # and by the Python API
        run_eval(trained["cfg"], seeds=0, out_dir=tmp_path)


def test_sample_loads_a_checkpoint_through_the_shared_loader(trained, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "samples"
    prompt = trained["trainer"].eval_prompts[0]
    assert main(["sample", "--config", str(trained["config_path"]), "--checkpoint", str(trained["run"]),
                 "--prompt", prompt, "--out", str(out), "--upscale", "1"]) == 0
    written = sorted(out.glob("*.png"))
    want = trained["trainer"].evaluate(prompts=[prompt], return_images=True)["images"][0]  # the trained weights
    got = torch.from_numpy(np.array(Image.open(written[0]))).permute(2, 0, 1).float() / 255
    assert len(written) == 1 and (got - want).abs().max() <= 0.5 / 255 + 1e-6
    assert main(["sample", "--config", str(trained["config_path"]), "--checkpoint", str(tmp_path / "nowhere"),
                 "--prompt", prompt, "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_per_kind_accuracies_add_up_to_the_overall_accuracy(trained, tmp_path):
    from dancegrpo.data import load_prompts
    from dancegrpo.toy import grammar

    report = run_eval(trained["cfg"], checkpoints=[trained["run"]], out_dir=tmp_path)
    prompts = load_prompts(trained["cfg"]["data"]["eval_prompts"])[: trained["cfg"]["data"]["eval_num_prompts"]]
    counts = {}
    for prompt in prompts:
        kind = grammar.parse_prompt(prompt).kind
        counts[kind] = counts.get(kind, 0) + 1
    for row in report.rows:
        kinds = {key.removeprefix("toy_geneval_accuracy/"): value for key, value in row.metrics.items()
                 if key.startswith("toy_geneval_accuracy/")}
        assert set(kinds) == set(counts)
        weighted = sum(kinds[k] * n for k, n in counts.items()) / len(prompts)
        assert math.isclose(weighted, row.metrics["toy_geneval_accuracy"], abs_tol=1e-6)


def test_per_tag_breakdown_of_a_reward_that_is_not_the_toy_one(tiny_config, tmp_path):
    """The generic path: a test reward's metadata (a bool and a float measure, tags by prompt
    length) is averaged overall and per tag, checked against float64 sums over the images."""
    tiny_config["rewards"] = [{"name": "rewards_for_tests:tagged_brightness"}]
    prompts = ["a red circle", "a blue square on the left", "two green triangles", "a red circle above a blue square"]
    model = EvalModel.build(tiny_config)
    rows, images = compare(model, [], prompts, include_base=True, seeds=2)
    (row,) = rows
    assert set(row.metrics) == {"rewards_for_tests:tagged_brightness", *(
        f"rewards_for_tests:tagged_brightness_{key}{tag}" for key in ("bright", "contrast")
        for tag in ("", "/short", "/long"))}
    pixels = images["base"].double().flatten(1)
    brightness, contrast = pixels.mean(1), pixels.std(1)
    tags = {"short": [0, 2], "long": [1, 3]}  # 12 and 19 characters; 25 and 32
    got = {key.removeprefix("rewards_for_tests:tagged_brightness_"): value for key, value in row.per_seed[0].items()}
    assert got["bright"] == pytest.approx((brightness > 0.3).double().mean().item(), abs=1e-6)
    assert got["contrast"] == pytest.approx(contrast.mean().item(), rel=1e-5)
    for tag, index in tags.items():
        assert got[f"bright/{tag}"] == pytest.approx((brightness[index] > 0.3).double().mean().item(), abs=1e-6)
        assert got[f"contrast/{tag}"] == pytest.approx(contrast[index].mean().item(), rel=1e-5)
    # The trainer's own evaluation (metrics.jsonl) reports the overall means, not the breakdown.
    plain = _eval_metrics(Trainer(tiny_config).evaluate(prompts=prompts))
    assert plain == {k: v for k, v in row.per_seed[0].items() if "/" not in k}
    files = write_outputs(rows, images, prompts, 2, tmp_path)
    with open(files["csv"], newline="") as f:
        header = next(csv.reader(f))
    assert "rewards_for_tests:tagged_brightness_contrast/long" in header
