"""Tests for dancegrpo.checkpoint (local format): exact resume, keep-last-k, corruption and kill safety."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dancegrpo.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


class TiedNet(nn.Module):
    """Small net with tied weights, a dropout (global RNG) and a bf16 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 4, bias=False)
        self.hidden = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(6, 4, bias=False)
        self.head.weight = self.embed.weight  # shared storage, which safetensors refuses as-is
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6).to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.hidden(x))) * self.scale.float()
        return self.head(h) * self.embed(h)


def make_training_state(seed: int):
    torch.manual_seed(seed)
    model = TiedNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 / (1.0 + 0.5 * it))
    ema = {k: v.detach().clone() for k, v in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed + 100)
    return model, optimizer, scheduler, ema, generator


def train_step(model, optimizer, scheduler, ema, generator) -> dict[str, float]:
    """One step that consumes every RNG the checkpoint must restore."""
    x = torch.randn(5, 6, generator=generator)
    noise = torch.rand(5, 4)  # global torch RNG
    py_draw, np_draw = random.random(), float(np.random.rand())
    loss = ((model(x) - noise) ** 2).mean() * (1.0 + py_draw + np_draw)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        for name, param in model.named_parameters():
            ema[name].lerp_(param, 0.1)
    return {"py": py_draw, "np": np_draw}


def snapshot(model, optimizer, ema) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in ema.items()})
    for pid, st in optimizer.state_dict()["state"].items():
        out.update({f"opt.{pid}.{k}": v.clone() for k, v in st.items()})
    return out


def assert_snapshots_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def test_round_trip_resumes_bit_identically(tmp_path):
    random.seed(1)
    np.random.seed(1)
    model, opt, sched, ema, gen = make_training_state(seed=0)
    for _ in range(3):
        train_step(model, opt, sched, ema, gen)
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, ema=ema,
                           generators={"noise": gen}, extra={"history": [0.5, float("nan")], "cfg": {"a": 1}})

    # Reference: the uninterrupted run continues for 3 more steps.
    ref_draws = [train_step(model, opt, sched, ema, gen) for _ in range(3)]
    ref = snapshot(model, opt, ema)
    ref_lr = sched.get_last_lr()
    ref_next = (torch.rand(3), torch.randn(2, generator=gen), random.random(), np.random.rand())

    # Scramble every RNG and start from a differently initialised model.
    random.seed(99)
    np.random.seed(99)
    model2, opt2, sched2, ema2, gen2 = make_training_state(seed=7)
    info = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, ema=ema2,
                           generators={"noise": gen2})
    assert info["step"] == 3
    assert info["extra"]["cfg"] == {"a": 1}
    assert info["extra"]["history"][0] == 0.5 and np.isnan(info["extra"]["history"][1])
    assert sched2.last_epoch == 3
    assert isinstance(opt2.state_dict()["state"][0]["step"], torch.Tensor)

    draws = [train_step(model2, opt2, sched2, ema2, gen2) for _ in range(3)]
    assert draws == ref_draws
    assert_snapshots_equal(snapshot(model2, opt2, ema2), ref)
    assert sched2.get_last_lr() == ref_lr
    nxt = (torch.rand(3), torch.randn(2, generator=gen2), random.random(), np.random.rand())
    assert torch.equal(nxt[0], ref_next[0]) and torch.equal(nxt[1], ref_next[1])
    assert nxt[2:] == ref_next[2:]
    # Tied weights stay tied after loading.
    assert model2.head.weight is model2.embed.weight
    assert model2.scale.dtype == torch.bfloat16


def test_restore_global_rng_false_leaves_global_state(tmp_path):
    model = nn.Linear(2, 2)
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path, 0, model=model)
    torch.manual_seed(6)
    expected = torch.rand(4)
    torch.manual_seed(6)
    load_checkpoint(path, model=model, restore_global_rng=False)
    assert torch.equal(torch.rand(4), expected)


def test_ema_module_and_empty_dict(tmp_path):
    torch.manual_seed(0)
    model, ema_module = nn.Linear(3, 2), nn.Linear(3, 2)
    path = save_checkpoint(tmp_path, 1, model=model, ema=ema_module)
    fresh_ema = nn.Linear(3, 2)
    load_checkpoint(path, model=nn.Linear(3, 2), ema=fresh_ema)
    assert torch.equal(fresh_ema.weight, ema_module.weight) and torch.equal(fresh_ema.bias, ema_module.bias)
    filled: dict[str, torch.Tensor] = {}
    load_checkpoint(path, model=nn.Linear(3, 2), ema=filled)
    assert set(filled) == {"weight", "bias"} and torch.equal(filled["weight"], ema_module.weight)


def test_missing_parts_are_reported(tmp_path):
    path = save_checkpoint(tmp_path, 1, model=nn.Linear(2, 2), generators={"a": torch.Generator()})
    with pytest.raises(CheckpointError, match="EMA"):
        load_checkpoint(path, model=nn.Linear(2, 2), ema={"weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="optimizer"):
        model = nn.Linear(2, 2)
        load_checkpoint(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match="'b'"):
        load_checkpoint(path, model=nn.Linear(2, 2), generators={"b": torch.Generator()})


def test_keep_last_deletes_only_older_checkpoints(tmp_path):
    model = nn.Linear(2, 2)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, model=model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000040", "step_00000050"]
    save_checkpoint(tmp_path, 60, model=model, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000040", "step_00000050", "step_00000060"]
    # Re-saving an older step never deletes the checkpoint just written, nor newer ones.
    written = save_checkpoint(tmp_path, 45, model=model, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000045", "step_00000050", "step_00000060"]
    assert written.name == "step_00000045"
    # Saving an existing step replaces it.
    save_checkpoint(tmp_path, 60, model=model, keep_last=None, extra={"v": 2})
    assert load_checkpoint(tmp_path / "checkpoints" / "step_00000060", model=model)["extra"] == {"v": 2}


def test_partial_tmp_dir_and_corrupted_checkpoint(tmp_path, caplog):
    model = nn.Linear(4, 4)
    good = save_checkpoint(tmp_path, 1, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    bad = save_checkpoint(tmp_path, 2, model=model, keep_last=5)
    # A save killed before its rename: partial files in a tmp dir with a higher step.
    tmp = tmp_path / "checkpoints" / ".tmp-step_00000003"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:40])
    # A finished checkpoint damaged later on disk.
    target = bad / "model.safetensors"
    target.write_bytes(target.read_bytes()[:-7])

    assert list_checkpoints(tmp_path) == [good, bad]
    with caplog.at_level(logging.WARNING, logger="dancegrpo.checkpoint"):
        assert latest_checkpoint(tmp_path) == good
    assert "step_00000002" in caplog.text and "model.safetensors" in caplog.text
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(bad, model=model)

    # Same size, flipped byte: caught by the SHA-256, not the size.
    data = bytearray((good / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (good / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors.*SHA-256"):
        load_checkpoint(good, model=model)
    assert latest_checkpoint(tmp_path) is None

    save_checkpoint(tmp_path, 4, model=model, keep_last=5)
    assert not tmp.exists()


def test_tampered_state_json_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, model=nn.Linear(2, 2), extra={"lr": 0.5})
    state_file = path / "state.json"
    state = json.loads(state_file.read_text())
    state["step"] = 2
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="state.json"):
        load_checkpoint(path, model=nn.Linear(2, 2))
    state_file.write_text(state_file.read_text()[:50])
    with pytest.raises(CheckpointError, match="state.json"):
        load_checkpoint(path, model=nn.Linear(2, 2))


def test_mismatched_model_lists_keys(tmp_path):
    path = save_checkpoint(tmp_path, 1, model=nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model=nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2), nn.Linear(2, 2)))
    msg = str(err.value)
    assert "unexpected" not in msg
    assert "missing keys: 2.bias, 2.weight" in msg
    assert "0.weight (checkpoint (4, 3) vs model (5, 3))" in msg
    assert "1.weight" in msg and "0.bias" in msg

    many = nn.ModuleDict({f"layer{i}": nn.Linear(2, 2) for i in range(8)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: .* and 11 more"):
        load_checkpoint(save_checkpoint(tmp_path / "b", 1, model=many), model=nn.Linear(2, 2))


def test_extra_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, 1, model=nn.Linear(2, 2), extra={"bad": object()})
    with pytest.raises(TypeError, match="'noise'"):
        save_checkpoint(tmp_path, 1, model=nn.Linear(2, 2), generators={"noise": 3})
    # A failed save leaves nothing behind, not even a temporary directory.
    assert list_checkpoints(tmp_path) == []
    assert list((tmp_path / "checkpoints").iterdir()) == []


# --------------------------------------------------------------------------- kill safety

_CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    from torch import nn
    import shutil
    import dancegrpo.checkpoint as ck
    from dancegrpo.checkpoint import codec, local

    stage = sys.argv[2]
    # No optimizer here: constructing the first one costs seconds of imports.
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
    ema = {k: v.detach() * 0.5 for k, v in model.state_dict().items()}
    ck.save_checkpoint(sys.argv[1], 1, model=model, ema=ema, keep_last=1)

    def hang(name):
        print(name, flush=True)
        time.sleep(60)

    # Where the save looks them up: codec's tensor writer, local's publish, layout's prune (shutil).
    real_fsync_file, real_publish, real_rmtree = codec.fsync_file, local.publish, shutil.rmtree
    def fsync_file(path):
        real_fsync_file(path)
        if stage == "mid_write" and path.name == "ema.safetensors":
            hang(stage)
    def publish(tmp, final):
        if stage == "before_rename":
            hang(stage)
        real_publish(tmp, final)
        if stage == "after_rename":
            hang(stage)
    def rmtree(path, *args, **kwargs):
        if stage == "mid_prune" and "deleting-" in str(path):
            # Delete part of the old checkpoint, then die.
            os.remove(os.path.join(path, "model.safetensors"))
            hang(stage)
        real_rmtree(path, *args, **kwargs)
    codec.fsync_file, local.publish, shutil.rmtree = fsync_file, publish, rmtree

    with torch.no_grad():
        model[0].weight.add_(1.0)
    ck.save_checkpoint(sys.argv[1], 2, model=model, ema=ema, keep_last=1)
    print("done", flush=True)
    """
)


@pytest.mark.parametrize(
    "stage, surviving_step",
    [("mid_write", 1), ("before_rename", 1), ("after_rename", 2), ("mid_prune", 2)],
)
def test_sigkill_during_save_leaves_only_loadable_checkpoints(tmp_path, stage, surviving_step):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(script), str(run_dir), stage],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline().strip()
        assert line == stage, f"child did not reach {stage}: {line!r} {child.stderr.read()}"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()

    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == f"step_{surviving_step:08d}"
    torch.manual_seed(0)
    reference = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])  # same init as the child
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
    for path in list_checkpoints(run_dir):
        ema: dict[str, torch.Tensor] = {}
        step = load_checkpoint(path, model=model, ema=ema, restore_global_rng=False)["step"]
        assert path.name == f"step_{step:08d}" and step <= surviving_step
        assert torch.equal(model[0].weight, reference[0].weight + (1.0 if step == 2 else 0.0))
        assert torch.equal(model[7].bias, reference[7].bias)
        assert torch.equal(ema["7.weight"], reference[7].weight * 0.5)
    # The next save removes whatever partial directories the kill left behind.
    save_checkpoint(run_dir, 3, model=model, keep_last=1)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000003"]
