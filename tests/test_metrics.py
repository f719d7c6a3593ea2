"""Tests for dancegrpo.metrics: JSONL rows, TensorBoard scalars, console lines, resume, plots."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import SessionLog

from dancegrpo.metrics import MetricsLogger, plot_metric, read_metrics


def tensorboard_scalars(run_dir, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {event.step: event.value for event in acc.Scalars(tag)}


def test_jsonl_rows_convert_tensors_and_nan(tmp_path, capsys):
    with MetricsLogger(tmp_path, tensorboard=False, console=False) as log:
        log.log(1, {"loss": torch.tensor(0.25), "count": np.int64(3), "bad": float("nan"),
                    "worse": torch.tensor(float("inf")), "ok": True, "one": torch.tensor([2.5])})
        log.log(2, {"loss": 0.125})
        # Each line is flushed as soon as it is logged.
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])  # strict JSON: the stdlib would also accept NaN, so check the text
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    assert first["step"] == 1 and isinstance(first["time"], float)
    assert first["loss"] == 0.25 and first["count"] == 3 and first["ok"] is True and first["one"] == 2.5
    assert first["bad"] is None and first["worse"] is None
    assert read_metrics(tmp_path) == [first, json.loads(lines[1])]
    assert capsys.readouterr().out == ""


def test_bad_metric_values_are_refused(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, console=False) as log:
        with pytest.raises(ValueError, match="'vec'"):
            log.log(1, {"vec": torch.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"step": 3})
        with pytest.raises(TypeError, match="'obj'"):
            log.log(1, {"obj": object()})


def test_tensorboard_scalars_readable(tmp_path):
    with MetricsLogger(tmp_path, console=False) as log:
        for step in range(3):
            log.log(step, {"reward/toy_mean": torch.tensor(0.5 + step), "loss": float("nan")})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert tensorboard_scalars(tmp_path, "reward/toy_mean") == {0: 0.5, 1: 1.5, 2: 2.5}
    assert all(math.isnan(v) for v in tensorboard_scalars(tmp_path, "loss").values())


def test_console_line_pieces(tmp_path, capsys):
    metrics = {
        "iteration": 12, "reward/toy_mean": 0.51234, "reward/toy_std": 0.10309, "loss": torch.tensor(-0.0012),
        "grad_norm": 0.84, "ratio_mean": 1.00012, "ratio_min": 0.99801, "ratio_max": 1.00304,
        "clip_fraction": 0.02, "lr": 1e-5, "weird": float("nan"),
        "time/rollout": 3.14, "time/reward": 0.2, "time/update": 5.43,
    }
    log = MetricsLogger(tmp_path, tensorboard=False, console=True)
    line = log.console_line(12, metrics)
    assert line.startswith("it 12 | ")
    for piece in ["reward/toy 0.512±0.103", "loss -0.0012", "grad 0.84", "ratio 1.000 [0.998,1.003]",
                  "clip 0.02", "lr 1e-05", "weird nan", "t roll 3.1s rew 0.2s upd 5.4s"]:
        assert piece in line.split(" | ") or line.endswith(piece), piece
    assert "iteration" not in line and "_std" not in line
    assert line.index("reward/toy") < line.index("loss") < line.index("t roll")

    chosen = log.console_line(12, metrics, keys=["ratio", "loss", "missing", "time"])
    assert chosen == "it 12 | ratio 1.000 [0.998,1.003] | loss -0.0012 | t roll 3.1s rew 0.2s upd 5.4s"
    # A tiny ratio spread gets more decimals instead of collapsing to "1.000 [1.000,1.000]".
    narrow = log.console_line(1, {"ratio_mean": 1.00001, "ratio_min": 0.99998, "ratio_max": 1.00003})
    assert narrow == "it 1 | ratio 1.00001 [0.99998,1.00003]"

    log.log(12, metrics)
    log.close()
    assert capsys.readouterr().out.strip() == line


def test_truncate_after_matches_uninterrupted_run(tmp_path):
    def values(step: int) -> dict:
        return {"reward_mean": 0.1 * step, "loss": float("nan") if step == 4 else -step / 7}

    uninterrupted = tmp_path / "a"
    with MetricsLogger(uninterrupted, console=False) as log:
        for step in range(1, 7):
            log.log(step, values(step))

    resumed = tmp_path / "b"
    with MetricsLogger(resumed, console=False) as log:
        for step in range(1, 6):
            log.log(step, {"reward_mean": -1.0, "loss": 99.0} if step > 3 else values(step))
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward_me')  # a line cut off by the kill
    with MetricsLogger(resumed, console=False, resume=True) as log:
        assert log.truncate_after(3) == 2
        for step in range(4, 7):
            log.log(step, values(step))

    def strip_time(rows):
        return [{k: v for k, v in row.items() if k != "time"} for row in rows]

    assert strip_time(read_metrics(resumed)) == strip_time(read_metrics(uninterrupted))
    assert [row["step"] for row in read_metrics(resumed)] == [1, 2, 3, 4, 5, 6]
    # TensorBoard hides the interrupted run's values past the resume step: the resumed
    # writer marks a restart at step 4, which makes readers drop older events from step 4 on.
    assert tensorboard_scalars(resumed, "reward_mean") == pytest.approx({s: 0.1 * s for s in range(1, 7)})
    restarts = [event.step for path in (resumed / "tensorboard").glob("events.out.tfevents.*")
                for event in EventFileLoader(str(path)).Load()
                if event.HasField("session_log") and event.session_log.status == SessionLog.START]
    assert restarts == [4]


def test_fresh_logger_replaces_old_file(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, console=False) as log:
        log.log(1, {"a": 1})
    with MetricsLogger(tmp_path, tensorboard=False, console=False) as log:
        log.log(5, {"a": 2})
    assert [(r["step"], r["a"]) for r in read_metrics(tmp_path)] == [(5, 2)]


def test_plot_metric_writes_png(tmp_path):
    rows = [{"step": s, "reward/toy_mean": None if s == 7 else math.sin(s / 5), "reward/toy_std": 0.1}
            for s in reversed(range(40))]
    out = plot_metric(rows, "reward/toy_mean", tmp_path / "plots" / "reward.png", smooth=5, title="reward")
    assert out.stat().st_size > 1000
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (700, 400)

    with MetricsLogger(tmp_path, tensorboard=False, console=False) as log:
        for step in range(5):
            log.log(step, {"loss": float(step)})
    assert plot_metric(tmp_path, "loss", tmp_path / "loss.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="'nope'"):
        plot_metric(tmp_path, "nope", tmp_path / "nope.png")


def test_moving_average_ignores_nan():
    from dancegrpo.metrics import _moving_average

    values = np.array([1.0, np.nan, 3.0, 5.0, np.nan, np.nan, np.nan])
    got = _moving_average(values, 3)
    expected = [np.nanmean(values[max(0, i - 2): i + 1]) if np.isfinite(values[max(0, i - 2): i + 1]).any()
                else np.nan for i in range(len(values))]
    np.testing.assert_allclose(got, expected)
