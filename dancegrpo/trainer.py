"""The DanceGRPO trainer: one loop for every generator and every reward.

An iteration: `collect` (dancegrpo.collect) draws prompts, rolls out `group_size` samples per
prompt from shared initial noise (batched, chunk by chunk), decodes and scores them in memory
and turns rewards into per-group advantages; the `Updater` (dancegrpo.update) then makes
`updates_per_iteration` optimizer steps over the (chunk, step) pairs of a random subset of
ceil(tau*T) steps per chunk. The trainer owns the loop around them: logging, evaluation,
checkpoints, signals.

Every random draw of an iteration comes from generators seeded by (seed, iteration), so
a resumed run repeats exactly what an uninterrupted one would have done.

Under torchrun (WORLD_SIZE > 1) the same loop runs on every rank: each data-parallel rank rolls
out its share of the iteration's prompts (see dancegrpo.distributed.data_parallel), gradients
are summed over ranks (FSDP2 or one flat all-reduce), and only rank 0 writes logs and files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CheckpointManager
from .collect import Batch, collect
from .config import Config, config_to_dict, save_config
from .distributed.data_parallel import agree_any, broadcast_parameters
from .distributed.parallelize import parallelize_denoiser
from .ema import EMA
from .eval.heldout import EvalModel
from .eval.report import save_eval_images, write_report
from .metrics import MetricsLogger
from .models import load_model
from .models.base import FrozenReference
from .models.train_mode import check_mode_independent
from .rewards import RewardFn
from .run_context import RunContext
from .run_control import SilentLogger, StopSignals, console_keys, crash_for_test
from .run_folder import RunFolderError, prepare_run_folder
from .update import Updater, lr_lambda, sum_over_ranks

log = logging.getLogger(__name__)


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
        self.ctx = ctx = RunContext.build(config, rewards, adapter, overrides)
        self.cfg, self.run_dir, self.is_main = ctx.cfg, ctx.run_dir, ctx.is_main
        self.policy = ctx.adapter.trainable
        self.policy.requires_grad_(True).train()
        # Rollouts run in eval mode, updates in train mode: refuse modules (dropout...) for which they differ.
        check_mode_independent(self.policy, ctx.adapter if isinstance(ctx.adapter, torch.nn.Module) else None)
        if ctx.dp.enabled:
            broadcast_parameters(self.policy)  # every rank starts from rank 0's weights
        t = self.cfg.trainer
        # The frozen KL reference is copied before any wrapper or sharding: a plain module.
        reference = self._frozen_reference() if self.cfg.grpo.kl_coef > 0 else None
        self.parallel = parallelize_denoiser(ctx.adapter, self.policy, self.cfg.parallel, ctx.mesh, ctx.device)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps,
                                           weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.lr_schedule, t.warmup_iterations, t.iterations))
        self.ema = EMA(self.policy, t.ema_decay) if t.ema_decay else None
        self.evaluator = EvalModel(ctx, self.ema, self.parallel.reshard)
        self.updater = Updater(ctx, self.policy, self.params, self.optimizer, self.ema, reference,
                               self.parallel if self.parallel.sharded else None)
        self.iteration = 0  # iterations completed
        self.metrics: list[dict] = []
        self.base_eval: dict | None = None
        self.final_eval: dict | None = None
        self.summary: str | None = None
        self._stop = StopSignals()

    # The run's shared parts live in the RunContext; these name them for callers and tests.
    adapter = property(lambda self: self.ctx.adapter, lambda self, value: setattr(self.ctx, "adapter", value))
    sampler = property(lambda self: self.ctx.sampler)
    rewards = property(lambda self: self.ctx.rewards)
    device = property(lambda self: self.ctx.device)
    dp = property(lambda self: self.ctx.dp)
    train_prompts = property(lambda self: self.ctx.train_prompts)
    eval_prompts = property(lambda self: self.ctx.eval_prompts)
    reference = property(lambda self: self.updater.reference)
    sharded = property(lambda self: self.parallel.sharded)

    def _frozen_reference(self):
        """The initial policy for the KL term: the adapter's own (LoRA: adapters switched off,
        no copy) when it has one, else a frozen copy of its transformer."""
        make = getattr(self.adapter, "frozen_reference", None)
        return make() if make is not None else FrozenReference(self.adapter, "transformer")

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict:
        """Run one iteration (rollout, reward, updates) and return its metrics."""
        timings = {}
        if self.ctx.threads is not None:  # follow the cores other processes left free since the last iteration
            timings["cpu/threads"] = self.ctx.threads.update()
        batch = collect(self.ctx, self.iteration)
        timings.update(batch.timings)
        start = time.perf_counter()
        self.policy.train()
        update_stats = self._update(batch.rollout, batch.advantages, batch.scores.valid, batch.cond,
                                    self.ctx.generator("plan", self.iteration))
        timings["time/update"] = time.perf_counter() - start
        lr = self.scheduler.get_last_lr()[0]  # the rate this iteration's updates used (logged below)
        with warnings.catch_warnings():
            # The schedule is per iteration, also for one whose updates were all dropped;
            # torch's "scheduler before optimizer" warning does not apply.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.iteration += 1
        return {"iteration": self.iteration, **self._reward_metrics(batch), **update_stats, "lr": lr, **timings}

    def _update(self, rollout, advantages, valid, cond, plan_gen) -> dict:
        """This iteration's optimizer updates (see `Updater.run`)."""
        return self.updater.run(rollout, advantages, valid, cond, plan_gen, self.iteration)

    def _reward_metrics(self, batch: Batch) -> dict:
        """Per reward: mean, std and fault count over every rank's samples; groups with zero advantage."""
        dp, scores, group = self.dp, batch.scores, batch.group_size
        metrics = {}
        faults = sum_over_ranks(dp, self.device, {name: scores.faults[name] for name in scores.values})
        for name, value in scores.values.items():
            value = dp.gather_rows(value, group)
            finite = value[torch.isfinite(value)]
            metrics[f"reward/{name}_mean"] = finite.mean().item() if len(finite) else float("nan")
            metrics[f"reward/{name}_std"] = finite.std().item() if len(finite) > 1 else 0.0
            metrics[f"reward/{name}_faults"] = faults[name]
        metrics["reward/zero_advantage_groups"] = int((dp.gather_rows(batch.advantages, group).view(-1, group)
                                                       .abs().sum(1) == 0).sum())
        return metrics

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, prompts: list[str] | None = None, return_images: bool = False, by_tag: bool = False) -> dict:
        """Held-out evaluation with the deterministic ODE sampler and fixed per-prompt seeds
        (EMA weights when kept): `eval/<reward>` and the rewards' metadata means (with `by_tag`
        also per tag); see dancegrpo.eval.heldout.EvalModel."""
        return self.evaluator.evaluate(prompts, return_images, by_tag)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoints(self) -> CheckpointManager:
        """The run's checkpoints: sharded (DCP) under torchrun, the local format otherwise."""
        return CheckpointManager(self.run_dir, distributed=self.dp.enabled, sharded=self.sharded,
                                 keep_last=self.cfg.trainer.keep_last, is_main=self.is_main)

    def save(self) -> Path:
        """Checkpoint the training state; under torchrun every rank calls it (sharded, DCP)."""
        extra = {"iteration": self.iteration, "base_eval": self.base_eval}
        self.parallel.reshard()  # under FSDP: parameters back in their sharded form (a no-op otherwise)
        return self._checkpoints().save(self.iteration, model=self.policy, optimizer=self.optimizer,
                                        scheduler=self.scheduler, ema=self._ema_state(), extra=extra)

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the newest valid checkpoint of the run folder (or `path`); False if none.

        A sharded checkpoint loads on any number of processes; a single-process one too
        (every rank reads the whole files; under FSDP it keeps its shards).
        """
        checkpoints = self._checkpoints()
        path = Path(path) if path else checkpoints.latest()
        if path is None:
            return False
        state = checkpoints.load(path, model=self.policy, optimizer=self.optimizer, scheduler=self.scheduler,
                                 ema=self._ema_state())
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
        if resumed and self.iteration >= total and self._already_finished():
            return self.metrics
        logger = MetricsLogger(self.run_dir, resume=resumed, console=False) if main else SilentLogger()
        if resumed:
            logger.truncate_after(self.iteration)
        with self._stop, contextlib.closing(logger):
            if self.base_eval is None and self.eval_prompts:
                self.base_eval = self.evaluate(return_images=True)
                images = self.base_eval.pop("images")
                if main:
                    save_eval_images(self.run_dir, "base", images)
                logger.log(0, self.base_eval)
            bar = tqdm(total=total, initial=self.iteration, desc="dancegrpo", unit="it",
                       disable=not progress or not main, dynamic_ncols=True)
            while self.iteration < total and not self._stop.requested:
                crash_for_test(self.iteration)
                metrics = self.step()
                if cfg.trainer.eval_every and self.iteration % cfg.trainer.eval_every == 0 and self.iteration < total:
                    metrics.update(self.evaluate())
                self.metrics.append(metrics)
                logger.log(self.iteration, metrics)
                if main and self.iteration % cfg.trainer.log_every == 0:
                    keys = console_keys(metrics, with_kl=self.reference is not None)
                    tqdm.write(logger.console_line(self.iteration, metrics, keys))
                bar.update(1)
                if self.dp.enabled:  # a signal seen by one rank stops all of them at the same iteration
                    self._stop.requested = agree_any(self._stop.requested, self.device)
                if (self.iteration % cfg.trainer.checkpoint_every == 0 or self.iteration == total
                        or self._stop.requested):
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
        return self.metrics

    def _already_finished(self) -> bool:
        """A resumed run that had finished (final_model/ written, and its final evaluation in
        summary.json when it evaluates): nothing to redo, and no second final-evaluation row.
        Under torchrun every rank must see it so."""
        done = (self.run_dir / "final_model").is_dir()
        summary = self.run_dir / "summary.json"
        if self.eval_prompts:
            done = done and summary.is_file()
        if self.dp.enabled:
            done = not agree_any(not done, self.device)
        if not done:
            return False
        if self.eval_prompts:
            report = json.loads(summary.read_text())
            self.final_eval, self.summary = report.get("final"), report.get("summary")
        log.info("%s is complete at iteration %d (final_model/ written): nothing to do; give --iterations "
                 "(or trainer.iterations) above %d to train on", self.run_dir, self.iteration, self.iteration)
        return True

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
        cfg = self.cfg.model
        self._checkpoints().export_final(self.adapter, model=self.policy, weights=self.evaluator.weights,
                                         fresh_adapter=lambda: load_model(cfg.name, cfg.path, cfg.options))

    def _ema_state(self) -> dict | None:
        return self.ema.shadow if self.ema is not None else None
