"""Configuration checks that span sections, and the step counts they (and the trainer) use.

Each section checks its own fields (`dancegrpo.config.schema`); `Config.validate` calls
`cross_section_problems` for the rest. Every check returns problem strings naming the dotted
fields involved, never raises, and skips what a section's own check already reports.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..messages import short_repr

if TYPE_CHECKING:
    from .schema import Config, SamplerConfig


def cross_section_problems(cfg: Config) -> list[str]:
    """Problems spanning sections of `cfg` (each section checks its own fields): duplicate
    reward names, the attention backend against the device, the trained steps, best-of-N
    against the group size, a run with nothing to train, the learning-rate warmup."""
    problems = []
    first_index: dict[str, int] = {}
    for i, reward in enumerate(cfg.rewards):
        if not isinstance(reward.name, str):  # failed to load; already reported
            continue
        if reward.name in first_index:
            problems.append(f"rewards.{i}.name = {short_repr(reward.name)} duplicates "
                            f"rewards.{first_index[reward.name]}.name: reward names must be "
                            "unique because they become metric names")
        first_index.setdefault(reward.name, i)
    from ..attention.backend_choice import config_problems as attention_problems
    problems += attention_problems(cfg.model.options, cfg.run.device)
    problems += _trained_step_problems(cfg)
    k, n = cfg.grpo.best_of_n_keep, cfg.grpo.group_size
    if k is not None and 2 * k > n:
        problems.append(f"grpo.best_of_n_keep = {k} is out of range: must satisfy "
                        f"2 * best_of_n_keep <= grpo.group_size = {n} (top-k and bottom-k "
                        "are kept per group)")
    return problems + _nothing_to_train(cfg) + _schedule_problems(cfg)


def _nothing_to_train(cfg: Config) -> list[str]:
    """A sampler and GRPO settings that leave no step, or too few (micro-batch, step) pairs,
    to train on: refused here rather than after a rollout."""
    s, g, t = cfg.sampler, cfg.grpo, cfg.trainer
    if s.sde_window is not None and not (len(s.sde_window) == 2
                                         and 0 <= s.sde_window[0] < s.sde_window[1] <= s.num_steps):
        return []  # reported by sampler.sde_window itself
    if s.num_steps < 1 or not 0 < g.tau <= 1 or s.eta < 0 or g.tau_rounding not in ("ceil", "floor"):
        return []  # reported by their own sections
    if s.eta == 0:
        return [f"sampler.eta = {s.eta} makes every sampler step deterministic (an ODE step has no "
                "log-probability): there is no step to train on; set sampler.eta > 0 (the paper uses 0.3)"]
    stochastic = stochastic_step_count(s)
    trained = trained_step_count(trainable_step_count(cfg), g.tau, g.tau_rounding)
    where = (f"sampler.sde_window = {s.sde_window}" if s.sde_window is not None
             else f"sampler.num_steps = {s.num_steps}")
    if trained < 1 and g.tau_rounding != "ceil":
        return []  # reported by _trained_step_problems, which names the rounding
    if trained < 1:
        return [f"grpo.tau = {g.tau} selects no step: ceil(tau * {stochastic}) = 0 of the {stochastic} "
                f"stochastic steps ({where}); use grpo.tau >= {1 / stochastic:.3g}"]
    pairs = trainable_pairs(cfg)
    if pairs is not None and t.updates_per_iteration > pairs:
        return [f"trainer.updates_per_iteration = {t.updates_per_iteration} is more than the {pairs} "
                f"(micro-batch, step) pairs an iteration trains on ({pairs // trained} micro-batches of "
                f"trainer.micro_batch_size = {t.micro_batch_size} samples x {trained} trained steps: grpo.tau "
                f"= {g.tau} of {stochastic} stochastic steps); lower it to at most {pairs}"]
    return []


def _schedule_problems(cfg: Config) -> list[str]:
    t = cfg.trainer
    if t.warmup_iterations > t.iterations >= 1:
        return [f"trainer.warmup_iterations = {t.warmup_iterations} is more than trainer.iterations = "
                f"{t.iterations}: the learning rate would never reach trainer.lr; lower the warmup"]
    return []


def _trained_step_problems(cfg: Config) -> list[str]:
    """grpo.exclude_last_step and grpo.tau_rounding = floor must leave a step to train."""
    s, g = cfg.sampler, cfg.grpo
    if s.eta <= 0 or not (0 < g.tau <= 1) or g.tau_rounding not in ("ceil", "floor"):
        return []  # no stochastic step at all, or a bad tau: reported elsewhere
    start, end = s.sde_window if s.sde_window is not None else (0, s.num_steps)
    if not 0 <= start < end <= s.num_steps:
        return []  # reported by sampler.sde_window
    trainable = trainable_step_count(cfg)
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


def trainable_step_count(cfg: Config) -> int:
    """Stochastic steps training may pick from: all of them, less the last sampler step when
    grpo.exclude_last_step is set and the last step is stochastic."""
    s = cfg.sampler
    stochastic = stochastic_step_count(s)
    end = s.sde_window[1] if s.sde_window is not None else s.num_steps
    return stochastic - (1 if stochastic and cfg.grpo.exclude_last_step and end == s.num_steps else 0)


def trained_step_count(trainable_steps: int, tau: float, rounding: str = "ceil") -> int:
    """Steps trained per rollout chunk, as `grpo.subsample_timesteps` picks them
    (`grpo.trained_step_count`), and 0 when there is no trainable step."""
    from ..grpo import trained_step_count as count  # grpo imports torch; config loads without it
    return count(trainable_steps, tau, rounding) if trainable_steps else 0


def trainable_pairs(cfg: Config, dp_size: int = 1) -> int | None:
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
