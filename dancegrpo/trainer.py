"""The DanceGRPO trainer: one loop for every generator and every reward.

An iteration: draw prompts, roll out `group_size` samples per prompt from shared initial
noise (batched, chunk by chunk), decode and score them in memory, turn rewards into
per-group advantages, then make `updates_per_iteration` optimizer steps over the
(chunk, step) pairs of a random subset of ceil(tau*T) steps per chunk.

Every random draw of an iteration comes from generators seeded by (seed, iteration), so
a resumed run repeats exactly what an uninterrupted one would have done.

Under torchrun (WORLD_SIZE > 1) the same loop runs on every rank: each data-parallel rank rolls
out its share of the iteration's prompts (see dancegrpo.distributed.data_parallel), gradients
are summed over ranks (FSDP2 or one flat all-reduce), and only rank 0 writes logs and files.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import grpo, ops
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, config_to_dict, load_config, save_config, trainable_pairs
from .devices import require_device
from .distributed.data_parallel import DataParallel, agree_any, all_reduce_sum, broadcast_parameters, sum_gradients
from .eval.report import save_eval_images, write_report
from .data import load_prompts, prompts_for_iteration
from .metrics import MetricsLogger
from .models import load_model, repeat_cond
from .models.base import FrozenReference, index_cond
from .models.train_mode import check_mode_independent
from .profiling import nvtx_range
from .rewards import (RewardEntry, RewardFn, RewardScores, RewardSet, as_reward_output, build_reward,
                      concat_outputs, metadata_metrics)
from .rewards.async_scorer import AsyncScorer
from .rollout import Rollout, chunk_indices, ode_sample, run_rollout, step_log_prob
from .run_folder import RunFolderError, prepare_run_folder
from .sampler import build_sampler

log = logging.getLogger(__name__)


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from the run seed and labels; independent streams per purpose."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_global_rngs(seed: int) -> None:
    """Seed every global RNG a run does not own: torch (CPU and every CUDA device), Python's
    `random` and NumPy's legacy global state. They are what peft's LoRA initialisation, dropout
    and user rewards (`torch.rand`, `random.random`, `np.random`) draw from."""
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


@dataclass
class UpdatePlan:
    """The micro-batches of one iteration, grouped into optimizer updates."""

    updates: list[list[tuple[torch.Tensor, int]]]  # per update: (sample rows, step) micro-batches


def plan_updates(chunks: list[torch.Tensor], trainable_steps: list[int], tau: float, num_updates: int,
                 generator: torch.Generator, tau_rounding: str = "ceil") -> UpdatePlan:
    """Pick ceil(tau*K) (tau_rounding "floor": int(K*tau)) of the K trainable steps per chunk,
    shuffle the (chunk, step) pairs, split into updates.

    Steps are chosen per chunk (not per sample) because a micro-batch must be a rollout
    chunk at one step for its log-prob to be recomputed bit-identically.

    Both draws run on the generator's device (a CUDA generator draws on the GPU); the plan is
    then read to the host in one transfer, since planning is host-side list work.
    """
    if not trainable_steps:
        raise ValueError("no stochastic sampler steps to train on: set sampler.eta > 0")
    picks = grpo.subsample_timesteps(len(chunks), len(trainable_steps), tau, generator=generator, rounding=tau_rounding)
    order = torch.randperm(picks.numel(), generator=generator, device=picks.device)
    plan = torch.cat([picks.reshape(-1), order]).tolist()
    k = picks.shape[1]
    pairs = [(chunks[c], trainable_steps[plan[c * k + j]]) for c in range(len(chunks)) for j in range(k)]
    pairs = [pairs[i] for i in plan[picks.numel():]]
    num_updates = min(num_updates, len(pairs))
    bounds = [round(u * len(pairs) / num_updates) for u in range(num_updates + 1)]
    return UpdatePlan([pairs[bounds[u]: bounds[u + 1]] for u in range(num_updates)])


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / warmup) if warmup > 0 else 1.0
        progress = min(1.0, max(0.0, (it - warmup) / max(1, total - warmup)))
        if schedule == "linear":
            return warm * (1.0 - progress)
        if schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm
    return factor


class OverlappedScoring:
    """Decode and score each rollout chunk on a worker thread while later chunks sample.

    `submit` is run_rollout's `on_chunk_done`; `gather` waits for every chunk and returns
    what `rewards.score` on the whole batch would. Each reward's raw chunk outputs (or its
    exception) are kept and replayed through `rewards.score` over the full batch, so
    validity, fault counts, thresholds and logs are exactly those of the synchronous path:
    a reward that raises on any chunk fails the whole batch, as it would have at once.
    This assumes, like any batched scorer, that a sample's score does not depend on the
    other samples in its batch.
    """

    def __init__(self, adapter, rewards: RewardSet, prompts: list[str], device: torch.device, max_pending: int = 2):
        self.adapter, self.rewards, self.prompts, self.device = adapter, rewards, prompts, device
        self._scorer = AsyncScorer(self._decode_and_score, max_pending)
        self._futures = []
        self._next_row = 0

    def submit(self, rows: torch.Tensor, final_latents: torch.Tensor) -> None:
        # Chunks are consecutive ranges, in order: their prompts follow without reading `rows`
        # (which would wait for the device).
        start, self._next_row = self._next_row, self._next_row + len(rows)
        self._futures.append(self._scorer.submit(final_latents, self.prompts[start:self._next_row]))

    @torch.no_grad()  # grad mode is per thread: the worker's must be off as in the synchronous path
    def _decode_and_score(self, latents: torch.Tensor, prompts: list[str]) -> dict:
        images = self.adapter.decode(latents)
        raw = {}
        for entry in self.rewards.entries:
            try:
                raw[entry.name] = as_reward_output(entry.fn(images, prompts), len(prompts), images.device)
            except Exception as err:  # replayed by gather(), where RewardSet logs and counts it
                raw[entry.name] = err
        return raw

    def gather(self) -> RewardScores:
        try:
            chunks = [future.result() for future in self._futures]
        finally:
            self._scorer.close()

        def replay(name: str) -> RewardFn:
            def scores(images, prompts):
                parts = [chunk[name] for chunk in chunks]
                failed = [part for part in parts if isinstance(part, Exception)]
                if failed:
                    raise failed[0]
                return concat_outputs(parts)
            return scores

        replayed = RewardSet([RewardEntry(e.name, replay(e.name), e.weight, e.threshold) for e in self.rewards.entries])
        # The replayed rewards ignore their images: RewardSet.score reads only the batch size and device.
        return replayed.score(torch.empty((len(self.prompts), 0), device=self.device), self.prompts)


class _SilentLogger:
    """The metrics logger of ranks other than 0: they compute metrics but write nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def truncate_after(self, step: int) -> int:
        return 0

    def close(self) -> None:
        pass


CRASH_ENV = "DANCEGRPO_TEST_CRASH"


def _crash_for_test(iteration: int) -> None:
    """Test hook for restart-after-failure: with DANCEGRPO_TEST_CRASH="RANK:ITERATION", that
    rank exits abruptly before running that iteration, on the first attempt of a torchrun job only."""
    spec = os.environ.get(CRASH_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    rank, at = (int(x) for x in spec.split(":"))
    if iteration == at and int(os.environ.get("RANK", "0")) == rank:
        os._exit(17)


def _eval_noise_keys(prompts: list[str]) -> list[tuple]:
    """One noise key per evaluation sample: the prompt, plus its repeat index when a prompt
    list repeats a prompt (a kind-balanced set), so repeats are new samples, not copies."""
    seen: dict[str, int] = {}
    keys = []
    for prompt in prompts:
        repeat = seen.get(prompt, 0)
        seen[prompt] = repeat + 1
        keys.append((prompt,) if repeat == 0 else (prompt, repeat))
    return keys


def _check_api_rewards(cfg: Config, rewards: dict[str, RewardFn] | None) -> None:
    """Refuse a run with no reward at all, and reward arguments that are not name -> callable."""
    problems = []
    if rewards is not None and not isinstance(rewards, dict):
        raise TypeError(f"rewards must be a dict of name -> callable(images, prompts), got {type(rewards).__name__}")
    for name, fn in (rewards or {}).items():
        if not isinstance(name, str) or not name.strip():
            problems.append(f"rewards argument: the name {name!r} must be a non-empty string (it names the metric)")
        elif not callable(fn):
            problems.append(f"rewards argument {name!r}: {type(fn).__name__} is not callable; give a function "
                            "(images, prompts) -> (N,) scores")
    if not cfg.rewards and not rewards:
        problems.append("no reward: the config's rewards list is empty and no rewards were passed to Trainer; list "
                        "one in the config (rewards: [{name: <reward name>}]) or pass rewards={name: fn}")
    if problems:
        raise ConfigError(problems)


def _first_eval_prompts(cfg: Config) -> list[str]:
    """The held-out prompts, cut to data.eval_num_prompts; asking for more than there are is refused."""
    prompts = load_prompts(cfg.data.eval_prompts)
    wanted = cfg.data.eval_num_prompts
    if wanted is not None and wanted > len(prompts):
        raise ConfigError([f"data.eval_num_prompts = {wanted} is more than the {len(prompts)} prompts of "
                           f"data.eval_prompts = {cfg.data.eval_prompts!r}: lower it, or null for all of them"])
    return prompts[:wanted]


class Trainer:
    """Build from a Config (or YAML path / dict), optionally with your own reward callables.

        trainer = Trainer("configs/quickstart.yaml", rewards={"mine": my_reward})
        trainer.train()
        trainer.metrics  # list of per-iteration dicts

    `rewards` (name -> callable(images, prompts) -> (N,) scores) replace configured rewards of the
    same name and add the others with weight 1; with them the config may list no reward at all
    (`overrides=["rewards=[]"]`). A run with no reward is refused.

    Reproducibility: the global RNGs (torch, CUDA, Python `random`, NumPy) are seeded from
    `run.seed` (and the rank) here, before the model is loaded (peft's LoRA initialisation draws
    from them), and again from (run.seed, iteration, rank) at the start of every iteration and
    from (run.seed, rank) at every evaluation, so rewards or layers that draw from them repeat
    exactly, also after a resume. This resets the caller's global RNG state.
    """

    def __init__(self, config: Config | str | dict, rewards: dict[str, RewardFn] | None = None,
                 adapter=None, overrides=()):
        self.cfg = cfg = load_config(config, overrides)
        _check_api_rewards(cfg, rewards)
        require_device(cfg.run.device)
        self.device = torch.device(cfg.run.device)
        self.run_dir = Path(cfg.run.output_dir)
        self.dp, self.mesh = self._setup_parallel()
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        seed_global_rngs(self._global_seed())  # before the model: LoRA weights are drawn at load
        # Prompts and rewards before the model: a bad file or reward name is reported before the long load.
        self.train_prompts = load_prompts(cfg.data.train_prompts)
        self.eval_prompts = _first_eval_prompts(cfg) if cfg.data.eval_prompts else []
        self.rewards = self._build_rewards(rewards or {})
        self._threads = None  # a ThreadGovernor with run.num_threads: auto on the CPU
        if cfg.run.num_threads == "auto":
            if self.device.type == "cpu":
                from .cpu_threads import ThreadGovernor
                self._threads = ThreadGovernor()
        elif cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        self.adapter = adapter if adapter is not None else load_model(cfg.model.name, cfg.model.path, cfg.model.options)
        self.adapter.to(self.device)
        self.policy = self.adapter.trainable
        self.policy.requires_grad_(True).train()
        # Rollouts run in eval mode, updates in train mode: refuse modules (dropout...) for which they differ.
        check_mode_independent(self.policy, self.adapter if isinstance(self.adapter, torch.nn.Module) else None)
        if self.dp.enabled:
            broadcast_parameters(self.policy)  # every rank starts from rank 0's weights
        self.sampler = build_sampler(self.adapter.prediction, cfg.sampler.num_steps, cfg.sampler.eta,
                                     cfg.sampler.shift, cfg.sampler.sde_form, device=self.device,
                                     sde_window=cfg.sampler.sde_window, cuda_graph=cfg.sampler.cuda_graph,
                                     model_time_resolution=cfg.sampler.model_time_resolution)
        self.eval_sampler = build_sampler(self.adapter.prediction, cfg.sampler.eval_num_steps or cfg.sampler.num_steps,
                                          0.0, cfg.sampler.shift, cfg.sampler.sde_form, device=self.device,
                                          model_time_resolution=cfg.sampler.model_time_resolution)
        sta = getattr(self.adapter, "sta", None)
        if sta is not None:  # sliding-tile attention picks its window by sampling step
            sta.set_schedule(self.sampler.model_time(torch.arange(self.sampler.num_steps, device=self.device)))
        t = cfg.trainer
        # The frozen KL reference is copied before any wrapper or sharding: a plain module.
        self.reference = self._frozen_reference() if cfg.grpo.kl_coef > 0 else None
        self.sharded = self._wrap_policy()
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps,
                                           weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.lr_schedule, t.warmup_iterations, t.iterations))
        self.ema = ({n: p.detach().float().clone() for n, p in self.policy.named_parameters()}
                    if t.ema_decay else None)
        self.iteration = 0  # iterations completed
        self.metrics: list[dict] = []
        self.base_eval: dict | None = None
        self.final_eval: dict | None = None
        self.summary: str | None = None
        self._stop_requested = False

    # ------------------------------------------------------------------ setup
    def _global_seed(self, *keys) -> int:
        """The seed of the global RNGs for `keys` on this process (ranks draw different numbers)."""
        return derive_seed(self.cfg.run.seed, "global_rngs", *keys, dist.get_rank() if dist.is_initialized() else 0)

    def _build_rewards(self, user: dict[str, RewardFn]) -> RewardSet:
        entries = []
        for rc in self.cfg.rewards:
            fn = user[rc.name] if rc.name in user else build_reward(rc.name, rc.options)
            entries.append(RewardEntry(rc.name, fn, rc.weight, rc.threshold))
        configured = {rc.name for rc in self.cfg.rewards}
        entries += [RewardEntry(name, fn) for name, fn in user.items() if name not in configured]
        return RewardSet(entries)

    def _setup_parallel(self):
        """(DataParallel, DeviceMesh or None): join torchrun's process group when WORLD_SIZE > 1."""
        par = self.cfg.parallel
        from .distributed.compat import check_option_pairs
        from .distributed.launch import init_process_group, launched_world_size
        if launched_world_size() == 1:
            for name, on in (("parallel.sp_size", par.sp_size != 1), ("parallel.fsdp.enabled", par.fsdp.enabled)):
                if on:
                    raise ValueError(f"{name} needs several processes: launch with torchrun "
                                     f"(e.g. `torchrun --nproc_per_node 8 -m dancegrpo.cli train ...`), "
                                     "or turn it off for a single process")
            check_option_pairs(self.cfg)
            return DataParallel(placement=par.group_placement), None
        check_option_pairs(self.cfg)  # before any weights are read
        from .distributed.mesh import build_mesh
        init_process_group("gloo" if self.device.type == "cpu" else None)  # NCCL only for GPU tensors
        if self.device.type == "cuda":  # each process its own GPU: LOCAL_RANK's (set when joining)
            self.device = torch.device("cuda", torch.cuda.current_device())
        mesh = build_mesh(par.sp_size, self.device.type)
        dp_mesh = mesh["dp"]
        dp = DataParallel(rank=dp_mesh.get_local_rank(), size=dp_mesh.size(), placement=par.group_placement,
                          group=dp_mesh.get_group(), world=dist.get_world_size())
        g = self.cfg.grpo
        dp.check_sizes(g.prompts_per_iteration, g.group_size)
        pairs, updates = trainable_pairs(self.cfg, dp.size), self.cfg.trainer.updates_per_iteration
        if pairs is not None and updates > pairs:
            raise ConfigError([f"trainer.updates_per_iteration = {updates} is more than the {pairs} (micro-batch, "
                               f"step) pairs each of the {dp.size} data-parallel ranks trains on per iteration; "
                               f"lower it to at most {pairs}, or use fewer ranks"])
        if dp.placement == "spread" and dp.size > 1 and g.best_of_n_keep:
            raise ValueError("grpo.best_of_n_keep needs whole groups on a rank: use parallel.group_placement "
                             "'rank' with it (or best_of_n_keep null)")
        return dp, mesh

    def _install_sequence_parallel(self, denoiser, group):
        """Ulysses on the denoiser; sliding-tile attention, if the adapter has it, keeps running inside
        (per-head windows cut to this rank's heads; its controller keeps the trainer's step schedule)."""
        from .distributed import install_ulysses
        sta = getattr(self.adapter, "sta", None)
        if sta is None:
            return install_ulysses(denoiser, group)
        from .distributed.ulysses import group_rank, group_size
        from .distributed.ulysses_sta import _HeadShardController, _sta_attend
        shard = _HeadShardController(sta, denoiser.config.num_attention_heads, group_size(group), group_rank(group))
        return install_ulysses(denoiser, group, attend_for_layer=lambda layer: _sta_attend(shard, layer))

    def _wrap_policy(self) -> bool:
        """Sequence parallelism, then activation checkpointing and compile, then FSDP2. True if sharded.

        The wrappers go on the denoiser the adapter runs (`adapter.denoiser`, else the trainable
        module), unwrapped from peft: for a full fine-tune that is the trainable module itself;
        under LoRA it is the base model with its LoRA layers inside the blocks, while the trainer
        keeps training, checkpointing and averaging `adapter.trainable` (the LoRA weights alone).
        """
        from .distributed.blocks import unwrap_denoiser
        par = self.cfg.parallel
        denoiser = getattr(self.adapter, "denoiser", None)
        denoiser = unwrap_denoiser(self.policy if denoiser is None else denoiser)
        self._sharded_module = None
        if par.sp_size > 1:
            self._ulysses = self._install_sequence_parallel(denoiser, self.mesh["sp"].get_group())
        if par.activation_checkpointing != "none" or par.compile_blocks:
            from .distributed.fsdp import apply_block_wrappers
            apply_block_wrappers(denoiser, par.activation_checkpointing, par.checkpoint_every_n_blocks,
                                 par.compile_blocks)
        if not par.fsdp.enabled:
            return False
        from .distributed.fsdp import fsdp_mesh, shard_model, trainable_after_sharding
        # Over every process (or HSDP groups of them): sequence-parallel ranks hold partial
        # gradients of the same replica, so FSDP reduces over all of them.
        mesh = fsdp_mesh(self.device.type, dist.get_world_size(), par.fsdp.shard_size)
        self._sharded_module = shard_model(denoiser, mesh, par.fsdp.param_dtype, par.fsdp.reduce_dtype,
                                           par.fsdp.cpu_offload)
        trainable_after_sharding(self.policy)
        return True

    def _generator(self, *keys) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(derive_seed(self.cfg.run.seed, *keys))

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.run.autocast_dtype)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict:
        """Run one iteration (rollout, reward, updates) and return its metrics."""
        cfg, it = self.cfg, self.iteration
        g = cfg.grpo
        seed_global_rngs(self._global_seed("iteration", it))  # whatever draws from them repeats on resume
        timings = {}
        if self._threads is not None:  # follow the cores other processes left free since the last iteration
            timings["cpu/threads"] = self._threads.update()
        start = time.perf_counter()
        dp = self.dp
        prompts = prompts_for_iteration(self.train_prompts, it, g.prompts_per_iteration, cfg.run.seed)
        local_prompts, local_group = dp.local_prompts(prompts), dp.local_group_size(g.group_size)
        sample_prompts = [p for p in local_prompts for _ in range(local_group)]
        cond = repeat_cond(self.adapter.encode_prompts(local_prompts), local_group)
        rollout_gen = self._generator("rollout", it)
        shape = self.adapter.latent_shape()
        # Initial noise is drawn for the iteration's whole batch on every rank (cheap) and each
        # rank keeps its rows: a group's shared noise does not depend on the number of ranks.
        init = grpo.initial_noise(len(prompts), g.group_size, shape, g.shared_group_noise,
                                  generator=rollout_gen, device=self.device)
        if dp.size > 1:
            init = init[dp.local_rows(len(prompts), g.group_size, self.device)]
            rollout_gen = self._generator("rollout", it, "dp_rank", dp.rank)  # distinct SDE noise per rank
        overlap = (OverlappedScoring(self.adapter, self.rewards, sample_prompts, self.device)
                   if cfg.trainer.overlap_rewards else None)
        self.policy.eval()
        with self._autocast():
            rollout = run_rollout(self.adapter, self.sampler, cond, init, cfg.trainer.micro_batch_size,
                                  generator=rollout_gen, reduce=g.logprob_reduce,
                                  on_chunk_done=overlap.submit if overlap else None)
        timings["time/rollout"] = time.perf_counter() - start

        start = time.perf_counter()
        with nvtx_range("reward"), torch.no_grad():
            if overlap is not None:  # chunks were decoded and scored while later ones sampled
                scores = overlap.gather()
            else:
                images = self.adapter.decode(rollout.final)
                scores = self.rewards.score(images, sample_prompts)
        advantages = self._advantages(scores, len(prompts))
        timings["time/reward"] = time.perf_counter() - start

        if g.best_of_n_keep:
            rollout, advantages, scores, cond = self._best_of_n(rollout, advantages, scores, cond)

        start = time.perf_counter()
        self.policy.train()
        update_stats = self._update(rollout, advantages, scores.valid, cond, self._generator("plan", it))
        timings["time/update"] = time.perf_counter() - start
        lr = self.scheduler.get_last_lr()[0]  # the rate this iteration's updates used (logged below)
        with warnings.catch_warnings():
            # The schedule is per iteration, also for one whose updates were all dropped;
            # torch's "scheduler before optimizer" warning does not apply.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.iteration += 1

        metrics = {"iteration": self.iteration}
        group = self._group_size_after_selection()  # every rank's rows, in global group order
        faults = self._sum_over_ranks({name: scores.faults[name] for name in scores.values})
        for name, value in scores.values.items():
            value = dp.gather_rows(value, group)
            finite = value[torch.isfinite(value)]
            metrics[f"reward/{name}_mean"] = finite.mean().item() if len(finite) else float("nan")
            metrics[f"reward/{name}_std"] = finite.std().item() if len(finite) > 1 else 0.0
            metrics[f"reward/{name}_faults"] = faults[name]
        metrics["reward/zero_advantage_groups"] = int((dp.gather_rows(advantages, group).view(-1, group)
                                                       .abs().sum(1) == 0).sum())
        metrics.update(update_stats)
        metrics["lr"] = lr
        metrics.update(timings)
        return metrics

    def _advantages(self, scores: RewardScores, num_prompts: int) -> torch.Tensor:
        """Per-group advantages of this rank's samples. With a group spread over ranks, its
        rewards are all-gathered first, so every group is normalised as in one process."""
        g, dp = self.cfg.grpo, self.dp
        if dp.placement != "spread" or dp.size == 1:
            return grpo.aggregate_advantages(scores.values, self.rewards.weights, g.group_size, valid=scores.valid)
        values = {name: dp.gather_rows(value, g.group_size) for name, value in scores.values.items()}
        valid = dp.gather_rows(scores.valid.to(torch.uint8), g.group_size).bool()
        advantages = grpo.aggregate_advantages(values, self.rewards.weights, g.group_size, valid=valid)
        return advantages[dp.local_rows(num_prompts, g.group_size, advantages.device)]

    def _sum_over_ranks(self, counts: dict[str, int]) -> dict[str, int]:
        if self.dp.size == 1 or not counts:
            return counts
        total = all_reduce_sum(torch.tensor(list(counts.values()), dtype=torch.float64, device=self.device),
                               self.dp.group)
        return dict(zip(counts, (int(v) for v in total.tolist())))

    def _group_size_after_selection(self) -> int:
        k = self.cfg.grpo.best_of_n_keep
        return 2 * k if k else self.cfg.grpo.group_size  # best-of-n is refused with spread groups

    def _best_of_n(self, rollout: Rollout, advantages, scores, cond):
        """Keep the top-k and bottom-k samples of each group (by total advantage).

        The kept samples form new chunks, so their old log-probs are recomputed in exactly
        the micro-batches training will use.
        """
        g = self.cfg.grpo
        keep = grpo.best_of_n_indices(advantages, g.group_size, g.best_of_n_keep)
        scores.values = {k: v[keep] for k, v in scores.values.items()}
        scores.valid = scores.valid[keep]
        # Advantages are recomputed within the kept groups, as for a group sampled that way.
        advantages = grpo.aggregate_advantages(scores.values, self.rewards.weights, 2 * g.best_of_n_keep,
                                               valid=scores.valid)
        cond = index_cond(cond, keep)
        latents = rollout.latents[keep]
        chunks = chunk_indices(len(keep), self.cfg.trainer.micro_batch_size, self.device)
        log_probs = torch.full((len(keep), self.sampler.num_steps), float("nan"), device=self.device)
        self.policy.eval()
        with torch.no_grad(), self._autocast():
            for rows in chunks:
                for step in self.sampler.stochastic_steps:
                    log_probs[rows, step], _, _ = step_log_prob(self.adapter, self.sampler, latents, rows, step,
                                                                index_cond(cond, rows), self.cfg.grpo.logprob_reduce)
        return Rollout(latents, log_probs, chunks), advantages, scores, cond

    def _update(self, rollout: Rollout, advantages, valid, cond, plan_gen) -> dict:
        """Optimizer updates over the planned micro-batches.

        Statistics accumulate on the device and are read once at the end: no host sync per
        micro-step (only one per update, for the non-finite gradient check). The valid mask and
        the chunks' rows are read to the host once; micro-batch counts are host arithmetic.
        """
        cfg, g = self.cfg, self.cfg.grpo
        trainable = [s for s in self.sampler.stochastic_steps  # the release never trains the final step
                     if not (g.exclude_last_step and s == self.sampler.num_steps - 1)]
        plan = plan_updates(rollout.chunks, trainable, g.tau, cfg.trainer.updates_per_iteration,
                            plan_gen, tau_rounding=g.tau_rounding)
        valid_host = valid.tolist()  # counts below come from here, not from device tensors
        chunk_rows = torch.cat(rollout.chunks).tolist()
        rows_host, start = {}, 0
        for rows in rollout.chunks:  # the plan's micro-batches hold these very tensors
            rows_host[id(rows)], start = chunk_rows[start:start + len(rows)], start + len(rows)
        zero = torch.zeros((), device=self.device)
        stats = dict(ratio_sum=zero.clone(), clipped=zero.clone(), kl=zero.clone(), loss=zero.clone(),
                     ratio_min=torch.full((), math.inf, device=self.device),
                     ratio_max=torch.full((), -math.inf, device=self.device), first_dev=zero.clone())
        count, grad_norms, skipped = 0, [], 0
        # Each update's loss is normalised by its valid samples over all data-parallel ranks
        # (one small all-reduce per iteration), so summed gradients are the single-process ones.
        denoms = self._sum_over_ranks({str(u): sum(valid_host[r] for rows, _ in mbs for r in rows_host[id(rows)])
                                       for u, mbs in enumerate(plan.updates)})
        # FSDP averages gradients over all processes; scaling the loss by their number turns that into a sum.
        loss_scale = self.dp.world if self.sharded else 1
        for u, micro_batches in enumerate(plan.updates):
            denom = denoms[str(u)]
            if denom == 0:
                continue
            with nvtx_range("update"):
                self.optimizer.zero_grad(set_to_none=True)
                update_loss = zero.clone()
                for m, (rows, step) in enumerate(micro_batches):
                    n = sum(valid_host[r] for r in rows_host[id(rows)])
                    if n == 0 and not self.sharded:
                        continue  # (FSDP: every rank must run every backward, even one of weight 0)
                    if self.sharded:  # reduce-scatter once per update, after its last micro-batch
                        self._sharded_module.set_requires_gradient_sync(m == len(micro_batches) - 1)
                    # The valid samples' positions, without a host sync (n is known): the same
                    # elements in the same order as a boolean mask would select.
                    keep = slice(None) if n == len(rows) else valid[rows].nonzero_static(size=n).flatten()
                    with nvtx_range("train_step"), self._autocast():
                        logp, mean, std = step_log_prob(self.adapter, self.sampler, rollout.latents, rows, step,
                                                        index_cond(cond, rows), g.logprob_reduce,
                                                        with_moments=self.reference is not None)
                        old = rollout.log_probs[rows, step]
                        if n == 0:  # only under FSDP: a backward that contributes nothing
                            (logp.sum() * 0.0).backward()
                            continue
                        out = ops.fused_clipped_loss(logp[keep], old[keep], advantages[rows][keep],
                                                     g.clip_range, g.adv_clip_max)
                        loss = out.loss
                        if self.reference is not None:
                            kl = self._kl_to_reference(rollout, rows, step, cond, mean, std)[keep].mean()
                            loss = loss + g.kl_coef * kl
                            stats["kl"] += kl.detach() * n
                    (loss * (n * loss_scale / denom)).backward()
                    if u == 0:
                        stats["first_dev"] = torch.maximum(stats["first_dev"], (logp.detach() - old).abs().max())
                    update_loss += loss.detach() * (n / denom)
                    ratio = out.ratio.detach().float()
                    stats["ratio_sum"] += ratio.sum()
                    stats["ratio_min"] = torch.minimum(stats["ratio_min"], ratio.min())
                    stats["ratio_max"] = torch.maximum(stats["ratio_max"], ratio.max())
                    stats["clipped"] += out.clip_fraction.detach() * n
                    count += n
                if self.dp.enabled and not self.sharded:
                    sum_gradients(self.params)  # DDP-style: one flat all-reduce over all processes
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.trainer.grad_clip or math.inf)
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: the same global norm on every rank
                    grad_norm = grad_norm.full_tensor()
                if not torch.isfinite(grad_norm):
                    # One bad batch must not poison the weights of a long run: drop the update, count it.
                    log.warning("iteration %d update %d: non-finite grad norm, update skipped", self.iteration, u)
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.optimizer.step()
                self._update_ema()
                grad_norms.append(grad_norm.detach())
                stats["loss"] += update_loss
        if self.dp.size > 1:
            count = self._reduce_stats(stats, count)
        # One device-to-host read for all the statistics of the iteration.
        keys = list(stats)
        read = torch.stack([stats[k] for k in keys] + ([torch.stack(grad_norms).mean()] if grad_norms else [])).tolist()
        host = dict(zip(keys, read))
        if host["first_dev"] > 0:
            log.warning("iteration %d: first-update log-prob deviation %.3g (expected exactly 0): old and new "
                        "log-probs did not come from the same computation", self.iteration, host["first_dev"])
        n_updates = max(1, len(grad_norms))
        return {
            "loss": host["loss"] / n_updates,
            "grad_norm": read[-1] if grad_norms else 0.0,
            "ratio_mean": host["ratio_sum"] / max(1, count),
            "ratio_min": host["ratio_min"] if count else float("nan"),
            "ratio_max": host["ratio_max"] if count else float("nan"),
            "clip_fraction": host["clipped"] / max(1, count),
            "kl": host["kl"] / max(1, count),
            "first_update_logp_max_dev": host["first_dev"],
            "updates": len(grad_norms),
            "skipped_updates": skipped,
        }

    def _reduce_stats(self, stats: dict[str, torch.Tensor], count: int) -> int:
        """Combine the update statistics of the data-parallel ranks in place; returns the global count."""
        group = self.dp.group
        sums = torch.stack([stats[k] for k in ("ratio_sum", "clipped", "kl", "loss")]
                           + [torch.tensor(float(count), device=self.device)])
        dist.all_reduce(sums, group=group)
        for k, v in zip(("ratio_sum", "clipped", "kl", "loss"), sums):
            stats[k] = v
        dist.all_reduce(stats["ratio_min"], op=dist.ReduceOp.MIN, group=group)
        maxima = torch.stack([stats["ratio_max"], stats["first_dev"]])
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        stats["ratio_max"], stats["first_dev"] = maxima[0], maxima[1]
        return int(sums[-1].item())

    def _frozen_reference(self):
        """The initial policy for the KL term: the adapter's own (LoRA: adapters switched off,
        no copy) when it has one, else a frozen copy of its transformer."""
        make = getattr(self.adapter, "frozen_reference", None)
        return make() if make is not None else FrozenReference(self.adapter, "transformer")

    @torch.no_grad()
    def _kl_to_reference(self, rollout: Rollout, rows, step: int, cond, mean, std) -> torch.Tensor:
        """Per-sample KL between this step's Gaussian under the policy and the frozen initial one."""
        x = rollout.latents[rows, step]
        steps = torch.full_like(rows, step)
        with self.reference.active():
            ref_out = self.adapter.predict(x, self.sampler.model_time(steps), index_cond(cond, rows))
        ref_mean, _ = self.sampler.mean_std(ref_out, x, steps)
        with torch.enable_grad():
            return grpo.kl_penalty(mean, ref_mean, std)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.cfg.trainer.ema_decay
        for name, p in self.policy.named_parameters():
            self.ema[name].lerp_(p.detach().float(), 1 - decay)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, prompts: list[str] | None = None, return_images: bool = False, by_tag: bool = False) -> dict:
        """Held-out evaluation with the deterministic ODE sampler and fixed per-prompt seeds.

        `eval/<reward>` per reward, and the rewards' metadata means (`eval/<reward>_accuracy`, ...;
        with `by_tag` also per tag, see `rewards.metadata_metrics`)."""
        prompts = self.eval_prompts if prompts is None else prompts
        if not prompts:
            return {}
        seed_global_rngs(self._global_seed("eval"))  # a reward drawing from them scores the same at every call
        noise = torch.stack([
            torch.randn(self.adapter.latent_shape(), generator=self._generator("eval", *key), device=self.device)
            for key in _eval_noise_keys(prompts)])
        was_training = self.policy.training
        self.policy.eval()
        with self._ema_weights(), self._autocast():
            latents = ode_sample(self.adapter, self.eval_sampler, self.adapter.encode_prompts(prompts), noise,
                                 self.cfg.trainer.micro_batch_size)
        self.policy.train(was_training)
        images = self.adapter.decode(latents)
        scores = self.rewards.score(images, prompts)
        result = {f"eval/{k}": v[torch.isfinite(v)].mean().item() for k, v in scores.values.items()}
        result.update({f"eval/{k}": v for k, v in metadata_metrics(scores, by_tag).items()})
        if return_images:
            result["images"] = images.cpu()
        return result

    def _reshard(self) -> None:
        """Under FSDP, return every parameter to its sharded form (after a forward the root's
        parameters stay gathered), so named_parameters() gives the sharded DTensors again."""
        if self.sharded:
            for module in self._sharded_module.modules():
                if hasattr(module, "reshard"):
                    module.reshard()

    def _ema_weights(self):
        import contextlib

        @contextlib.contextmanager
        def swap():
            if self.ema is None:
                yield
                return
            self._reshard()
            live = {n: p.detach().clone() for n, p in self.policy.named_parameters()}
            with torch.no_grad():  # (not p.data: under FSDP both sides are sharded DTensors)
                for n, p in self.policy.named_parameters():
                    p.copy_(self.ema[n])
            try:
                yield
            finally:
                self._reshard()
                with torch.no_grad():
                    for n, p in self.policy.named_parameters():
                        p.copy_(live[n])
        return swap()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Checkpoint the training state; under torchrun every rank calls it (sharded, DCP)."""
        extra = {"iteration": self.iteration, "base_eval": self.base_eval}
        ema = {k: v for k, v in self.ema.items()} if self.ema is not None else None
        if self.dp.enabled:
            from .distributed.dist_checkpoint import save_sharded_checkpoint
            self._reshard()
            return save_sharded_checkpoint(self.run_dir, self.iteration, model=self.policy, optimizer=self.optimizer,
                                           scheduler=self.scheduler, ema=ema, extra=extra,
                                           keep_last=self.cfg.trainer.keep_last)
        return save_checkpoint(self.run_dir, self.iteration, model=self.policy, optimizer=self.optimizer,
                               scheduler=self.scheduler, ema=ema, extra=extra,
                               keep_last=self.cfg.trainer.keep_last)

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the newest valid checkpoint of the run folder (or `path`); False if none.

        A sharded checkpoint loads on any number of processes; a single-process one too
        (every rank reads the whole files; under FSDP it keeps its shards).
        """
        from .distributed.dist_checkpoint import (is_sharded_checkpoint, load_full_checkpoint_into_sharded,
                                                  load_sharded_checkpoint)
        path = Path(path) if path else latest_checkpoint(self.run_dir)
        if path is None:
            return False
        if is_sharded_checkpoint(path):
            state = load_sharded_checkpoint(path, model=self.policy, optimizer=self.optimizer,
                                            scheduler=self.scheduler, ema=self.ema)
        elif self.sharded:  # every rank reads the whole files and keeps its shards
            state = load_full_checkpoint_into_sharded(path, model=self.policy, optimizer=self.optimizer,
                                                      scheduler=self.scheduler, ema=self.ema)
        else:
            state = load_checkpoint(path, model=self.policy, optimizer=self.optimizer, scheduler=self.scheduler,
                                    ema=self.ema)
        self.iteration = state["extra"]["iteration"]
        self.base_eval = state["extra"].get("base_eval")
        log.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    # ------------------------------------------------------------------ the loop
    def train(self, iterations: int | None = None, resume: bool | str = False, progress: bool = True,
              overwrite: bool = False) -> list[dict]:
        """Run until `iterations` (default: the config's) are done; checkpoint and log as configured.

        `resume`: False starts a new run (refused if run.output_dir already holds a run, unless
        `overwrite=True`, which deletes that run's outputs); True continues from the newest valid
        checkpoint (refused if there is none); "auto" continues if there is one and starts
        otherwise (see dancegrpo.run_folder). Every refusal comes before any work or write.

        Under torchrun every rank runs this loop; rank 0 alone writes logs, images and reports.
        """
        cfg = self.cfg
        if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int)
                                       or iterations < 1):
            raise ValueError(f"iterations = {iterations!r} must be an integer >= 1 (or None for "
                             f"trainer.iterations = {cfg.trainer.iterations})")
        total = cfg.trainer.iterations if iterations is None else iterations
        main = self.is_main
        checkpoint = self._prepare_run_folder(resume, overwrite)
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        resumed = self.resume(checkpoint) if checkpoint is not None else False
        logger = MetricsLogger(self.run_dir, resume=resumed, console=False) if main else _SilentLogger()
        if resumed:
            logger.truncate_after(self.iteration)
        handlers = self._install_stop_handlers()
        try:
            if self.base_eval is None and self.eval_prompts:
                self.base_eval = self.evaluate(return_images=True)
                images = self.base_eval.pop("images")
                if main:
                    save_eval_images(self.run_dir, "base", images)
                logger.log(0, self.base_eval)
            bar = tqdm(total=total, initial=self.iteration, desc="dancegrpo", unit="it",
                       disable=not progress or not main, dynamic_ncols=True)
            while self.iteration < total and not self._stop_requested:
                _crash_for_test(self.iteration)
                metrics = self.step()
                if cfg.trainer.eval_every and self.iteration % cfg.trainer.eval_every == 0 and self.iteration < total:
                    metrics.update(self.evaluate())
                self.metrics.append(metrics)
                logger.log(self.iteration, metrics)
                if main and self.iteration % cfg.trainer.log_every == 0:
                    tqdm.write(logger.console_line(self.iteration, metrics, self._console_keys(metrics)))
                bar.update(1)
                if self.dp.enabled:  # a signal seen by one rank stops all of them at the same iteration
                    self._stop_requested = agree_any(self._stop_requested, self.device)
                if (self.iteration % cfg.trainer.checkpoint_every == 0 or self.iteration == total
                        or self._stop_requested):
                    self.save()
            bar.close()
            if self.iteration >= total:
                self._save_final_model()
            if self.iteration >= total and self.eval_prompts:
                final = self.evaluate(return_images=True)
                images = final.pop("images")
                self.final_eval = final
                if main:
                    save_eval_images(self.run_dir, "final", images)
                    logger.log(self.iteration, final)
                    self.summary = write_report(self.run_dir, self.base_eval, final, self.eval_prompts)
                    tqdm.write(self.summary)
        finally:
            self._restore_stop_handlers(handlers)
            logger.close()
        return self.metrics

    def _prepare_run_folder(self, resume: bool | str, overwrite: bool) -> Path | None:
        """The checkpoint to resume from, or None to start; see dancegrpo.run_folder. Under torchrun
        every rank looks, the ranks agree (one refusing stops all) before rank 0 writes anything."""
        try:
            checkpoint = prepare_run_folder(self.run_dir, resume, overwrite, config=config_to_dict(self.cfg),
                                            delete=self.is_main)
            refusal = None
        except RunFolderError as err:
            checkpoint, refusal = None, err
        if self.dp.enabled and agree_any(refusal is not None, self.device) and refusal is None:
            raise RunFolderError(f"another rank refused the run folder {str(self.run_dir)!r} (see its error)")
        if refusal is not None:
            raise refusal
        return checkpoint

    def _save_final_model(self) -> None:
        """`final_model/` in the model's own format (EMA weights if kept), written by rank 0.

        Under FSDP the full weights are gathered to rank 0's CPU and loaded into a fresh,
        unsharded copy of the model read from model.path, which writes the files.
        """
        with self._ema_weights():
            if not self.sharded:
                if self.is_main:
                    self.adapter.save_pretrained(self.run_dir / "final_model")
                return
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            cfg = self.cfg.model
            fresh = load_model(cfg.name, cfg.path, cfg.options)
            fresh.trainable.load_state_dict(full)
            fresh.save_pretrained(self.run_dir / "final_model")
        dist.barrier()

    def _console_keys(self, metrics: dict) -> list[str]:
        """Rewards, loss and ratio health always; faults, skips and eval only when present."""
        keys = [k.removesuffix("_mean") for k in metrics if k.startswith("reward/") and k.endswith("_mean")]
        keys += ["loss", "grad_norm", "ratio", "clip_fraction"]
        keys += ["kl"] if self.reference is not None else []
        keys += [k for k in metrics if k.startswith("eval/")]
        keys += [k for k in metrics if (k.endswith("_faults") or k in ("skipped_updates", "first_update_logp_max_dev"))
                 and metrics[k]]
        return keys + ["time"]

    def _install_stop_handlers(self) -> dict:
        """First SIGINT/SIGTERM: finish the running iteration, checkpoint, stop. Second: stop now.

        Stopping mid-iteration saves nothing: a half-applied iteration would not resume
        exactly, and the last checkpoint is at most `checkpoint_every` iterations old.
        """
        import threading
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_stop_handlers(handlers: dict) -> None:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        tqdm.write(f"{signal.Signals(signum).name}: finishing this iteration, saving a checkpoint, then stopping "
                   "(send it again to stop at once without saving)")
        self._stop_requested = True
