"""dancegrpo.checkpoint as a package: the on-disk layout old runs resume from, the manager's
format choice, and the import structure (a DAG, no private names across modules).

The layout tests read the files with safetensors, json, hashlib and DCP's own reader, never
with the package's readers, and compare them with the layout documented in
dancegrpo/checkpoint/layout.py (which is the layout main wrote before the package existed).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dancegrpo.checkpoint import CheckpointError, CheckpointManager, list_checkpoints, save_checkpoint
from import_graph import first_cycle, imports, module_name, targets
from import_graph import graph as import_graph

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dancegrpo" / "checkpoint"
# Each module may import only the ones before it (the order of the package docstring).
ORDER = ["codec", "layout", "local", "sharded", "manager", "__init__"]


def _trained_state(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 / (1 + it))
    model(torch.randn(5, 3)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    ema = {k: v.detach().clone() * 0.5 for k, v in model.named_parameters()}
    return model, optimizer, scheduler, ema


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _own_checksum(record: dict, key: str) -> str:
    body = {k: v for k, v in record.items() if k != key}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- on-disk layout


def test_local_checkpoint_files_and_keys_are_the_documented_layout(tmp_path):
    model, optimizer, scheduler, ema = _trained_state()
    generator = torch.Generator().manual_seed(3)
    ckpt = save_checkpoint(tmp_path, 7, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                           generators={"noise": generator}, extra={"iteration": 7})
    assert ckpt == tmp_path / "checkpoints" / "step_00000007"
    # The LambdaLR state holds no tensor, so there is no scheduler.safetensors.
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema.safetensors", "model.safetensors",
                                                      "optimizer.safetensors", "rng.safetensors", "state.json"]
    state = json.loads((ckpt / "state.json").read_text())
    assert list(state) == ["format_version", "step", "optimizer", "scheduler", "rng", "extra", "files", "state_sha256"]
    assert state["format_version"] == 1 and state["step"] == 7 and state["extra"] == {"iteration": 7}
    assert state["state_sha256"] == _own_checksum(state, "state_sha256")
    assert state["files"] == {name: {"size": (ckpt / name).stat().st_size, "sha256": _sha256(ckpt / name)}
                              for name in ["ema.safetensors", "model.safetensors", "optimizer.safetensors",
                                           "rng.safetensors"]}
    for name, value in load_file(str(ckpt / "model.safetensors")).items():
        assert torch.equal(value, model.state_dict()[name])
    assert load_file(str(ckpt / "model.safetensors")).keys() == model.state_dict().keys()
    assert {k: v.tolist() for k, v in load_file(str(ckpt / "ema.safetensors")).items()} == \
        {k: v.tolist() for k, v in ema.items()}
    # Optimizer: tensors under "state.<param index>.<name>", JSON with tags for int keys and tensors.
    opt_tensors = load_file(str(ckpt / "optimizer.safetensors"))
    saved = optimizer.state_dict()
    assert sorted(opt_tensors) == sorted(f"state.{i}.{k}" for i, s in saved["state"].items() for k in s)
    assert torch.equal(opt_tensors["state.2.exp_avg"], saved["state"][2]["exp_avg"])
    items = state["optimizer"]["state"]["__items__"]
    assert [index for index, _ in items] == [0, 1, 2, 3]
    assert items[0][1] == {k: {"__tensor__": f"state.0.{k}"} for k in saved["state"][0]}
    assert state["optimizer"]["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.999]}
    assert state["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert state["scheduler"]["last_epoch"] == 1
    # RNG: torch CPU and each named generator in rng.safetensors; Python/NumPy state in state.json.
    rng = load_file(str(ckpt / "rng.safetensors"))
    assert sorted(rng) == ["generator.noise", "torch_cpu"]  # no CUDA here
    assert torch.equal(rng["generator.noise"], generator.get_state())
    assert set(state["rng"]) == {"cuda_devices", "python", "numpy", "generators"}
    assert state["rng"]["generators"] == {"noise": {"device": "cpu"}}


def test_sharded_checkpoint_files_and_keys_are_the_documented_layout(tmp_path):
    """A distributed manager writes DCP; one process without a process group stands in for the ranks."""
    import torch.distributed.checkpoint as dcp

    model, optimizer, scheduler, ema = _trained_state()
    manager = CheckpointManager(tmp_path, distributed=True, keep_last=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        manager.save(4, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, extra={"iteration": 4})
        ckpt = manager.save(5, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                            extra={"iteration": 5})
    assert ckpt == tmp_path / "checkpoints" / "step_00000005" and list_checkpoints(tmp_path) == [ckpt]
    assert sorted(p.name for p in ckpt.iterdir()) == ["dcp", "meta.json"]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert list(meta) == ["format", "step", "world_size", "scheduler", "has_optimizer", "has_ema", "extra", "files",
                          "meta_sha256"]
    assert (meta["format"], meta["step"], meta["world_size"]) == ("dancegrpo-dcp-1", 5, 1)
    assert meta["has_optimizer"] and meta["has_ema"] and meta["extra"] == {"iteration": 5}
    assert meta["scheduler"]["last_epoch"] == 1
    assert meta["meta_sha256"] == _own_checksum(meta, "meta_sha256")
    dcp_files = sorted(p for p in (ckpt / "dcp").rglob("*") if p.is_file())
    assert meta["files"] == {str(p.relative_to(ckpt)): p.stat().st_size for p in dcp_files}
    assert "dcp/.metadata" in meta["files"]
    keys = set(dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata)
    names = [n for n, _ in model.named_parameters()]
    assert {f"model.{n}" for n in names} | {f"ema.{n}" for n in names} <= keys
    assert {f"optimizer.state.{n}.{k}" for n in names for k in ("exp_avg", "exp_avg_sq", "step")} <= keys

    # One plain process reads it back through the manager (the folder picks the loader).
    fresh, fresh_opt, fresh_sched, _ = _trained_state(seed=1)
    fresh_ema = {k: torch.zeros_like(v) for k, v in ema.items()}
    info = CheckpointManager(None).load(ckpt, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched, ema=fresh_ema)
    assert info["step"] == 5 and info["extra"] == {"iteration": 5} and info["world_size"] == 1
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    for name, value in ema.items():
        assert torch.equal(fresh_ema[name], value), name
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh_sched.last_epoch == 1


# --------------------------------------------------------------------------- the manager


def test_manager_writes_the_local_format_in_one_process_and_reports_ema(tmp_path):
    model, optimizer, scheduler, ema = _trained_state()
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema if step == 3 else None,
                     extra={"iteration": step})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert manager.latest() == tmp_path / "checkpoints" / "step_00000003"
    assert (manager.latest() / "state.json").is_file() and not (manager.latest() / "dcp").exists()
    assert CheckpointManager.has_ema(manager.latest()) and not CheckpointManager.has_ema(list_checkpoints(tmp_path)[0])
    fresh, fresh_opt, fresh_sched, _ = _trained_state(seed=1)
    info = manager.load(manager.latest(), model=fresh, optimizer=fresh_opt, scheduler=fresh_sched,
                        restore_global_rng=False)
    assert info == {"step": 3, "extra": {"iteration": 3}}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="EMA"):
        manager.load(list_checkpoints(tmp_path)[0], model=fresh, ema={"0.weight": torch.zeros(4, 3)})


def test_manager_refuses_bad_arguments_before_any_write(tmp_path):
    with pytest.raises(ValueError, match="sharded=True .* needs distributed=True"):
        CheckpointManager(tmp_path, sharded=True)
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="needs a run folder"):
        CheckpointManager(None).save(1, model=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs a run folder"):
        CheckpointManager(None).latest()
    assert not (tmp_path / "checkpoints").exists()


class _RecordingAdapter:
    def __init__(self, log: list):
        self.log = log

    def save_pretrained(self, path):
        self.log.append(("save_pretrained", Path(path)))


def test_export_final_saves_inside_the_weights_context_on_the_main_process_only(tmp_path):
    log: list = []

    @contextlib.contextmanager
    def weights():
        log.append("swap in")
        yield
        log.append("swap back")

    out = CheckpointManager(tmp_path).export_final(_RecordingAdapter(log), model=nn.Linear(2, 2), weights=weights)
    assert out == tmp_path / "final_model"
    assert log == ["swap in", ("save_pretrained", tmp_path / "final_model"), "swap back"]
    log.clear()
    CheckpointManager(tmp_path, is_main=False).export_final(_RecordingAdapter(log), model=nn.Linear(2, 2),
                                                            weights=weights)
    assert log == ["swap in", "swap back"]


# --------------------------------------------------------------------------- import structure


def test_checkpoint_and_distributed_modules_import_each_other_without_a_cycle():
    files = sorted(PACKAGE.glob("*.py")) + sorted((REPO / "dancegrpo" / "distributed").glob("*.py"))
    known = {module_name(f) for f in files}
    graph = import_graph(files)
    cycle = first_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # Within the package, each module imports only those before it in ORDER.
    for f in PACKAGE.glob("*.py"):
        me = ORDER.index(f.stem)
        for module, names in imports(f):
            for target in targets(module, names, known):
                if target.startswith("dancegrpo.checkpoint."):
                    assert ORDER.index(target.rpartition(".")[2]) < me, f"{f.name} imports {target}"


def test_no_private_name_crosses_a_module_boundary_and_the_old_modules_are_gone():
    own = ("dancegrpo/checkpoint/", )
    for f in sorted((REPO / "dancegrpo").rglob("*.py")) + sorted((REPO / "bench").rglob("*.py")):
        for module, names in imports(f):
            if not module.startswith("dancegrpo"):
                continue
            private = [n for n in names if n.startswith("_")]
            inside = str(f.relative_to(REPO)).startswith(own)
            if inside or module.startswith("dancegrpo.checkpoint"):
                assert not private, f"{f.relative_to(REPO)} imports private {private} from {module}"
            if not inside:  # the format modules are reached through the manager only
                assert module not in ("dancegrpo.checkpoint.sharded", "dancegrpo.checkpoint.local"), \
                    f"{f.relative_to(REPO)} picks a checkpoint format itself (import {module})"
    assert not (REPO / "dancegrpo" / "checkpoint.py").exists()
    assert not (REPO / "dancegrpo" / "distributed" / "dist_checkpoint.py").exists()


def test_importing_the_package_does_not_load_dcp():
    """Single-process runs and `dancegrpo --help` paths do not pay for torch.distributed.checkpoint."""
    code = ("import sys, dancegrpo.checkpoint; "
            "print(sorted(m for m in ('torch.distributed.checkpoint', 'dancegrpo.checkpoint.sharded') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stderr
