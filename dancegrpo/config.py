"""Typed, validated configuration: YAML recipes loaded into nested dataclasses.

Everything is checked on load, before any work starts. All problems found are reported
together in one `ConfigError`, each naming the dotted field path (``grpo.tau``), the bad
value and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from .messages import short_repr

__all__ = [
    "ConfigError", "RunConfig", "ModelConfig", "SamplerConfig", "DataConfig", "RewardConfig",
    "GRPOConfig", "TrainerConfig", "FSDPConfig", "ParallelConfig", "Config", "from_dict", "load_config", "config_to_dict",
    "save_config", "stochastic_step_count", "trained_step_count", "trainable_pairs",
]


class ConfigError(ValueError):
    """A configuration was refused; `problems` lists every problem found.

    The message lists at most `SHOWN_PROBLEMS` of them (and how many more there are), so a file
    with thousands of bad keys still gives a readable error; `problems` keeps them all.
    """

    SHOWN_PROBLEMS = 20

    def __init__(self, problems: Sequence[str], header: str = "invalid configuration"):
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = f"{header}: {self.problems[0]}"
        else:
            shown = self.problems[: self.SHOWN_PROBLEMS]
            lines = "\n".join(f"  - {p}" for p in shown)
            if len(self.problems) > len(shown):
                lines += f"\n  ... and {len(self.problems) - len(shown)} more problems"
            message = f"{header} ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)


# ---------------------------------------------------------------------------------------
# Validation helpers: each returns a problem (relative to its dataclass) or None.

def _rule(name: str, value: Any, ok: bool, allowed: str) -> str | None:
    return None if ok else f"{name} = {short_repr(value)} is out of range: must be {allowed}"


def _one_of(name: str, value: Any, choices: Sequence[str]) -> str | None:
    ok = value in choices
    return None if ok else f"{name} = {short_repr(value)} is not allowed: must be one of {', '.join(choices)}"


def _problems(*found: str | None) -> list[str]:
    return [p for p in found if p]


# ---------------------------------------------------------------------------------------
# Schema

@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "cpu"              # "cpu", "cuda", or "cuda:N"
    autocast_dtype: str = "none"     # none | bf16 | fp16
    # torch intra-op threads: an integer (fixed), "auto" (follow the cores other processes leave
    # free, re-read every iteration; CPU runs only: dancegrpo/cpu_threads.py), or null (torch's default)
    num_threads: Any = None

    def validate(self) -> list[str]:
        device_ok = re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None
        return _problems(
            _rule("output_dir", self.output_dir, bool(self.output_dir.strip()),
                  "a folder path (the run writes its checkpoints and logs there)"),
            _rule("device", self.device, device_ok, "'cpu', 'cuda' or 'cuda:N' (N a GPU index)"),
            _one_of("autocast_dtype", self.autocast_dtype, ("none", "bf16", "fp16")),
            _rule("num_threads", self.num_threads,
                  self.num_threads is None or self.num_threads == "auto"
                  or (type(self.num_threads) is int and self.num_threads >= 1),
                  "an integer >= 1, 'auto' (follow the free cores), or null (torch's default)"),
        )


@dataclass
class ModelConfig:
    name: str = "toy_flux"           # model adapter name, resolved later by the model registry
    path: str = ""                   # checkpoint directory; "" = the adapter's embedded default
    # adapter-specific, passed through: guidance_scale (embedded guidance), cfg_scale (real CFG),
    # prompt_cache, lora, ... (see each adapter)
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> list[str]:
        name_ok = bool(self.name.strip())
        return _problems(_rule("name", self.name, name_ok, "a non-empty adapter name"))


@dataclass
class SamplerConfig:
    num_steps: int = 16
    eta: float = 0.3                 # SDE noise level
    shift: float = 3.0               # timestep shift of the flow schedule
    sde_form: str = "dancegrpo"      # dancegrpo | flow_grpo
    eval_num_steps: int | None = None  # ODE steps for evaluation; None = num_steps
    # [start, end): the only steps that inject noise (and are trained); the others are ODE
    # steps. None = every step is stochastic. See FlowSampler.
    sde_window: list[int] | None = None
    # Replay each rollout chunk's denoising loop from a CUDA graph (CUDA only; see dancegrpo.cuda_graph).
    cuda_graph: bool = False
    # Flow models only. None: the denoiser's time input is sigma as is. N (e.g. 1000): it is
    # sigma floored to a multiple of 1/N, floor(sigma * N) / N in float32, as the authors'
    # release feeds int(sigma * 1000) (FLUX: divided by 1000 again). The step's mean and std
    # still use the exact sigma. Rollout, training, the KL reference and evaluation all
    # compute it the same way (FlowSampler.model_time), so the first-update ratio stays 1.
    model_time_resolution: int | None = None

    def validate(self) -> list[str]:
        window = self.sde_window
        window_ok = window is None or (len(window) == 2 and 0 <= window[0] < window[1] <= self.num_steps)
        return _problems(
            _rule("num_steps", self.num_steps, self.num_steps >= 1, ">= 1"),
            _rule("sde_window", window, window_ok,
                  f"null or [start, end) with 0 <= start < end <= num_steps ({self.num_steps})"),
            _rule("eta", self.eta, self.eta >= 0, ">= 0"),
            _rule("shift", self.shift, self.shift > 0, "> 0"),
            _one_of("sde_form", self.sde_form, ("dancegrpo", "flow_grpo")),
            _rule("eval_num_steps", self.eval_num_steps,
                  self.eval_num_steps is None or self.eval_num_steps >= 1, ">= 1 (or null)"),
            _rule("cuda_graph", self.cuda_graph, isinstance(self.cuda_graph, bool), "true or false"),
            _rule("model_time_resolution", self.model_time_resolution,
                  self.model_time_resolution is None or self.model_time_resolution >= 1,
                  ">= 1 (e.g. 1000, the release's int(sigma * 1000)), or null for sigma as is"),
        )


@dataclass
class DataConfig:
    train_prompts: str = ""          # prompt file (one a line) or builtin ("toy:train"); required
    eval_prompts: str | None = ""    # same; "" or null disables held-out evaluation
    eval_num_prompts: int | None = None  # None = all eval prompts

    def validate(self) -> list[str]:
        return _problems(
            _rule("train_prompts", self.train_prompts, bool(self.train_prompts.strip()),
                  "a prompt file path or a builtin name like 'toy:train' (it is required)"),
            _rule("eval_num_prompts", self.eval_num_prompts,
                  self.eval_num_prompts is None or self.eval_num_prompts >= 1, ">= 1 (or null)"),
        )


@dataclass
class RewardConfig:
    name: str                        # registry name or "package.module:callable"
    weight: float = 1.0
    threshold: float | None = None   # if set: binary reward, 1 above threshold else 0
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> list[str]:
        name = self.name if isinstance(self.name, str) else ""  # None when it failed to load
        module, colon, attr = name.strip().partition(":")
        name_ok = bool(module) and (not colon or bool(attr))
        return _problems(
            _rule("name", self.name, name_ok,
                  "a reward registry name or 'package.module:callable' (both sides non-empty)"),
            _rule("weight", self.weight, self.weight != 0, "non-zero (drop the reward instead)"),
        )


@dataclass
class GRPOConfig:
    group_size: int = 12             # samples per prompt; advantages are relative within a group
    prompts_per_iteration: int = 32
    tau: float = 0.6                 # fraction of the trainable steps trained on, see tau_rounding
    # How many of the K trainable steps (the stochastic ones, less the last if
    # exclude_last_step) each rollout chunk trains on: "ceil" = ceil(tau * K), "floor" =
    # floor(tau * K) (the release's int(K * timestep_fraction)), both drawn uniformly at random
    # without repetition. grpo.subsample_timesteps holds the rule.
    tau_rounding: str = "ceil"
    # True: never train the sampler's final step (index num_steps - 1), as the release slices
    # it off before choosing steps (its log-prob is still recorded; only the choice changes).
    exclude_last_step: bool = False
    clip_range: float = 1e-4         # PPO ratio clip
    adv_clip_max: float = 5.0
    best_of_n_keep: int | None = None  # train on top-k and bottom-k per group; None = all
    kl_coef: float = 0.0
    shared_group_noise: bool = True  # all samples of a group start from the same noise
    logprob_reduce: str = "mean"     # mean | sum

    def validate(self) -> list[str]:
        k = self.best_of_n_keep
        return _problems(
            _rule("group_size", self.group_size, self.group_size >= 2,
                  ">= 2 (a group of 1 has no relative advantage: its sample is only compared "
                  "with itself)"),
            _rule("prompts_per_iteration", self.prompts_per_iteration,
                  self.prompts_per_iteration >= 1, ">= 1"),
            _rule("tau", self.tau, 0 < self.tau <= 1, "in (0, 1]"),
            _one_of("tau_rounding", self.tau_rounding, ("ceil", "floor")),
            _rule("clip_range", self.clip_range, self.clip_range > 0, "> 0"),
            _rule("adv_clip_max", self.adv_clip_max, self.adv_clip_max > 0, "> 0"),
            _rule("best_of_n_keep", k, k is None or k >= 1, ">= 1 (or null to keep all)"),
            _rule("kl_coef", self.kl_coef, self.kl_coef >= 0, ">= 0"),
            _one_of("logprob_reduce", self.logprob_reduce, ("mean", "sum")),
        )


@dataclass
class TrainerConfig:
    iterations: int = 100
    lr: float = 1e-5
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0    # max grad norm; None disables clipping
    lr_schedule: str = "constant"    # constant | linear | cosine
    warmup_iterations: int = 0
    updates_per_iteration: int = 4   # optimizer steps per iteration; (sample, step) pairs split
                                     # evenly between them
    micro_batch_size: int = 4        # samples per forward/backward in training
    ema_decay: float | None = None   # None disables the EMA of weights
    checkpoint_every: int = 10
    keep_last: int = 2               # checkpoints kept on disk
    eval_every: int = 0              # 0 = only before and after training
    log_every: int = 1
    overlap_rewards: bool = False    # decode and score each rollout chunk on a worker thread (a
                                     # CUDA side stream on GPU) while the next chunk samples

    def validate(self) -> list[str]:
        betas_ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        return _problems(
            _rule("iterations", self.iterations, self.iterations >= 1, ">= 1"),
            _rule("lr", self.lr, self.lr > 0, "> 0"),
            _rule("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            _rule("betas", self.betas, betas_ok, "two values, each in [0, 1)"),
            _rule("adam_eps", self.adam_eps, self.adam_eps > 0, "> 0"),
            _rule("grad_clip", self.grad_clip,
                  self.grad_clip is None or self.grad_clip > 0, "> 0 (or null to disable)"),
            _one_of("lr_schedule", self.lr_schedule, ("constant", "linear", "cosine")),
            _rule("warmup_iterations", self.warmup_iterations, self.warmup_iterations >= 0, ">= 0"),
            _rule("updates_per_iteration", self.updates_per_iteration,
                  self.updates_per_iteration >= 1, ">= 1"),
            _rule("micro_batch_size", self.micro_batch_size, self.micro_batch_size >= 1, ">= 1"),
            _rule("ema_decay", self.ema_decay,
                  self.ema_decay is None or 0 < self.ema_decay < 1,
                  "in (0, 1) (or null to disable)"),
            _rule("checkpoint_every", self.checkpoint_every, self.checkpoint_every >= 1, ">= 1"),
            _rule("keep_last", self.keep_last, self.keep_last >= 1, ">= 1"),
            _rule("eval_every", self.eval_every, self.eval_every >= 0,
                  ">= 0 (0 = before and after training only)"),
            _rule("log_every", self.log_every, self.log_every >= 1, ">= 1"),
        )


@dataclass
class FSDPConfig:
    """FSDP2 (`fully_shard` per transformer block, then the root) over the data-parallel ranks.

    `parallel.fsdp: true` is shorthand for `parallel.fsdp: {enabled: true}`.
    """
    enabled: bool = False
    param_dtype: str = "fp32"        # fp32 | bf16: dtype of the gathered parameters in compute
    reduce_dtype: str = "fp32"       # fp32 | bf16: dtype of the gradient reduce-scatter
    cpu_offload: bool = False        # keep sharded parameters, gradients and optimizer state on the CPU
    # null: shard over every process. N: shard within groups of N consecutive ranks (a node: its
    # all-gathers stay on NVLink) and replicate across groups (HSDP; docs/scaling.md says why).
    shard_size: int | None = None

    def validate(self) -> list[str]:
        return _problems(
            _one_of("param_dtype", self.param_dtype, ("fp32", "bf16")),
            _one_of("reduce_dtype", self.reduce_dtype, ("fp32", "bf16")),
            _rule("shard_size", self.shard_size, self.shard_size is None or self.shard_size >= 1,
                  ">= 1 (e.g. the GPUs per node), or null to shard over every process"),
        )


@dataclass
class ParallelConfig:
    """Scale-out under torchrun; the defaults are one process doing everything.

    World = dp x sp ranks. grpo.prompts_per_iteration is the global count per iteration, split
    over the data-parallel ranks, so a recipe means the same on any number of processes.
    """
    sp_size: int = 1                 # sequence-parallel (Ulysses) group size; 1 = off
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    activation_checkpointing: str = "none"  # none | full | selective (matmul and attention outputs kept)
    checkpoint_every_n_blocks: int = 1      # checkpoint every n-th transformer block
    compile_blocks: bool = False     # torch.compile each transformer block
    group_placement: str = "rank"    # rank: a prompt's whole group on one rank | spread: its samples over DP ranks

    def validate(self) -> list[str]:
        return _problems(
            _rule("sp_size", self.sp_size, self.sp_size >= 1, ">= 1 (1 turns sequence parallelism off)"),
            _one_of("activation_checkpointing", self.activation_checkpointing, ("none", "full", "selective")),
            _rule("checkpoint_every_n_blocks", self.checkpoint_every_n_blocks,
                  self.checkpoint_every_n_blocks >= 1, ">= 1"),
            _one_of("group_placement", self.group_placement, ("rank", "spread")),
        )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: list[RewardConfig] = field(default_factory=list)  # names become metric names
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> list[str]:
        """Cross-section checks (each section validates itself).

        An empty `rewards` list is allowed here: the Python API can bring its rewards as
        callables (`Trainer(..., rewards={name: fn})`); the Trainer refuses a run with none.
        """
        problems = []
        first_index: dict[str, int] = {}
        for i, reward in enumerate(self.rewards):
            if not isinstance(reward.name, str):  # failed to load; already reported
                continue
            if reward.name in first_index:
                problems.append(f"rewards.{i}.name = {short_repr(reward.name)} duplicates "
                                f"rewards.{first_index[reward.name]}.name: reward names must be "
                                "unique because they become metric names")
            first_index.setdefault(reward.name, i)
        from .attention.backends import config_problems as attention_problems
        problems += attention_problems(self.model.options, self.run.device)
        problems += self._trained_step_problems()
        k, n = self.grpo.best_of_n_keep, self.grpo.group_size
        if k is not None and 2 * k > n:
            problems.append(f"grpo.best_of_n_keep = {k} is out of range: must satisfy "
                            f"2 * best_of_n_keep <= grpo.group_size = {n} (top-k and bottom-k "
                            "are kept per group)")
        return problems + self._nothing_to_train() + self._schedule_problems()

    def _nothing_to_train(self) -> list[str]:
        """A sampler and GRPO settings that leave no step, or too few (micro-batch, step) pairs,
        to train on: refused here rather than after a rollout."""
        s, g, t = self.sampler, self.grpo, self.trainer
        if s.sde_window is not None and not (len(s.sde_window) == 2
                                             and 0 <= s.sde_window[0] < s.sde_window[1] <= s.num_steps):
            return []  # reported by sampler.sde_window itself
        if s.num_steps < 1 or not 0 < g.tau <= 1 or s.eta < 0 or g.tau_rounding not in ("ceil", "floor"):
            return []  # reported by their own sections
        if s.eta == 0:
            return [f"sampler.eta = {s.eta} makes every sampler step deterministic (an ODE step has no "
                    "log-probability): there is no step to train on; set sampler.eta > 0 (the paper uses 0.3)"]
        stochastic = stochastic_step_count(s)
        trained = trained_step_count(trainable_step_count(self), g.tau, g.tau_rounding)
        where = (f"sampler.sde_window = {s.sde_window}" if s.sde_window is not None
                 else f"sampler.num_steps = {s.num_steps}")
        if trained < 1 and g.tau_rounding != "ceil":
            return []  # reported by _trained_step_problems, which names the rounding
        if trained < 1:
            return [f"grpo.tau = {g.tau} selects no step: ceil(tau * {stochastic}) = 0 of the {stochastic} "
                    f"stochastic steps ({where}); use grpo.tau >= {1 / stochastic:.3g}"]
        pairs = trainable_pairs(self)
        if pairs is not None and t.updates_per_iteration > pairs:
            return [f"trainer.updates_per_iteration = {t.updates_per_iteration} is more than the {pairs} "
                    f"(micro-batch, step) pairs an iteration trains on ({pairs // trained} micro-batches of "
                    f"trainer.micro_batch_size = {t.micro_batch_size} samples x {trained} trained steps: grpo.tau "
                    f"= {g.tau} of {stochastic} stochastic steps); lower it to at most {pairs}"]
        return []

    def _schedule_problems(self) -> list[str]:
        t = self.trainer
        if t.warmup_iterations > t.iterations >= 1:
            return [f"trainer.warmup_iterations = {t.warmup_iterations} is more than trainer.iterations = "
                    f"{t.iterations}: the learning rate would never reach trainer.lr; lower the warmup"]
        return []

    def _trained_step_problems(self) -> list[str]:
        """grpo.exclude_last_step and grpo.tau_rounding = floor must leave a step to train."""
        s, g = self.sampler, self.grpo
        if s.eta <= 0 or not (0 < g.tau <= 1) or g.tau_rounding not in ("ceil", "floor"):
            return []  # no stochastic step at all, or a bad tau: reported elsewhere
        start, end = s.sde_window if s.sde_window is not None else (0, s.num_steps)
        if not 0 <= start < end <= s.num_steps:
            return []  # reported by sampler.sde_window
        trainable = trainable_step_count(self)
        if trainable == 0:
            return [f"grpo.exclude_last_step = true leaves no step to train: the only stochastic step "
                    f"(sampler.sde_window = {s.sde_window}) is the last one; widen the window or set "
                    "grpo.exclude_last_step = false"]
        if g.tau_rounding == "floor" and trained_step_count(trainable, g.tau, g.tau_rounding) == 0:
            return [f"grpo.tau = {g.tau} with grpo.tau_rounding = floor trains floor({g.tau} * {trainable}) = 0 "
                    f"of the {trainable} trainable steps: raise grpo.tau to at least {1 / trainable:.4g} "
                    "or use grpo.tau_rounding = ceil"]
        return []


def stochastic_step_count(sampler: SamplerConfig) -> int:
    """Sampler steps that inject noise (and have a log-prob): the SDE window's, or all of them."""
    if sampler.eta == 0:
        return 0
    start, end = sampler.sde_window if sampler.sde_window is not None else (0, sampler.num_steps)
    return end - start


def trainable_step_count(cfg: "Config") -> int:
    """Stochastic steps training may pick from: all of them, less the last sampler step when
    grpo.exclude_last_step is set and the last step is stochastic."""
    s = cfg.sampler
    stochastic = stochastic_step_count(s)
    end = s.sde_window[1] if s.sde_window is not None else s.num_steps
    return stochastic - (1 if stochastic and cfg.grpo.exclude_last_step and end == s.num_steps else 0)


def trained_step_count(trainable_steps: int, tau: float, rounding: str = "ceil") -> int:
    """Steps trained per rollout chunk, as `grpo.subsample_timesteps` picks them
    (`grpo.trained_step_count`), and 0 when there is no trainable step."""
    from .grpo import trained_step_count as count  # grpo imports torch; config loads without it
    return count(trainable_steps, tau, rounding) if trainable_steps else 0


def trainable_pairs(cfg: "Config", dp_size: int = 1) -> int | None:
    """(micro-batch, step) pairs one data-parallel rank trains on per iteration, which its
    `trainer.updates_per_iteration` optimizer steps split between them; None if the sizes are
    invalid (reported elsewhere).

    Samples per rank: prompts_per_iteration * group_size / dp_size (2 * best_of_n_keep kept per
    group when set), cut into rollout chunks of micro_batch_size; each chunk trains
    `trained_step_count` steps.
    """
    g, t = cfg.grpo, cfg.trainer
    group = 2 * g.best_of_n_keep if g.best_of_n_keep else g.group_size
    if min(g.prompts_per_iteration, group, t.micro_batch_size, dp_size) < 1:
        return None
    samples = g.prompts_per_iteration * group // dp_size
    chunks = -(-samples // t.micro_batch_size)
    return chunks * trained_step_count(trainable_step_count(cfg), g.tau, g.tau_rounding)


# ---------------------------------------------------------------------------------------
# Generic loader

_FAILED = object()  # marks a value that could not be converted (its problem is recorded)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _optional_inner(tp: Any) -> Any | None:
    """`X` for `X | None`, else None."""
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) == 1 and len(get_args(tp)) == 2:
            return inner[0]
    return None


def _describe(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_describe(inner)} or null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if get_origin(tp) is list:
        return f"a list of {_describe(get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if get_origin(tp) is dict:
        return "a mapping"
    if tp is Any:
        return "any value"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)",
            str: "a string"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str, errors: list[str], failed: set[str]) -> Any:
    """Return `value` as type `tp`, or `_FAILED` after recording the problem."""
    def fail(why: str = "") -> Any:
        errors.append(f"{path} = {short_repr(value)} has the wrong type: expected {_describe(tp)}"
                      f"{why}, got {type(value).__name__}")
        failed.add(path)
        return _FAILED

    inner = _optional_inner(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if inner is not None:
        return None if value is None else _convert(inner, value, path, errors, failed)
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty YAML section (`grpo:`) means all defaults
            value = {}
        return _build(tp, value, path, errors, failed) if isinstance(value, dict) else fail()
    if get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            return fail()
        items = [_convert(get_args(tp)[0], v, _join(path, i), errors, failed)
                 for i, v in enumerate(value)]
        if any(x is _FAILED for x in items):
            failed.add(path)  # the whole list falls back to its default
            return _FAILED
        return items
    if get_origin(tp) is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        return copy.deepcopy(value) if ok else fail(" with string keys")
    if tp is bool:
        return value if isinstance(value, bool) else fail()
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail()
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-5` (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                return fail()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            return fail()
        return number if math.isfinite(number) else fail(" (finite)")
    if tp is str:
        return value if isinstance(value, str) else fail()
    raise TypeError(f"config loader does not support the field type {tp!r} (at {path})")


def _unknown_key(path: str, key: Any, valid: Sequence[str]) -> str:
    guess = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {guess[0]!r}?)" if guess else ""
    section = f"of {path}" if path else "at the top level"
    name = str(key) if len(str(key)) <= 80 else short_repr(str(key))
    return (f"{_join(path, name)} is not a known key{hint}; "
            f"valid keys {section}: {', '.join(valid)}")


def _build(cls: type, data: dict, path: str, errors: list[str], failed: set[str]) -> Any:
    """Build dataclass `cls` from a mapping; a field that fails keeps its default."""
    hints, fields = _hints(cls), dataclasses.fields(cls)
    valid = [f.name for f in fields]
    errors.extend(_unknown_key(path, k, valid) for k in data if k not in hints)
    kwargs = {}
    for f in fields:
        fpath = _join(path, f.name)
        if f.name in data:
            value = _convert(hints[f.name], data[f.name], fpath, errors, failed)
            if value is not _FAILED:
                kwargs[f.name] = value
                continue
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{fpath} is required: expected {_describe(hints[f.name])}")
            failed.add(fpath)
        if f.default is not dataclasses.MISSING:
            kwargs[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs[f.name] = f.default_factory()
        else:
            kwargs[f.name] = None  # required and missing/bad: already reported
    return cls(**kwargs)


def _validate_tree(obj: Any, path: str) -> list[str]:
    """Run `validate()` on every nested dataclass (children first), prefixing paths."""
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        children = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, child in children:
            if dataclasses.is_dataclass(child):
                fpath = _join(path, f.name)
                problems += _validate_tree(child, fpath if i is None else _join(fpath, i))
    own = obj.validate() if hasattr(obj, "validate") else []
    return problems + [_join(path, p) for p in own]


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping and validate it.

    `path` prefixes every reported field path (e.g. "grpo" when building one section).
    Raises ConfigError listing every problem found.
    """
    errors: list[str] = []
    failed: set[str] = set()
    if not isinstance(data, dict):
        raise ConfigError([f"{path or 'configuration'} = {short_repr(data)} has the wrong type: expected "
                           f"a mapping, got {type(data).__name__}"])
    obj = _build(cls, data, path, errors, failed)

    def about_failed(problem: str) -> bool:  # a check on a default stand-in says nothing useful
        return any(re.search(rf"(?<![\w.]){re.escape(f)}(?!\w)", problem) for f in failed)

    errors += [p for p in _validate_tree(obj, path) if not about_failed(p)]
    if errors:
        raise ConfigError(errors)
    return obj


# ---------------------------------------------------------------------------------------
# Overrides ("trainer.lr=3e-5") and the public API

def _apply_override(data: dict, item: str) -> str | None:
    """Set one `dotted.path=value` in the raw mapping, checked against the schema.

    Returns a problem description, or None on success.
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        return (f"override {short_repr(item)} is malformed: write it as section.field=value, "
                "e.g. trainer.lr=3e-5")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        return f"override {short_repr(item)}: the value is not valid YAML ({exc})"
    parts = key.split(".")
    tp, node = Config, data
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        tp = _optional_inner(tp) or tp
        index: str | int = part
        if dataclasses.is_dataclass(tp) and isinstance(node, dict):
            if part not in _hints(tp):
                valid = [f.name for f in dataclasses.fields(tp)]
                return f"override {short_repr(item)}: {_unknown_key(where, part, valid)}"
            child_tp = _hints(tp)[part]
        elif isinstance(node, list) and (get_origin(tp) is list or tp is Any):
            if not part.isdigit() or int(part) >= len(node):
                count = f"{len(node)} entr{'y' if len(node) == 1 else 'ies'}"
                return (f"override {short_repr(item)}: {_join(where, part)} is not a valid index: "
                        f"{where} has {count}")
            index, child_tp = int(part), (Any if tp is Any else get_args(tp)[0])
        elif isinstance(node, dict) and (get_origin(tp) is dict or tp is Any):
            child_tp = Any
        else:
            return (f"override {short_repr(item)}: {where} is {_describe(tp)}, "
                    f"not a section with a field {part!r}")
        if depth == len(parts) - 1:
            node[index] = value
            return None
        if isinstance(node, dict) and node.get(index) is None and (
                dataclasses.is_dataclass(_optional_inner(child_tp) or child_tp)
                or get_origin(child_tp) is dict or child_tp is Any):
            node[index] = {}  # create a section (or an options sub-mapping) the recipe left out
        node, tp = (node.get(index) if isinstance(node, dict) else node[index]), child_tp
    return None


def load_config(source: str | os.PathLike | dict | Config, overrides: Sequence[str] = ()) -> Config:
    """Load a Config from a YAML path, a mapping or a Config; apply `key=value` overrides; validate.

    Raises ConfigError naming every bad field (or the missing file / bad override).
    """
    where = ""
    if isinstance(source, Config):
        data = config_to_dict(source)
    elif isinstance(source, dict):
        data = copy.deepcopy(source)  # overrides must not touch the caller's mapping
    else:
        where = os.fspath(source)
        from .io_errors import load_yaml
        try:
            data = load_yaml(where, "config file")
        except FileNotFoundError:
            raise ConfigError([f"config file {where!r} does not exist"]) from None
        except ValueError as exc:  # not readable, not UTF-8 or not YAML: the message names file and line
            raise ConfigError([str(exc)]) from None
        data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"{where or 'configuration'} must be a mapping of sections "
                           f"(run, model, ...), got {type(data).__name__}"])
    _expand_shorthands(data)  # before overrides too, so parallel.fsdp.enabled=... finds a section
    problems = [p for p in (_apply_override(data, o) for o in overrides) if p]
    if problems:
        raise ConfigError(problems, header="bad overrides" + (f" for {where}" if where else ""))
    _expand_shorthands(data)
    try:
        return from_dict(Config, data)
    except ConfigError as exc:
        if not where:
            raise
        given = f" with the overrides {', '.join(short_repr(o) for o in overrides)}" if overrides else ""
        raise ConfigError(exc.problems, header=f"invalid configuration in {where}{given}") from None


def _expand_shorthands(data: dict) -> None:
    """`parallel.fsdp: true|false` means `parallel.fsdp: {enabled: true|false}`."""
    parallel = data.get("parallel")
    if isinstance(parallel, dict) and isinstance(parallel.get("fsdp"), bool):
        parallel["fsdp"] = {"enabled": parallel["fsdp"]}


def config_to_dict(cfg: Config) -> dict:
    """Return the config as plain nested dicts/lists/scalars (YAML-serialisable)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
