"""Data-parallel GRPO on 2 gloo processes equals one process on the same prompts and noise.

Each rank runs one real `Trainer.step()` (rollout, rewards, advantages, one update) and records
what it trained on. The reference is a single-process Trainer that recomputes the rewards and
advantages of the union of the ranks' samples itself, and takes one update on them: its weights
must equal every rank's weights after the step (fp32, 1e-5), with and without FSDP (the FSDP
run also checkpoints activations inside each sharded block, which the reference does not, and
adds a KL term to the frozen initial model, an unsharded copy on every rank).

The FSDP ranks also write a sharded (DCP) checkpoint, which one process without FSDP resumes:
weights, EMA, optimizer moments, LR schedule and iteration must come back exactly; and the
`final_model/` they export holds their EMA weights exactly.

The LoRA cases train a tiny FLUX's LoRA weights alone (the base frozen and, under FSDP/HSDP,
sharded too) and check the same against a single-process LoRA run.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dancegrpo import grpo
from dancegrpo.checkpoint import latest_checkpoint
from dancegrpo.data import prompts_for_iteration
from dancegrpo.distributed.blocks import checkpointed_blocks
from dancegrpo.distributed.data_parallel import DataParallel
from dancegrpo.models import load_model, repeat_cond
from dancegrpo.rollout import Rollout
from dancegrpo.trainer import Trainer
from gloo_helpers import free_port

WORLD = 2  # ranks, unless a case says otherwise (HSDP needs 2 x 2)


def _full(value) -> torch.Tensor:
    return (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()


def _full_state(trainer: Trainer) -> dict:
    """Unsharded weights, EMA, optimizer state (keyed by parameter name) and learning rate."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True)
    return {"weights": {k: _full(v) for k, v in get_model_state_dict(trainer.policy, options=full).items()},
            "ema": {k: _full(v) for k, v in trainer.ema.items()} if trainer.ema is not None else None,
            "optimizer": get_optimizer_state_dict(trainer.policy, trainer.optimizer, options=full),
            "lr": trainer.scheduler.get_last_lr()}


def _worker(rank: int, port: int, config: dict, out_dir: str, start: str, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        trainer = Trainer(config)
        assert trainer.resume(start) and trainer.iteration == 1  # a single-process checkpoint
        assert trainer.dp.size == world and trainer.dp.rank == rank and trainer.is_main == (rank == 0)
        assert trainer.sharded == bool(config["parallel"]["fsdp"])
        if trainer.sharded:  # HSDP shards over a 2D (replicate, shard) mesh, FSDP over a 1D one
            mesh = next(trainer.policy.parameters()).device_mesh
            assert mesh.ndim == (2 if config["parallel"]["fsdp"].get("shard_size") else 1)
        denoiser = getattr(trainer.adapter, "denoiser", trainer.policy)  # LoRA: the peft model, not its weights
        assert bool(checkpointed_blocks(denoiser)) == ("activation_checkpointing" in config["parallel"])
        seen = {}
        original = trainer._update

        def recording_update(rollout, advantages, valid, cond, plan_gen):
            seen.update(latents=rollout.latents.clone(), log_probs=rollout.log_probs.clone(),
                        chunks=[c.clone() for c in rollout.chunks], advantages=advantages.clone(),
                        valid=valid.clone(), cond={k: v.clone() for k, v in cond.items()})
            return original(rollout, advantages, valid, cond, plan_gen)

        trainer._update = recording_update
        metrics = trainer.step()
        checkpoint = str(trainer.save()) if trainer.sharded else None
        if trainer.sharded:  # gathered to rank 0 through a fresh copy of the model, EMA weights swapped in
            trainer._save_final_model()
        torch.save({"batch": seen, **_full_state(trainer), "metrics": metrics, "checkpoint": checkpoint},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _config(tiny_config: dict, placement: str, fsdp: bool, shard_size: int | None = None,
            lora_flux: tuple | None = None, frozen_dtype: str = "float32") -> dict:
    cfg = copy.deepcopy(tiny_config)
    if lora_flux is not None:  # (checkpoint, prompt cache) of the tiny FLUX: train rank-2 LoRA weights on it
        ckpt, cache = lora_flux
        cfg["model"] = {"name": "flux", "path": str(ckpt), "options": {
            "prompt_cache": str(cache), "height": 16, "width": 24, "lora": {"rank": 2, "alpha": 4},
            "frozen_dtype": frozen_dtype}}
        cfg["data"]["train_prompts"] = str(cache / "prompts.txt")
        if frozen_dtype == "bfloat16":  # a bf16 base computes under bf16 autocast (fp32 LoRA master weights)
            cfg["run"]["autocast_dtype"] = "bf16"
    cfg["data"]["eval_prompts"] = ""
    cfg["grpo"].update(prompts_per_iteration=4, group_size=4, tau=1.0)
    # tau 1 and one update: the update holds every (chunk, step) pair, as in the reference.
    cfg["trainer"].update(updates_per_iteration=1, micro_batch_size=4, iterations=3)
    cfg["parallel"] = {"group_placement": placement, "fsdp": {"enabled": True, "shard_size": shard_size} if fsdp else False}
    if fsdp:  # also with activation checkpointing inside the shards, a KL term, checkpointed, with an EMA
        cfg["parallel"]["activation_checkpointing"] = "selective"
        cfg["grpo"]["kl_coef"] = 0.5
        cfg["trainer"].update(ema_decay=0.9, lr_schedule="linear")
    return cfg


def _global_batch(ranks: list[dict], placement: str, num_prompts: int, group_size: int):
    """The ranks' samples in single-process (group-major) order, and their chunks in global rows."""
    total = num_prompts * group_size
    first = ranks[0]["batch"]
    latents = first["latents"].new_empty((total, *first["latents"].shape[1:]))
    log_probs = first["log_probs"].new_empty((total, *first["log_probs"].shape[1:]))
    advantages, valid = torch.empty(total), torch.empty(total, dtype=torch.bool)
    cond = {k: v.new_empty((total, *v.shape[1:])) for k, v in first["cond"].items()}
    chunks = []
    for rank, data in enumerate(ranks):
        batch = data["batch"]
        rows = DataParallel(rank=rank, size=len(ranks), placement=placement).local_rows(num_prompts, group_size)
        latents[rows], log_probs[rows] = batch["latents"], batch["log_probs"]
        advantages[rows], valid[rows] = batch["advantages"], batch["valid"]
        for k in cond:
            cond[k][rows] = batch["cond"][k]
        chunks += [rows[c] for c in batch["chunks"]]
    return Rollout(latents, log_probs, chunks), advantages, valid, cond


@pytest.mark.parametrize("placement,fsdp,world,shard_size,lora", [
    ("rank", False, WORLD, None, None), ("spread", True, WORLD, None, None),
    ("spread", True, WORLD, None, "float32"),  # LoRA weights trained, the frozen base sharded with them
    # HSDP (2 replicas x 2 shards) of a LoRA model on a bf16 base: the one 4-process case
    ("rank", True, 4, 2, "bfloat16"),
], ids=["dp", "fsdp", "fsdp-lora", "hsdp-lora-bf16-base"])
def test_data_parallel_step_equals_single_process_step(tiny_config, tmp_path, request, placement, fsdp, world,
                                                       shard_size, lora):
    cfg = _config(tiny_config, placement, fsdp, shard_size, request.getfixturevalue("tiny_flux") if lora else None,
                  lora or "float32")
    single = copy.deepcopy(cfg)
    del single["parallel"]
    # Everyone starts from a single-process checkpoint after one iteration, so the step below also
    # shows a 1 -> 2 process resume (weights, Adam moments, LR, EMA), into FSDP shards or replicas.
    first = Trainer({**single, "run": {**single["run"], "output_dir": str(tmp_path / "first")}})
    first.step()
    start = str(first.save())

    mp.spawn(_worker, args=(free_port(), cfg, str(tmp_path), start, world), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]

    reference = Trainer(single)
    assert reference.resume(start) and reference.iteration == 1
    it = 1
    g = reference.cfg.grpo
    rollout, advantages, valid, cond = _global_batch(ranks, placement, g.prompts_per_iteration, g.group_size)

    # The ranks together rolled out the single-process prompts, each group from its shared noise.
    prompts = prompts_for_iteration(reference.train_prompts, it, g.prompts_per_iteration, reference.cfg.run.seed)
    expected_cond = repeat_cond(reference.adapter.encode_prompts(prompts), g.group_size)
    for key, value in expected_cond.items():
        torch.testing.assert_close(cond[key], value, rtol=0, atol=0)
    noise = grpo.shared_group_noise(len(prompts), g.group_size, reference.adapter.latent_shape(),
                                    generator=reference.ctx.generator("rollout", it))
    torch.testing.assert_close(rollout.latents[:, 0], noise, rtol=0, atol=0)
    first_step = rollout.latents[:, 1].reshape(len(prompts), g.group_size, -1)
    assert (first_step[:, 1:] != first_step[:, :1]).any(-1).all()  # SDE noise differs within every group
    if placement == "spread":  # a group's halves on the two ranks: distinct SDE noise per rank
        half = g.group_size // world
        assert not torch.equal(first_step[:, :half], first_step[:, half:])

    # Advantages: the single-process computation on the union of the final samples.
    scores = reference.rewards.score(reference.adapter.decode(rollout.final), [p for p in prompts
                                                                              for _ in range(g.group_size)])
    expected = grpo.aggregate_advantages(scores.values, reference.rewards.weights, g.group_size, valid=scores.valid)
    torch.testing.assert_close(advantages, expected, rtol=1e-5, atol=1e-6)
    assert valid.all()
    for data in ranks:
        assert (data["metrics"]["kl"] > 0) == fsdp  # the KL term is on (FSDP case) and does something
    for data in ranks:  # metrics are global: every rank reports the mean over all samples
        torch.testing.assert_close(data["metrics"]["reward/rewards_for_tests:mean_brightness_mean"],
                                   scores.values["rewards_for_tests:mean_brightness"].mean().item(),
                                   rtol=1e-5, atol=1e-6)

    before = {k: v.clone() for k, v in reference.policy.state_dict().items()}
    reference._update(rollout, expected, valid, cond, reference.ctx.generator("plan", it))
    after = reference.policy.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in after)
    for rank, data in enumerate(ranks):
        assert data["weights"].keys() == after.keys()
        for name, value in after.items():
            torch.testing.assert_close(data["weights"][name], value, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
            if data["ema"] is not None:
                torch.testing.assert_close(data["ema"][name], reference.ema[name], rtol=1e-5, atol=1e-5)
    if fsdp:
        _check_final_model(single, ranks[0]["ema"])  # (which equals the single-process EMA, checked above)
        _check_resume_on_one_process(single, ranks[0])


def _check_final_model(config: dict, ema: dict) -> None:
    """`final_model/` (written by rank 0 from the shards) loads as the ranks' EMA weights, bit for bit."""
    final = Path(config["run"]["output_dir"]) / "final_model"
    model = config["model"]
    options = dict(model.get("options", {}))
    if "lora" in options:  # peft's adapter folder, loaded as a LoRA start point
        options["lora"] = {**options["lora"], "init_from": str(final / "transformer_lora")}
        loaded = load_model(model["name"], model["path"], options).trainable.state_dict()
    else:
        loaded = load_model(model["name"], str(final), options).trainable.state_dict()
    assert loaded.keys() == ema.keys()
    for name, value in ema.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def _check_resume_on_one_process(config: dict, saved: dict) -> None:
    run_dir = Path(config["run"]["output_dir"])
    assert latest_checkpoint(run_dir) == Path(saved["checkpoint"])
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    trainer = Trainer(config)
    assert trainer.resume() and trainer.iteration == 2
    weights = trainer.policy.state_dict()
    for name, value in saved["weights"].items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0)
        torch.testing.assert_close(trainer.ema[name], saved["ema"][name], rtol=0, atol=0)
    names = {p: n for n, p in trainer.policy.named_parameters()}
    state = trainer.optimizer.state_dict()["state"]
    for index, param in enumerate(trainer.params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state[index][key], saved["optimizer"]["state"][names[param]][key],
                                       rtol=0, atol=0)
    assert trainer.scheduler.get_last_lr() == saved["lr"]
    trainer.step()  # and training goes on from there on one process


def test_prompts_per_iteration_must_split_over_ranks():
    with pytest.raises(ValueError, match=r"grpo.prompts_per_iteration = 3 is not divisible by the 2"):
        DataParallel(rank=0, size=2, placement="rank").check_sizes(3, 4)
    with pytest.raises(ValueError, match=r"grpo.group_size = 6 is not divisible by the 4"):
        DataParallel(rank=0, size=4, placement="spread").check_sizes(4, 6)


def test_local_rows_partition_the_batch():
    for placement in ("rank", "spread"):
        rows = torch.cat([DataParallel(rank=r, size=2, placement=placement).local_rows(4, 6) for r in range(2)])
        assert sorted(rows.tolist()) == list(range(24))
    spread = DataParallel(rank=1, size=2, placement="spread").local_rows(2, 4)
    assert spread.tolist() == [2, 3, 6, 7]


# ---------------------------------------------------------------- best-of-N with groups spread over ranks

def _best_of_n_worker(rank: int, port: int, config: dict, out_dir: str, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dancegrpo import collect as collect_module
    try:
        trainer = Trainer(config)
        seen = {}
        select = collect_module.best_of_n

        def recording_best_of_n(ctx, batch):
            seen["before"] = dict(latents=batch.rollout.latents.clone(), advantages=batch.advantages.clone(),
                                  values={k: v.clone() for k, v in batch.scores.values.items()})
            kept = select(ctx, batch)
            seen["after"] = dict(latents=kept.rollout.latents.clone(), log_probs=kept.rollout.log_probs.clone(),
                                 advantages=kept.advantages.clone(), group_ids=kept.group_ids.clone(),
                                 cond={k: v.clone() for k, v in kept.cond.items()}, group_size=kept.group_size)
            return kept

        collect_module.best_of_n = recording_best_of_n
        metrics = trainer.step()  # and the update runs on the kept shares (FSDP: equal collectives per rank)
        torch.save({**seen, "metrics": metrics}, os.path.join(out_dir, f"bon{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_best_of_n_with_spread_groups_keeps_what_one_process_keeps(tiny_config, tmp_path):
    """Groups of 4 spread over 2 ranks (2 samples each), keep 1 best + 1 worst per group: the ranks'
    kept samples together are the single-process selection on the union of their samples, each rank
    holding one per group, with the advantages and old log-probs one process computes."""
    cfg = _config(tiny_config, "spread", fsdp=True)
    cfg["grpo"]["best_of_n_keep"] = 1
    cfg["trainer"]["micro_batch_size"] = 2
    mp.spawn(_best_of_n_worker, args=(free_port(), cfg, str(tmp_path), WORLD), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"bon{r}.pt", weights_only=False) for r in range(WORLD)]

    single = copy.deepcopy(cfg)
    del single["parallel"]
    reference = Trainer(single)
    g = reference.cfg.grpo
    num_prompts, share = g.prompts_per_iteration, 2 * g.best_of_n_keep // WORLD
    latents = torch.empty((num_prompts * g.group_size, *ranks[0]["before"]["latents"].shape[1:]))
    advantages = torch.empty(num_prompts * g.group_size)
    values = {k: torch.empty(num_prompts * g.group_size) for k in ranks[0]["before"]["values"]}
    for r, data in enumerate(ranks):
        rows = DataParallel(rank=r, size=WORLD, placement="spread").local_rows(num_prompts, g.group_size)
        latents[rows], advantages[rows] = data["before"]["latents"], data["before"]["advantages"]
        for k in values:
            values[k][rows] = data["before"]["values"][k]
    keep = grpo.best_of_n_indices(advantages, g.group_size, g.best_of_n_keep)
    expected_adv = grpo.aggregate_advantages({k: v[keep] for k, v in values.items()}, reference.rewards.weights,
                                             2 * g.best_of_n_keep)

    def union(key):  # the ranks' kept rows in single-process (group-major) order
        parts = [data["after"][key].reshape(num_prompts, share, *data["after"][key].shape[1:]) for data in ranks]
        return torch.cat(parts, dim=1).reshape(-1, *parts[0].shape[2:])

    torch.testing.assert_close(union("latents"), latents[keep], rtol=0, atol=0)
    torch.testing.assert_close(union("advantages"), expected_adv, rtol=1e-6, atol=1e-6)
    assert (union("advantages") != 0).any()
    for data in ranks:
        assert data["after"]["group_size"] == 2 * g.best_of_n_keep
        assert data["after"]["group_ids"].tolist() == torch.arange(num_prompts).repeat_interleave(share).tolist()
    # Old log-probs recomputed on each rank equal one process's on the same kept trajectories.
    prompts = prompts_for_iteration(reference.train_prompts, 0, num_prompts, reference.cfg.run.seed)
    cond = repeat_cond(reference.adapter.encode_prompts(prompts), 2 * g.best_of_n_keep)
    for key, value in cond.items():
        kept_cond = [d["after"]["cond"][key].reshape(num_prompts, share, *value.shape[1:]) for d in ranks]
        torch.testing.assert_close(torch.cat(kept_cond, 1).reshape(value.shape), value, rtol=0, atol=0)
    from dancegrpo.collect import _recompute_log_probs
    expected_logp = _recompute_log_probs(reference.ctx, latents[keep], cond).log_probs
    torch.testing.assert_close(union("log_probs"), expected_logp, rtol=1e-5, atol=1e-5, equal_nan=True)
    for data in ranks:
        assert data["metrics"]["updates"] >= 1 and torch.isfinite(torch.tensor(data["metrics"]["loss"]))
