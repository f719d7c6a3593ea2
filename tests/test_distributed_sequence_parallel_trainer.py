"""Ulysses inside the trainer: a training step of a tiny HunyuanVideo with sliding-tile attention on 2
sequence-parallel gloo ranks (one data-parallel replica) equals the same step in one process: same
rollout noise, same rewards, same update."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dancegrpo.cli import main
from dancegrpo.trainer import Trainer
from tiny_models import PROMPTS, brightness, build_hunyuan_video, trainer_config, write_prompts

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, config: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        trainer = Trainer(config, rewards={"brightness": brightness})
        assert (trainer.dp.size, trainer.dp.world) == (1, WORLD)
        metrics = trainer.step()
        torch.save({"weights": trainer.policy.state_dict(), "metrics": metrics}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_step_equals_single_process_step(tmp_path):
    ckpt = build_hunyuan_video(tmp_path / "ckpt")
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    assert main(["preprocess", "--model", "hunyuan_video", "--path", str(ckpt), "--prompts", str(prompts),
                 "--out", str(tmp_path / "cache"), "--dtype", "float32", "--option", "max_sequence_length=48",
                 "--option", "template_crop_start=auto", "--no-progress"]) == 0
    # 5 frames of 32 x 48 pixels: 2 x 2 x 3 = 12 video tokens after patchify, 6 per rank. Sliding-tile
    # attention inside: a window per head (each rank keeps its head's), full attention at step 0.
    sta = {"window": [[1, 1, 1], [1, 2, 2]], "tile": [1, 2, 2], "full_attention_steps": 1, "backend": "reference"}
    options = {"prompt_cache": str(tmp_path / "cache"), "height": 32, "width": 48, "frames": 5, "sta": sta}
    config = trainer_config(tmp_path / "run", "hunyuan_video", ckpt, options)
    config["grpo"]["tau"] = 1.0

    mp.spawn(_worker, args=(_free_port(), {**config, "parallel": {"sp_size": WORLD}}, str(tmp_path)),
             nprocs=WORLD, join=True)
    reference = Trainer(config, rewards={"brightness": brightness})
    before = {k: v.clone() for k, v in reference.policy.state_dict().items()}
    expected = reference.step()
    after = reference.policy.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in after)
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        # The rollouts agree: the same rewards, and old and new log-probs agree at the first update.
        assert saved["metrics"]["first_update_logp_max_dev"] == 0.0
        torch.testing.assert_close(saved["metrics"]["reward/brightness_mean"], expected["reward/brightness_mean"],
                                   rtol=1e-5, atol=1e-6)
        for name, value in after.items():
            torch.testing.assert_close(saved["weights"][name], value, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
