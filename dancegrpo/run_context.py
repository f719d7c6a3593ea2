"""What every command of a run shares, built once from its config: device and process layout,
prompts, rewards, the generator adapter and its samplers.

`train`, `sample`, `eval` and the bench tools build a `RunContext` and work from it; none of them
reaches into a `Trainer`. Building one checks every input file and reward before the long
model load, and seeds the global RNGs first (peft draws LoRA weights at load).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config, ConfigError, load_config
from .data import load_prompts
from .devices import require_device
from .distributed.data_parallel import DataParallel
from .distributed.setup import setup_parallel
from .models import load_model
from .rewards import RewardEntry, RewardFn, RewardSet, build_reward
from .sampler import build_sampler
from .seeding import derive_seed, seed_global_rngs, seeded_generator


@dataclass
class RunContext:
    """A run's shared parts. Build with `RunContext.build(config, ...)`.

    `dp`/`mesh`: this process's data-parallel share and device mesh (mesh None in one process).
    `sampler`: the training SDE sampler; `eval_sampler`: its deterministic (eta 0) twin with
    `sampler.eval_num_steps` steps. `threads`: a ThreadGovernor under `run.num_threads: auto` on the CPU.
    """

    cfg: Config
    device: torch.device
    dp: DataParallel
    mesh: object | None
    train_prompts: list[str]
    eval_prompts: list[str]
    rewards: RewardSet
    adapter: object
    sampler: object
    eval_sampler: object
    threads: object | None = field(default=None, repr=False)

    @classmethod
    def build(cls, config: Config | str | dict, rewards: dict[str, RewardFn] | None = None, adapter=None,
              overrides=()) -> "RunContext":
        """Load the config (with `overrides`), join torchrun's processes if launched so, seed the
        global RNGs from run.seed and the rank, read prompts, build rewards, load the model and
        samplers. `rewards` (name -> callable(images, prompts) -> (N,) scores) replace configured
        rewards of the same name and add the others with weight 1. `adapter`: an already built
        generator adapter instead of loading model.path.

        Raises ConfigError / ValueError / TypeError naming the field, file or argument before the model loads.
        """
        cfg = load_config(config, overrides)
        check_api_rewards(cfg, rewards)
        require_device(cfg.run.device)
        dp, mesh, device = setup_parallel(cfg, torch.device(cfg.run.device))
        seed_global_rngs(global_seed(cfg.run.seed))  # before the model: LoRA weights are drawn at load
        # Prompts and rewards before the model: a bad file or reward name is reported before the long load.
        train_prompts = load_prompts(cfg.data.train_prompts)
        eval_prompts = first_eval_prompts(cfg) if cfg.data.eval_prompts else []
        reward_set = build_reward_set(cfg, rewards or {})
        threads = None
        if cfg.run.num_threads == "auto":
            if device.type == "cpu":
                from .cpu_threads import ThreadGovernor
                threads = ThreadGovernor()
        elif cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        if adapter is None:
            adapter = load_model(cfg.model.name, cfg.model.path, cfg.model.options)
        adapter.to(device)
        s = cfg.sampler
        sampler = build_sampler(adapter.prediction, s.num_steps, s.eta, s.shift, s.sde_form, device=device,
                                sde_window=s.sde_window, cuda_graph=s.cuda_graph,
                                model_time_resolution=s.model_time_resolution)
        eval_sampler = build_sampler(adapter.prediction, s.eval_num_steps or s.num_steps, 0.0, s.shift, s.sde_form,
                                     device=device, model_time_resolution=s.model_time_resolution)
        check_sampler = getattr(adapter, "check_sampler", None)
        if check_sampler is not None:  # a model whose parts depend on the step (Wan 2.2's experts) checks the schedule
            check_sampler(sampler)
        sta = getattr(adapter, "sta", None)
        if sta is not None:  # sliding-tile attention picks its window by sampling step
            sta.set_schedule(sampler.model_time(torch.arange(sampler.num_steps, device=device)))
        return cls(cfg, device, dp, mesh, train_prompts, eval_prompts, reward_set, adapter, sampler, eval_sampler,
                   threads)

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs and files (rank 0, or the only one)."""
        return not dist.is_initialized() or dist.get_rank() == 0

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)

    def generator(self, *keys) -> torch.Generator:
        """A generator on the run's device seeded by (run.seed, *keys)."""
        return seeded_generator(self.device, self.cfg.run.seed, *keys)

    def seed_global_rngs(self, *keys) -> None:
        """Reseed the global RNGs for `keys` on this process (ranks draw different numbers)."""
        seed_global_rngs(global_seed(self.cfg.run.seed, *keys))

    def autocast(self):
        """The run's autocast context (run.autocast_dtype bf16/fp16), or a disabled one."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.run.autocast_dtype)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def global_seed(seed: int, *keys) -> int:
    """The seed of the global RNGs for `keys` on this process (ranks draw different numbers)."""
    return derive_seed(seed, "global_rngs", *keys, dist.get_rank() if dist.is_initialized() else 0)


def check_api_rewards(cfg: Config, rewards: dict[str, RewardFn] | None) -> None:
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


def build_reward_set(cfg: Config, user: dict[str, RewardFn]) -> RewardSet:
    """The configured rewards (a user callable replaces the one of its name), then the other user ones, weight 1."""
    entries = []
    for rc in cfg.rewards:
        fn = user[rc.name] if rc.name in user else build_reward(rc.name, rc.options)
        entries.append(RewardEntry(rc.name, fn, rc.weight, rc.threshold))
    configured = {rc.name for rc in cfg.rewards}
    entries += [RewardEntry(name, fn) for name, fn in user.items() if name not in configured]
    return RewardSet(entries)


def first_eval_prompts(cfg: Config) -> list[str]:
    """The held-out prompts, cut to data.eval_num_prompts; asking for more than there are is refused."""
    prompts = load_prompts(cfg.data.eval_prompts)
    wanted = cfg.data.eval_num_prompts
    if wanted is not None and wanted > len(prompts):
        raise ConfigError([f"data.eval_num_prompts = {wanted} is more than the {len(prompts)} prompts of "
                           f"data.eval_prompts = {cfg.data.eval_prompts!r}: lower it, or null for all of them"])
    return prompts[:wanted]
