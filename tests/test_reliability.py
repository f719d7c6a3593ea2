"""Reproducible, refuse-early, never-overwrite (issue 15): seeds, resume, config-time checks,
devices, refused out-of-range values, bounded error messages, rewards from the Python API."""
from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from dancegrpo import grpo
from dancegrpo.checkpoint import save_checkpoint
from dancegrpo.cli import main
from dancegrpo.config import ConfigError, load_config, trained_step_count
from dancegrpo.devices import device_problem
from dancegrpo.messages import short_repr, some_of
from dancegrpo.metrics import read_metrics
from dancegrpo.run_folder import RunFolderError, prepare_run_folder
from dancegrpo.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def _noisy_reward(images, prompts):
    """Brightness plus noise from every global RNG a user reward might use."""
    n = images.shape[0]
    noise = torch.rand(n) + torch.tensor([random.random() for _ in range(n)]) + torch.from_numpy(np.random.rand(n))
    return images.mean(dim=(1, 2, 3)) + 0.05 * noise.float()


def _no_eval(cfg: dict, run_dir: Path, iterations: int = 2) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["run"]["output_dir"] = str(run_dir)
    cfg["data"]["eval_prompts"] = ""
    cfg["rewards"] = []
    cfg["trainer"]["iterations"] = iterations
    return cfg


def _disturb_global_rngs() -> None:
    torch.manual_seed(987)
    torch.rand(17)
    random.seed(5)
    np.random.seed(11)


def _without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time")} for row in rows]


# --- 1. the run seed makes the run reproducible ---------------------------------------------

def test_same_seed_same_run_whatever_the_global_rngs_hold(tiny_config, tmp_path):
    runs = []
    for name in ("a", "b"):
        _disturb_global_rngs() if name == "b" else None
        trainer = Trainer(_no_eval(tiny_config, tmp_path / name), rewards={"noisy": _noisy_reward})
        trainer.train(progress=False)
        runs.append(trainer)
    a, b = runs
    assert _without_time(a.metrics) == _without_time(b.metrics)
    for (name, x), (_, y) in zip(a.policy.state_dict().items(), b.policy.state_dict().items()):
        assert torch.equal(x, y), name
    # The noise does reach the run: another seed gives other rewards.
    other = _no_eval(tiny_config, tmp_path / "c", iterations=1)
    other["run"]["seed"] = 1
    changed = Trainer(other, rewards={"noisy": _noisy_reward}).step()
    key = "reward/noisy_mean"
    assert changed[key] != a.metrics[0][key]


def test_lora_initial_weights_follow_the_run_seed(tmp_path_factory):
    from tiny_models import PROMPTS, brightness, build_flux, trainer_config, write_prompts
    root = tmp_path_factory.mktemp("flux_lora")
    ckpt = build_flux(root / "ckpt")
    prompts = write_prompts(root / "prompts.txt", PROMPTS[:2])
    assert main(["preprocess", "--model", "flux", "--path", str(ckpt), "--prompts", str(prompts), "--out",
                 str(root / "cache"), "--dtype", "float32", "--option", "max_sequence_length=8", "--no-progress"]) == 0
    options = {"prompt_cache": str(root / "cache"), "height": 16, "width": 16, "lora": {"rank": 2, "alpha": 4}}

    def lora_weights(seed: int, name: str, earlier_draws: int) -> dict[str, torch.Tensor]:
        torch.rand(earlier_draws)  # whatever the process drew before
        cfg = trainer_config(root / name, "flux", ckpt, options)
        cfg["run"]["seed"] = seed
        trainer = Trainer(cfg, rewards={"brightness": brightness})
        return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}

    first, second, other_seed = lora_weights(0, "a", 1), lora_weights(0, "b", 2), lora_weights(1, "c", 1)
    a_matrices = [k for k in first if "lora_A" in k]
    assert a_matrices and all(first[k].abs().sum() > 0 for k in a_matrices)  # drawn at random by peft
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other_seed[k]) for k in a_matrices)


# --- 2. resume with nothing to resume, and runs that would overwrite another run ------------

def _fake_run(run_dir: Path, steps=(1, 2), rows: int = 2, config: dict | None = None) -> None:
    """A run folder as a trainer leaves it: checkpoints, metrics.jsonl, config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model = nn.Linear(2, 2)
    for step in steps:
        save_checkpoint(run_dir, step, model=model, keep_last=None)
    (run_dir / "metrics.jsonl").write_text("".join(f'{{"step": {i + 1}}}\n' for i in range(rows)))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config or {"run": {"seed": 0}}))


def _corrupt(run_dir: Path) -> None:
    for model_file in (run_dir / "checkpoints").glob("step_*/model.safetensors"):
        model_file.write_bytes(model_file.read_bytes()[:10])


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_with_every_checkpoint_invalid_is_refused_naming_what_was_found(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, steps=(1, 2, 3, 4))
    _corrupt(run)
    before = _snapshot(run)
    for resume in (True, "auto"):
        with pytest.raises(RunFolderError) as info:
            prepare_run_folder(run, resume=resume)
        message = str(info.value)
        assert str(run) in message and "4 checkpoints, all invalid" in message
        assert "step_00000004" in message and "and 1 more" in message  # newest first, a few listed
    assert _snapshot(run) == before


def test_resume_on_a_missing_or_empty_folder_is_refused(tmp_path):
    with pytest.raises(RunFolderError, match="nothing to resume in run folder .*missing.*: the folder does not exist"):
        prepare_run_folder(tmp_path / "missing", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match="empty.*: no checkpoints"):
        prepare_run_folder(tmp_path / "empty", resume=True)


def test_resume_picks_the_newest_valid_checkpoint(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, steps=(1, 2))
    (run / "checkpoints" / "step_00000002" / "model.safetensors").write_bytes(b"x")
    assert prepare_run_folder(run, resume=True).name == "step_00000001"
    assert prepare_run_folder(run, resume="auto").name == "step_00000001"


def test_a_new_run_never_overwrites_another_run_unless_told(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    (run / "notes.txt").write_text("mine")
    before = _snapshot(run)
    with pytest.raises(RunFolderError) as info:
        prepare_run_folder(run, resume=False)
    message = str(info.value)
    assert "already holds a run" in message and "2 checkpoints" in message and "metrics.jsonl with 2 rows" in message
    for hint in ("--resume", "--overwrite", "--output-dir"):
        assert hint in message
    assert _snapshot(run) == before
    assert prepare_run_folder(run, resume=False, overwrite=True) is None
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "notes.txt"]  # only the run's outputs went


def test_resume_or_start(tmp_path):
    assert prepare_run_folder(tmp_path / "new", resume="auto") is None  # nothing yet: start
    this_run = {"run": {"seed": 3}}
    cut_short = tmp_path / "cut_short"  # this run's first attempt, killed before its first checkpoint
    _fake_run(cut_short, steps=(), rows=1, config=this_run)
    assert prepare_run_folder(cut_short, resume="auto", config=this_run) is None
    assert not (cut_short / "metrics.jsonl").exists()
    other = tmp_path / "other"  # another run's logs
    _fake_run(other, steps=(), rows=1, config={"run": {"seed": 4}})
    with pytest.raises(RunFolderError, match="another run's files"):
        prepare_run_folder(other, resume="auto", config=this_run)
    with pytest.raises(ValueError, match="give one of them"):
        prepare_run_folder(other, resume=True, overwrite=True)


def test_trainer_refuses_before_writing_and_overwrites_when_told(tiny_config, tmp_path):
    run = tmp_path / "run"
    cfg = _no_eval(tiny_config, run, iterations=2)
    cfg["rewards"] = tiny_config["rewards"]
    Trainer(cfg).train(progress=False)
    before = _snapshot(run)
    with pytest.raises(RunFolderError, match="already holds a run"):
        Trainer(cfg).train(progress=False)
    assert _snapshot(run) == before  # not even config.yaml was rewritten
    again = Trainer(cfg)
    again.train(iterations=1, progress=False, overwrite=True)
    assert [row["step"] for row in read_metrics(run)] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    resumed = Trainer(cfg)
    resumed.train(resume="auto", progress=False)  # continues the one-iteration run to trainer.iterations
    assert [row["step"] for row in read_metrics(run)] == [1, 2] and resumed.iteration == 2


def test_cli_resume_without_checkpoint_exits_2(tiny_config, tmp_path, capsys):
    cfg = _no_eval(tiny_config, tmp_path / "nothing_here")
    cfg["rewards"] = tiny_config["rewards"]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "nothing_here" in err and "does not exist" in err
    assert not (tmp_path / "nothing_here").exists()
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(path), "--resume", "--overwrite"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# --- 3. every check the config alone allows, at config load ---------------------------------

@pytest.mark.parametrize("stochastic", [1, 3, 5, 10, 16, 25])
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.3, 0.5, 0.6, 0.7, 1.0])
def test_config_counts_trained_steps_as_grpo_picks_them(stochastic, tau):
    count = trained_step_count(stochastic, tau)
    if count >= 1:
        assert grpo.subsample_timesteps(1, stochastic, tau, generator=torch.Generator()).shape[1] == count
    assert count == max(0, -int(-(tau * stochastic - 1e-9) // 1))  # ceil, the float slack aside


def test_nothing_to_train_is_refused_at_load_naming_the_fields(tiny_config):
    tiny_config["model"]["path"] = "/nonexistent/checkpoint"  # would fail if any work had started
    cases = {
        "sampler.eta=0": "sampler.eta = 0",
        "grpo.tau=1e-10": "grpo.tau = 1e-10 selects no step",
        "sampler.sde_window=[2,2]": "sampler.sde_window = [2, 2]",
        "trainer.updates_per_iteration=7": "trainer.updates_per_iteration = 7 is more than the 6",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            Trainer(tiny_config, overrides=[override])
        assert expected in str(info.value) and len(info.value.problems) == 1, str(info.value)


def test_window_and_tau_are_checked_together():
    data = {"data": {"train_prompts": "toy:train"}, "sampler": {"num_steps": 20, "sde_window": [4, 6]},
            "grpo": {"tau": 0.2}, "trainer": {"updates_per_iteration": 1}}
    cfg = load_config(data)  # ceil(0.2 * 2) = 1 step of the window's 2
    assert trained_step_count(2, cfg.grpo.tau) == 1
    with pytest.raises(ConfigError, match=r"selects no step: ceil\(tau \* 2\) = 0 .*sampler.sde_window = \[4, 6\]"):
        load_config(data, ["grpo.tau=1e-10"])


# --- 4. a device that is not there ----------------------------------------------------------

def test_unavailable_devices_are_refused_in_one_line(monkeypatch, tiny_config):
    tiny_config["model"]["path"] = "/nonexistent/checkpoint"
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    with pytest.raises(ConfigError) as info:
        Trainer(tiny_config, overrides=["run.device=cuda"])
    message = str(info.value)
    assert "\n" not in message and "run.device = 'cuda'" in message and "CPU-only build" in message
    assert torch.__version__ in message and "download.pytorch.org" in message

    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "built for CUDA 12.6 but sees no GPU" in device_problem("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "cuda:3 does not exist, this machine shows 1 GPU(s)" in device_problem("cuda:3")
    assert device_problem("cuda:0") is None and device_problem("cuda") is None
    assert device_problem("cpu") is None and "not a device" in device_problem("mps")


def test_preprocess_refuses_a_missing_device(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert main(["preprocess", "--model", "flux", "--path", str(tmp_path), "--prompts", str(tmp_path / "p.txt"),
                 "--out", str(tmp_path / "out"), "--device", "cuda:1"]) == 2
    assert "--device = 'cuda:1' needs CUDA" in capsys.readouterr().err


# --- 7. out-of-range values are refused, never replaced -------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["sample", "--prompt", "a red circle", "--upscale", "0"], "--upscale"),
    (["sample", "--prompt", "a red circle", "--upscale", "-2"], "--upscale"),
    (["sample", "--prompt", "a red circle", "--fps", "0"], "--fps"),
    (["train", "--iterations", "0"], "--iterations"),
    (["train", "--output-dir", ""], "--output-dir"),
    (["eval", "--seeds", "0"], "--seeds"),
    (["preprocess", "--model", "flux", "--path", "p", "--prompts", "p", "--out", "o", "--batch-size", "0"],
     "--batch-size"),
])
def test_cli_refuses_out_of_range_values(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_sample_upscale_is_what_was_asked(tiny_config, tmp_path):
    from PIL import Image
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    for upscale, size in ((["--upscale", "1"], 32), ([], 32 * 8)):  # the toy draws 32 px; default 8x for <= 64 px
        out = tmp_path / f"samples{size}"
        assert main(["sample", "--config", str(path), "--prompt", "a red circle", "--out", str(out), *upscale]) == 0
        assert Image.open(next(out.glob("*.png"))).size == (size, size)


def test_train_iterations_and_eval_prompt_count_are_refused_not_replaced(tiny_config):
    with pytest.raises(ConfigError, match=r"data.eval_num_prompts = 100000 is more than the \d+ prompts"):
        Trainer(tiny_config, overrides=["data.eval_num_prompts=100000"])
    trainer = Trainer(tiny_config)
    with pytest.raises(ValueError, match="iterations = 0 must be an integer >= 1"):
        trainer.train(iterations=0, progress=False)
    assert not Path(tiny_config["run"]["output_dir"]).exists()


def test_reward_options_out_of_range_are_refused_before_loading():
    from dancegrpo.rewards.videoalign import VideoAlignScorer
    with pytest.raises(ValueError) as info:  # checked before the (missing) release folder is read
        VideoAlignScorer("/nonexistent/videoalign", max_pixels=0, batch_size=0, num_frames=1)
    message = str(info.value)
    for text in ("max_pixels = 0 must be > 0", "batch_size = 0 must be >= 1", "num_frames = 1 must be >= 2"):
        assert text in message


# --- 8. error messages stay short whatever the input's size ---------------------------------

def test_unknown_words_of_a_long_prompt_give_a_short_message(tiny_config):
    trainer = Trainer(tiny_config)
    words = [f"word{i}" for i in range(700)]
    prompt = " ".join(words)[:5000]
    with pytest.raises(ValueError) as info:
        trainer.evaluate(prompts=[prompt])
    message = str(info.value)
    assert len(message) < 700, len(message)
    unknown = len(set(prompt.split()))
    assert f"does not know {unknown} word(s)" in message and "'word0', 'word1'" in message
    assert f"and {unknown - 5} more" in message and f"({len(prompt)} characters)" in message
    assert "vocabulary is the toy scene grammar's 25 words: a, an, the" in message


def test_config_errors_stay_short():
    data = {"data": {"train_prompts": "toy:train"}, "rewards": [{"name": "r"}],
            "grpo": {"tau": list(range(5000))}}
    data.update({f"key{i}": 1 for i in range(1000)})
    with pytest.raises(ConfigError) as info:
        load_config(data)
    message = str(info.value)
    assert len(info.value.problems) == 1001 and "(1001 problems)" in message and "and 981 more problems" in message
    assert len(message) < 20 * 300, len(message)
    with pytest.raises(ConfigError) as info:
        load_config({"data": {"train_prompts": "toy:train"}, "grpo": {"tau": list(range(5000))}})
    assert len(str(info.value)) < 300 and "characters as text" in str(info.value)


def test_message_helpers():
    assert short_repr("abc") == "'abc'"
    assert short_repr("x" * 1000, 20) == "'" + "x" * 18 + "... (1000 characters)"
    assert some_of(["b", "a", "b"]) == "'b', 'a'"
    assert some_of([str(i) for i in range(9)], 3, quote=False) == "0, 1, 2 and 6 more"


# --- 11. rewards given to the Python API count ----------------------------------------------

def test_api_rewards_alone_train_the_quickstart_recipe(tmp_path):
    calls = []

    def mine(images, prompts):
        calls.append(len(prompts))
        return images.mean(dim=(1, 2, 3))

    trainer = Trainer(RECIPE, rewards={"mine": mine}, overrides=[
        "rewards=[]", f"run.output_dir={tmp_path}", "run.num_threads=1", "data.eval_prompts=",
        "grpo.prompts_per_iteration=2", "grpo.group_size=2", "trainer.micro_batch_size=4"])
    assert [entry.name for entry in trainer.rewards.entries] == ["mine"]
    metrics = trainer.step()
    assert calls == [4] and "reward/mine_mean" in metrics and metrics["updates"] == 1


def test_a_run_with_no_reward_at_all_is_refused(tiny_config):
    tiny_config["rewards"] = []
    tiny_config["model"]["path"] = "/nonexistent/checkpoint"
    with pytest.raises(ConfigError, match="no reward: the config's rewards list is empty and no rewards were passed"):
        Trainer(tiny_config)
    with pytest.raises(ConfigError, match="'mine': int is not callable"):
        Trainer(tiny_config, rewards={"mine": 3})


def test_resuming_a_finished_run_redoes_nothing(tiny_config, tmp_path):
    """A finished run resumed (a torchrun restart, a repeated command) neither evaluates again nor
    adds a second final-evaluation row; a larger iteration count trains on."""
    cfg = copy.deepcopy(tiny_config)
    cfg["run"]["output_dir"] = str(tmp_path / "run")
    cfg["trainer"]["iterations"] = 1
    first = Trainer(cfg)
    first.train(progress=False)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = Trainer(cfg)
    again.evaluate = lambda *a, **k: pytest.fail("a finished run was evaluated again")
    again.train(resume=True, progress=False)
    assert again.iteration == 1 and again.final_eval == first.final_eval and again.summary == first.summary
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == rows
    more = Trainer(cfg)
    more.train(iterations=2, resume=True, progress=False)
    assert more.iteration == 2 and len(read_metrics(tmp_path / "run")) > len(rows.splitlines())
