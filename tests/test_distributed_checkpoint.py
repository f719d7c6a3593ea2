"""A killed rank under torchrun: the restarted job resumes from the last (sharded) checkpoint and finishes.

(The evaluation loader reads the sharded checkpoint too. Writing one on 2 FSDP ranks and resuming it on 1 process is checked in
test_distributed_data_parallel.py, on the ranks that test already runs.)
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from dancegrpo.checkpoint import list_checkpoints
from dancegrpo.models import load_model
from dancegrpo.trainer import Trainer
from gloo_helpers import free_port

WORLD = 2
TESTS = Path(__file__).parent


def test_killed_rank_restarts_from_last_checkpoint_and_finishes(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["eval_num_prompts"] = 2  # evaluated before and after, with the EMA weights swapped in
    cfg["grpo"].update(prompts_per_iteration=2, group_size=4)
    cfg["trainer"].update(iterations=3, micro_batch_size=4, checkpoint_every=1, keep_last=1, ema_decay=0.9,
                          eval_every=1)  # evaluation (EMA swapped in) between steps and saves
    cfg["parallel"] = {"fsdp": True}  # sharded weights, EMA and optimizer state, 2 ranks -> 2 ranks
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, DANCEGRPO_TEST_CRASH="1:2", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--max-restarts", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
               "-m", "dancegrpo.cli", "train", "--config", str(config_path), "--resume-or-start", "--no-progress"]
    # Its own session, so that on a timeout the whole job (launcher and workers) is ended together.
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        log, _ = job.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        log, _ = job.communicate()
        raise AssertionError(f"the torchrun job did not finish in 120 s:\n{log[-4000:]}") from None
    assert job.returncode == 0, log[-4000:]
    assert "exitcode: 17" in log, log[-4000:]  # rank 1 did die
    # Rank 1 died before iteration 3; the restarted job resumed after iteration 2 and finished.
    assert "resumed from" in log and "at iteration 2" in log, log[-4000:]
    run_dir = Path(cfg["run"]["output_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(row["step"] for row in rows if "loss" in row) == [1, 2, 3]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000003"]
    summary = json.loads((run_dir / "summary.json").read_text())  # rank 0 evaluated before and after
    assert summary["base"] and summary["final"]
    # The final model: the EMA weights, gathered from the shards and written by rank 0 in the model's
    # own format. Reference: the EMA of the last sharded checkpoint, loaded by one process.
    single = copy.deepcopy(cfg)
    del single["parallel"]
    trainer = Trainer(single)
    assert trainer.resume() and trainer.iteration == 3
    final = load_model("toy_flux", str(run_dir / "final_model"), {}).trainable.state_dict()
    assert final.keys() == trainer.ema.keys()
    for name, value in final.items():
        torch.testing.assert_close(value, trainer.ema[name], rtol=0, atol=0)
    # `dancegrpo eval` reads the same sharded checkpoint in one process: weights and EMA as resumed.
    from dancegrpo.eval.evaluate import load_checkpoint_weights
    from dancegrpo.eval.heldout import EvalModel
    evaluator = EvalModel.build(single)
    assert load_checkpoint_weights(evaluator, run_dir) == 3
    for (name, value), (_, resumed) in zip(evaluator.policy.state_dict().items(), trainer.policy.state_dict().items()):
        torch.testing.assert_close(value, resumed, rtol=0, atol=0, msg=name)
    for name, value in evaluator.ema.items():
        torch.testing.assert_close(value, trainer.ema[name], rtol=0, atol=0, msg=name)
