"""The command line as a user runs it: errors, overrides, and a killed run resumed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from dancegrpo.checkpoint import latest_checkpoint
from dancegrpo.cli import main
from dancegrpo.metrics import read_metrics

TESTS_DIR = Path(__file__).parent


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{TESTS_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dancegrpo.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_bad_value_exits_2_naming_the_field(tiny_config, tmp_path, capsys):
    path = _write(tiny_config, tmp_path / "cfg.yaml")
    assert main(["train", "--config", str(path), "--set", "grpo.group_size=1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "grpo.group_size" in err and ">= 2" in err


def test_set_overrides_reach_the_run(tiny_config, tmp_path):
    tiny_config["data"]["eval_prompts"] = ""
    path = _write(tiny_config, tmp_path / "cfg.yaml")
    out = tmp_path / "override_run"
    assert main(["train", "--config", str(path), "--set", "trainer.iterations=1", "--set", "trainer.lr=2.5e-4",
                 "--output-dir", str(out), "--no-progress"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["trainer"]["lr"] == 2.5e-4 and saved["trainer"]["iterations"] == 1
    assert [row["step"] for row in read_metrics(out)] == [1]


def _final_weights(run: Path) -> dict:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def test_killed_run_resumes_to_the_same_result(tiny_config, tmp_path):
    tiny_config["trainer"].update(iterations=6, checkpoint_every=1, keep_last=2)
    tiny_config["data"]["eval_prompts"] = ""
    straight_cfg = _write({**tiny_config, "run": {**tiny_config["run"], "output_dir": str(tmp_path / "a")}},
                          tmp_path / "a.yaml")
    killed_cfg = _write({**tiny_config, "run": {**tiny_config["run"], "output_dir": str(tmp_path / "b")}},
                        tmp_path / "b.yaml")
    straight = _cli(["train", "--config", str(straight_cfg), "--no-progress"])

    victim = _cli(["train", "--config", str(killed_cfg), "--no-progress"])
    deadline = time.time() + 120
    while not (tmp_path / "b" / "checkpoints" / "step_00000002").exists():
        assert victim.poll() is None and time.time() < deadline, victim.communicate()[0]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert latest_checkpoint(tmp_path / "b") is not None

    resumed = _cli(["train", "--config", str(killed_cfg), "--resume", "--no-progress"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert straight.wait(timeout=300) == 0, straight.communicate()[0]

    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key = "reward/rewards_for_tests:mean_brightness_mean"
    rows_a, rows_b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == list(range(1, 7))
    assert [r[key] for r in rows_a] == [r[key] for r in rows_b]


def test_sigterm_finishes_the_iteration_and_saves(tiny_config, tmp_path):
    tiny_config["trainer"].update(iterations=200, checkpoint_every=1000)
    tiny_config["data"]["eval_prompts"] = ""
    path = _write(tiny_config, tmp_path / "cfg.yaml")
    proc = _cli(["train", "--config", str(path), "--no-progress"])
    metrics = Path(tiny_config["run"]["output_dir"]) / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = latest_checkpoint(tiny_config["run"]["output_dir"])
    assert saved is not None and int(saved.name.split("_")[1]) == len(read_metrics(tiny_config["run"]["output_dir"]))


def test_sample_writes_pngs_from_the_exported_model(tiny_config, tmp_path):
    from PIL import Image
    tiny_config["trainer"]["iterations"] = 1
    tiny_config["data"]["eval_prompts"] = ""
    path = _write(tiny_config, tmp_path / "cfg.yaml")
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    final_model = Path(tiny_config["run"]["output_dir"]) / "final_model"
    assert (final_model / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    out = tmp_path / "samples"
    assert main(["sample", "--config", str(path), "--set", f"model.path={final_model}", "--prompt", "a red circle",
                 "--prompt", "two blue squares", "--out", str(out), "--upscale", "2"]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2 and Image.open(files[0]).size == (64, 64)


def test_import_option_registers_a_users_model_before_the_command(tiny_config, tmp_path, monkeypatch, capsys):
    """`dancegrpo --import my_plugin train ...`: a model registered by the user's own module trains from
    the command line; without the import its name is unknown, and a missing module is a one-line error."""
    from dancegrpo.models import model_names, unregister_model
    (tmp_path / "my_plugin.py").write_text(
        "import dataclasses\n"
        "from dancegrpo.models import get_model_spec, register_model\n"
        "register_model(dataclasses.replace(get_model_spec('toy_flux'), name='plugin_toy'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny_config["model"]["name"] = "plugin_toy"
    tiny_config["data"]["eval_prompts"] = ""
    tiny_config["run"]["output_dir"] = str(tmp_path / "run")
    path = _write(tiny_config, tmp_path / "cfg.yaml")
    try:
        assert main(["train", "--config", str(path), "--iterations", "1", "--no-progress"]) == 2
        assert "unknown model 'plugin_toy'" in capsys.readouterr().err
        assert main(["--import", "my_plugin", "train", "--config", str(path), "--iterations", "1",
                     "--no-progress"]) == 0
        assert "plugin_toy" in model_names() and latest_checkpoint(tmp_path / "run") is not None
    finally:
        if "plugin_toy" in model_names():
            unregister_model("plugin_toy")
    assert main(["--import", "no_such_plugin", "train", "--config", str(path)]) == 2
    assert "--import no_such_plugin: No module named 'no_such_plugin'" in capsys.readouterr().err


def test_memory_estimate_reports_a_bad_recipe_in_one_line(capsys):
    from dancegrpo.memory_estimate.estimate import main as estimate_main
    assert estimate_main(["configs/quickstart.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memory_estimate: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
