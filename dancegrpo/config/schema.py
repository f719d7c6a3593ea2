"""The configuration's schema: one dataclass per section, each checking its own fields.

`ConfigError` (every problem found, each naming the dotted field path, the bad value and what
is allowed) and the per-field rules live here; checks spanning sections are in
`dancegrpo.config.checks`, reading YAML and overrides in `dancegrpo.config.loader`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..messages import short_repr
from .checks import cross_section_problems


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
        """Cross-section checks (each section validates itself): `dancegrpo.config.checks`.

        An empty `rewards` list is allowed here: the Python API can bring its rewards as
        callables (`Trainer(..., rewards={name: fn})`); the Trainer refuses a run with none.
        """
        return cross_section_problems(self)
