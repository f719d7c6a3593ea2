"""Ulysses inside the trainer: a training step of a tiny HunyuanVideo with sliding-tile attention on 2
sequence-parallel gloo ranks (one data-parallel replica) equals the same step in one process: same
rollout noise, same rewards, same update; also when only LoRA weights are trained. On 2 x 2 ranks
(two replicas, FSDP2 over all four) the step is self-consistent (see the test). The same
single-process equality for a tiny Wan 2.1 text-to-video model, and for a two-expert Wan 2.2
with both experts trained, each its own Ulysses + FSDP2 root."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
import pytest

from dancegrpo.cli import main
from dancegrpo.distributed.blocks import unwrap_denoiser
from dancegrpo.trainer import Trainer
from gloo_helpers import free_port
from tiny_models import PROMPTS, brightness, build_hunyuan_video, build_wan_t2v, trainer_config, write_prompts

WORLD = 2


def _worker(rank: int, port: int, config: dict, out_dir: str, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)  # peft draws LoRA's initial A from the global generator: the same on every rank
        trainer = Trainer(config, rewards={"brightness": brightness})
        assert (trainer.dp.size, trainer.dp.world) == (world // config["parallel"]["sp_size"], world)
        assert trainer.sharded == config["parallel"].get("fsdp", False)
        experts = [unwrap_denoiser(m) for m in getattr(trainer.adapter, "experts", {}).values()]
        if experts:  # Wan: every expert, trained or frozen, got Ulysses and (under FSDP) its own root
            assert [m._ulysses_installed for m in experts] == [True] * len(experts)
            if trainer.sharded:
                assert trainer.parallel.sharded_modules == experts
                assert all(isinstance(p, DTensor) for m in experts for p in m.parameters())
        metrics = trainer.step()
        weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                   for k, v in trainer.policy.state_dict().items()}  # FSDP: gathered on every rank
        torch.save({"weights": weights, "metrics": metrics}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,parallel,lora", [(WORLD, {"sp_size": 2}, None),
                                                 (WORLD, {"sp_size": 2}, {"rank": 2, "alpha": 4}),
                                                 (4, {"sp_size": 2, "fsdp": True}, None)],
                         ids=["sp2", "sp2-lora", "sp2xdp2-fsdp"])
def test_sequence_parallel_step_equals_single_process_step(tmp_path, world, parallel, lora):
    ckpt = build_hunyuan_video(tmp_path / "ckpt")
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    assert main(["preprocess", "--model", "hunyuan_video", "--path", str(ckpt), "--prompts", str(prompts),
                 "--out", str(tmp_path / "cache"), "--dtype", "float32", "--option", "max_sequence_length=48",
                 "--option", "template_crop_start=auto", "--no-progress"]) == 0
    # 5 frames of 32 x 48 pixels: 2 x 2 x 3 = 12 video tokens after patchify, 6 per rank. Sliding-tile
    # attention inside: a window per head (each rank keeps its head's), full attention at step 0.
    sta = {"window": [[1, 1, 1], [1, 2, 2]], "tile": [1, 2, 2], "full_attention_steps": 1, "backend": "torch"}
    options = {"prompt_cache": str(tmp_path / "cache"), "height": 32, "width": 48, "frames": 5, "sta": sta}
    if lora:  # LoRA weights alone trained: Ulysses goes on the peft model's base transformer
        options["lora"] = lora
    config = trainer_config(tmp_path / "run", "hunyuan_video", ckpt, options)
    config["grpo"]["tau"] = 1.0

    mp.spawn(_worker, args=(free_port(), {**config, "parallel": parallel}, str(tmp_path), world),
             nprocs=world, join=True)
    saved = [torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in range(world)]
    if world > parallel["sp_size"]:
        # Two replicas draw their own SDE noise, so a single process cannot replay this rollout
        # (test_distributed_data_parallel checks DP against one process from the recorded batch).
        # Here: Ulysses inside FSDP replicas is self-consistent. Old and new log-probs agree on
        # every rank, every rank reports the same global metrics and ends with the same weights.
        initial = Trainer(config, rewards={"brightness": brightness}).policy.state_dict()
        for rank, data in enumerate(saved):
            assert data["metrics"]["first_update_logp_max_dev"] == 0.0
            assert data["metrics"]["reward/brightness_mean"] == saved[0]["metrics"]["reward/brightness_mean"]
            for name, value in saved[0]["weights"].items():
                torch.testing.assert_close(data["weights"][name], value, rtol=0, atol=0,
                                           msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
        assert any(not torch.equal(saved[0]["weights"][k], v) for k, v in initial.items())
        return
    torch.manual_seed(0)  # the ranks' LoRA initialisation
    reference = Trainer(config, rewards={"brightness": brightness})
    before = {k: v.clone() for k, v in reference.policy.state_dict().items()}
    expected = reference.step()
    after = reference.policy.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in after)
    for rank, data in enumerate(saved):
        # The rollouts agree: the same rewards, and old and new log-probs agree at the first update.
        assert data["metrics"]["first_update_logp_max_dev"] == 0.0
        torch.testing.assert_close(data["metrics"]["reward/brightness_mean"], expected["reward/brightness_mean"],
                                   rtol=1e-5, atol=1e-6)
        # atol: one Adam step at lr 1e-3 moves a weight by lr * g / (|g| + eps); where |g| is near eps
        # (1e-8), float reordering in the gradient shows up as a few 1e-5 of update. A wrong
        # gradient moves many weights by ~lr, far outside this.
        for name, value in after.items():
            torch.testing.assert_close(data["weights"][name], value, rtol=1e-5, atol=1e-4,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")


FSDP_SELECTIVE = {"sp_size": 2, "fsdp": True, "activation_checkpointing": "selective"}


@pytest.mark.parametrize("two_experts,parallel,extra", [
    (False, {"sp_size": 2}, {}),
    (True, FSDP_SELECTIVE, {}),
    (True, FSDP_SELECTIVE, {"train_experts": ["low"], "lora": {"rank": 2, "alpha": 4}})],
    ids=["wan21-sp2", "wan22-two-experts-sp2-fsdp", "wan22-frozen-high-lora-low-sp2-fsdp"])
def test_wan_sequence_parallel_step_equals_single_process_step(tmp_path, two_experts, parallel, extra):
    """Wan text-to-video with classifier-free guidance (cfg_scale 5: 2B rows per transformer call) on 2
    Ulysses ranks equals one process. Two experts (boundary 0.8; sigmas 1, 0.857, 0.6 after shift 3:
    steps 0 and 1 on the high-noise expert, step 2 on the low-noise one, all three trained): both get
    Ulysses, selective checkpointing and their own FSDP2 root, and one update's micro-batches run both.
    Last case: the high-noise expert frozen (still Ulysses and an FSDP2 root of its own; it runs in the
    rollout only) and the low-noise one trained through LoRA, whose weights re-bind to the shards."""
    ckpt = build_wan_t2v(tmp_path / "ckpt", two_experts=two_experts)
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    assert main(["preprocess", "--model", "wan_t2v", "--path", str(ckpt), "--prompts", str(prompts),
                 "--out", str(tmp_path / "cache"), "--dtype", "float32", "--option", "max_sequence_length=24",
                 "--no-progress"]) == 0
    # 5 frames of 32 x 32 pixels: latents (4, 2, 4, 4), 2 x 2 x 2 = 8 video tokens, 4 per rank.
    options = {"prompt_cache": str(tmp_path / "cache"), "height": 32, "width": 32, "frames": 5}
    config = trainer_config(tmp_path / "run", "wan_t2v", ckpt, {**options, **extra})
    config["grpo"]["tau"] = 1.0   # every (sample, step) pair trained: 6 micro-batches of 2 in one update
    if "train_experts" in extra:
        config["sampler"]["sde_window"] = [2, 3]   # the low-noise expert's step only

    mp.spawn(_worker, args=(free_port(), {**config, "parallel": parallel}, str(tmp_path), WORLD),
             nprocs=WORLD, join=True)
    saved = [torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in range(WORLD)]
    torch.manual_seed(0)  # the ranks' LoRA initialisation
    reference = Trainer(config, rewards={"brightness": brightness})
    if "lora" in extra:
        assert reference.policy is reference.adapter._policy and not any(
            p.requires_grad for p in reference.adapter.transformer.parameters())
        prefixes = ("",)   # one trained module: the low expert's LoRA weights
    elif two_experts:
        assert set(dict(reference.policy.named_children())) == {"transformer", "transformer_2"}
        prefixes = ("transformer.", "transformer_2.")
    else:
        assert reference.policy is reference.adapter.transformer
        prefixes = ("",)
    before = {k: v.clone() for k, v in reference.policy.state_dict().items()}
    expected = reference.step()
    after = reference.policy.state_dict()
    for prefix in prefixes:   # every trained expert moved in the single-process step
        assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith(prefix)), prefix
    for rank, data in enumerate(saved):
        assert data["metrics"]["first_update_logp_max_dev"] == 0.0
        torch.testing.assert_close(data["metrics"]["reward/brightness_mean"], expected["reward/brightness_mean"],
                                   rtol=1e-5, atol=1e-6)
        assert data["weights"].keys() == after.keys()
        # atol: see test_sequence_parallel_step_equals_single_process_step (Adam near |g| ~ eps).
        for name, value in after.items():
            torch.testing.assert_close(data["weights"][name], value, rtol=1e-5, atol=1e-4,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
