"""GRPO math for DanceGRPO: advantages, the clipped-ratio loss, step subsets, best-of-N.

Everything here is a pure function on tensors (CPU or GPU): no model, no I/O.

Batch layout is group-major: a batch of ``N = num_groups * group_size`` samples where
rows ``[g * group_size, (g + 1) * group_size)`` are the samples of prompt group ``g``.
Statistics are computed in at least float32 whatever the input dtype.
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ClippedLossOutput",
    "aggregate_advantages",
    "best_of_n_indices",
    "binary_reward",
    "clip_advantages",
    "clipped_ratio_loss",
    "group_advantages",
    "kl_penalty",
    "shared_group_noise",
    "initial_noise",
    "subsample_timesteps",
    "trained_step_count",
]

# Slack for ceil(tau * T): 0.6 * 25 must give 15 even if the product lands at 15.000000000000002.
_CEIL_SLACK = 1e-9
# How many offending indices an error message lists before it elides the rest.
_MAX_LISTED = 20


# --------------------------------------------------------------------------- helpers


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the input already is float64."""
    return torch.promote_types(dtype, torch.float32)


def _num_groups(n: int, group_size: int) -> int:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if n % group_size != 0:
        raise ValueError(
            f"batch size {n} is not divisible by group_size {group_size}: the batch must be "
            f"group-major with exactly group_size samples per prompt"
        )
    return n // group_size


def _check_1d(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(t.shape)}")


def _format_indices(idx: Tensor) -> str:
    listed = idx[:_MAX_LISTED].tolist()
    more = f" ... (+{idx.numel() - _MAX_LISTED} more)" if idx.numel() > _MAX_LISTED else ""
    return f"{listed}{more}"


def _check_valid_mask(valid: Tensor | None, rewards: Tensor) -> Tensor:
    """Return a bool mask shaped like ``rewards`` (all True when ``valid`` is None)."""
    if valid is None:
        return torch.ones_like(rewards, dtype=torch.bool)
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {getattr(valid, 'dtype', type(valid))}")
    if valid.shape != rewards.shape:
        raise ValueError(
            f"valid has shape {tuple(valid.shape)} but rewards have shape {tuple(rewards.shape)}"
        )
    return valid.to(rewards.device)


_UNMASKED_HINT = ("that are not marked invalid; pass valid=<bool mask> with False at those "
                  "samples to exclude them")


def _check_finite_where_valid(rewards: Tensor, valid: Tensor | None, name: str, hint: str = _UNMASKED_HINT) -> None:
    """Raise naming the indices of non-finite rewards among the valid (default: all) samples."""
    bad = ~torch.isfinite(rewards) if valid is None else valid & ~torch.isfinite(rewards)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        raise ValueError(f"{name} has {idx.numel()} non-finite value(s) (NaN/inf) at indices "
                         f"{_format_indices(idx)} {hint}")


def _generated_on(generator: torch.Generator | None, device) -> torch.device:
    """Random draws must happen on the generator's device; the result is moved afterwards."""
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


# --------------------------------------------------------------------------- advantages


class GroupIds(NamedTuple):
    """Group membership of a batch in any layout (Flow-GRPO keys its groups by prompt the same way).

    ``ids``: (N,) int64, the group of each sample, in ``[0, count)``; samples of a group may sit
    anywhere in the batch (spread over ranks, reordered, unequal sizes). ``count``: number of groups.
    """

    ids: Tensor
    count: int


def _membership(groups: GroupIds, n: int, device) -> Tensor:
    """(count, N) bool: sample j belongs to group g. Dense on purpose: reductions over it are
    deterministic on every device (scatter-adds on CUDA are not), and count * N stays small."""
    ids, count = groups
    if not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.shape != (n,):
        raise ValueError(f"group ids must be an int64 tensor of shape ({n},), got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"group count must be a positive int, got {count!r}")
    outside = (ids < 0) | (ids >= count)
    if bool(outside.any()):
        raise ValueError(f"group ids outside [0, {count}) at indices {_format_indices(outside.nonzero().flatten())}")
    return ids.to(device)[None, :] == torch.arange(count, device=device)[:, None]


# Adapted from DanceGRPO fastvideo/train_grpo_flux.py::train_one_step (Apache-2.0)
def _group_advantages(
    rewards: Tensor, group_size: int | GroupIds, valid: Tensor | None, eps: float, name: str
) -> Tensor:
    _check_1d(rewards, name)
    if isinstance(group_size, GroupIds):
        return _group_advantages_by_id(rewards, group_size, valid, eps, name)
    num_groups = _num_groups(rewards.numel(), group_size)
    mask = _check_valid_mask(valid, rewards)
    _check_finite_where_valid(rewards, mask, name)

    dtype = _stat_dtype(rewards.dtype)
    # Zero out invalid entries first: NaN * 0 would still be NaN.
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(mask, rewards.detach().to(dtype), zero)
    r = r.view(num_groups, group_size)
    m = mask.view(num_groups, group_size)

    count = m.sum(dim=1, keepdim=True)
    denom = count.clamp(min=1).to(dtype)
    mean = r.sum(dim=1, keepdim=True) / denom
    centered = torch.where(m, r - mean, zero)
    # Unbiased (n - 1) variance, as torch's default Tensor.std() used by the released
    # DanceGRPO code; only groups with >= 2 valid members get used.
    var = centered.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1).to(dtype)
    adv = centered / (var.sqrt() + eps)

    # A group whose valid rewards are all equal carries no signal. Its float mean may be off
    # by one ulp, which eps would blow up into a large advantage, so test equality directly.
    inf = torch.tensor(float("inf"), dtype=dtype, device=r.device)
    group_max = torch.where(m, r, -inf).amax(dim=1, keepdim=True)
    group_min = torch.where(m, r, inf).amin(dim=1, keepdim=True)
    informative = (count >= 2) & (group_max > group_min)
    adv = torch.where(informative & m, adv, zero)
    return adv.reshape(-1)


def _group_advantages_by_id(rewards: Tensor, groups: GroupIds, valid: Tensor | None, eps: float, name: str) -> Tensor:
    """As the group-major path, with each group's statistics reduced over its members wherever they are.

    Groups of equal size are gathered (members in batch order) into a group-major batch and take
    the group-major path itself, so a batch spread over ranks gets exactly one process's floats.
    """
    mask = _check_valid_mask(valid, rewards)
    _check_finite_where_valid(rewards, mask, name)
    member = _membership(groups, rewards.numel(), rewards.device)
    ids = groups.ids.to(rewards.device)
    sizes = member.sum(dim=1)
    if bool((sizes == sizes[0]).all()):
        order = torch.sort(ids, stable=True).indices
        adv = torch.empty_like(rewards, dtype=_stat_dtype(rewards.dtype))
        adv[order] = _group_advantages(rewards[order], rewards.numel() // groups.count, mask[order], eps, name)
        return adv
    dtype = _stat_dtype(rewards.dtype)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(mask, rewards.detach().to(dtype), zero)
    m = member & mask[None, :]  # (G, N): valid members of each group
    count = m.sum(dim=1)
    mean = torch.where(m, r[None, :], zero).sum(dim=1) / count.clamp(min=1).to(dtype)
    centered = torch.where(mask, r - mean[ids], zero)
    var = torch.where(m, centered.square()[None, :], zero).sum(dim=1) / (count - 1).clamp(min=1).to(dtype)
    adv = centered / (var.sqrt()[ids] + eps)
    inf = torch.tensor(float("inf"), dtype=dtype, device=r.device)
    spread = torch.where(m, r[None, :], -inf).amax(dim=1) > torch.where(m, r[None, :], inf).amin(dim=1)
    informative = (count >= 2) & spread
    return torch.where(informative[ids] & mask, adv, zero)


def group_advantages(
    rewards: Tensor, group_size: int | GroupIds, valid: Tensor | None = None, eps: float = 1e-8
) -> Tensor:
    """Group-relative advantages ``(r - mean_g) / (std_g + eps)`` for a group-major batch,
    or for any layout when ``group_size`` is a ``GroupIds``.

    ``std_g`` is the unbiased (n - 1) standard deviation over the valid members of the
    group, matching torch's default ``Tensor.std()`` as used by the released DanceGRPO code.

    Args:
        rewards: (N,) rewards, N a multiple of ``group_size``.
        group_size: samples per prompt group of a group-major batch; or a ``GroupIds``
            (each sample's group id and the group count) for any layout and group sizes.
        valid: optional (N,) bool mask. Invalid samples (e.g. a failed reward giving NaN)
            are excluded from their group's mean and std and get advantage 0.
        eps: added to the std in the denominator.

    Returns:
        (N,) advantages in float32 (float64 if ``rewards`` is float64). A group whose valid
        rewards are all equal, or that has fewer than 2 valid samples, gets 0 everywhere.

    Raises:
        ValueError: N not divisible by ``group_size``, group ids of the wrong shape/dtype or out
            of range, or a NaN/inf reward not marked invalid.
    """
    return _group_advantages(rewards, group_size, valid, eps, name="rewards")


def aggregate_advantages(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_size: int | GroupIds,
    valid: Tensor | None = None,
) -> Tensor:
    """Weighted sum of the per-reward group advantages.

    Each reward model is normalised within its groups first and only then combined, so a
    reward on a large scale cannot drown out one on a small scale (the paper aggregates
    advantages, not raw rewards).

    Args:
        rewards: reward name -> (N,) rewards, all the same shape.
        weights: reward name -> weight; every name in ``rewards`` needs one.
        group_size: samples per prompt group (group-major batch), or a ``GroupIds``.
        valid: optional (N,) bool mask shared by all rewards (see ``group_advantages``).

    Returns:
        (N,) combined advantages.
    """
    if not rewards:
        raise ValueError("rewards is empty: pass at least one reward name -> (N,) tensor")
    missing = sorted(name for name in rewards if name not in weights)
    if missing:
        raise ValueError(
            f"no weight for reward(s) {missing}; weights has {sorted(weights)}. "
            f"Give every reward a weight (0 to ignore it)"
        )
    shapes = {name: tuple(r.shape) for name, r in rewards.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"all rewards must have the same shape, got {shapes}")

    total: Tensor | None = None
    for name, r in rewards.items():
        weight = float(weights[name])
        if not math.isfinite(weight):
            raise ValueError(f"weight for reward {name!r} must be finite, got {weight}")
        adv = weight * _group_advantages(r, group_size, valid, 1e-8, name=f"reward {name!r}")
        total = adv if total is None else total + adv
    assert total is not None
    return total


def clip_advantages(adv: Tensor, max_abs: float) -> Tensor:
    """Clamp advantages to ``[-max_abs, max_abs]``."""
    if not max_abs > 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}")
    return adv.clamp(min=-max_abs, max=max_abs)


# --------------------------------------------------------------------------- loss


class ClippedLossOutput(NamedTuple):
    """Result of ``clipped_ratio_loss``.

    ``loss`` carries the gradient; every other field is detached, for logging.
    """

    loss: Tensor  # scalar
    ratio: Tensor  # (M,) exp(logp_new - logp_old)
    clip_fraction: Tensor  # scalar: fraction of elements with |ratio - 1| > clip_range
    ratio_mean: Tensor
    ratio_min: Tensor
    ratio_max: Tensor


# Adapted from DanceGRPO fastvideo/train_grpo_flux.py::train_one_step (Apache-2.0)
def clipped_ratio_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    clip_range: float,
    adv_clip_max: float | None = None,
) -> ClippedLossOutput:
    """PPO/GRPO clipped surrogate loss, averaged over (sample, step) elements.

    Per element: ``max(-A * rho, -A * clip(rho, 1 - clip_range, 1 + clip_range))`` with
    ``rho = exp(logp_new - logp_old)``; A is clamped to ``+-adv_clip_max`` when given.

    Only ``logp_new`` receives gradient; ``logp_old`` and ``advantages`` are detached.
    The arithmetic runs in float32 (or float64) whatever the input dtype, so bf16
    log-probs are upcast before their difference is taken; with equal inputs the ratio is
    exactly 1.

    Args:
        logp_new: (M,) log-probs under the current policy.
        logp_old: (M,) log-probs recorded at rollout time.
        advantages: (M,) advantage of each element's sample (expand per step beforehand).
        clip_range: epsilon of the ratio clip (the paper uses 1e-4).
        adv_clip_max: optional bound on |A| (the paper uses 5).
    """
    for name, t in (("logp_new", logp_new), ("logp_old", logp_old), ("advantages", advantages)):
        _check_1d(t, name)
    if logp_old.shape != logp_new.shape or advantages.shape != logp_new.shape:
        raise ValueError(
            f"logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)} and "
            f"advantages {tuple(advantages.shape)} must have the same shape (M,); expand "
            f"each sample's advantage to its trained steps first"
        )
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")

    dtype = _stat_dtype(torch.promote_types(logp_new.dtype, logp_old.dtype))
    adv = advantages.detach().to(dtype)
    if adv_clip_max is not None:
        adv = clip_advantages(adv, adv_clip_max)

    ratio = torch.exp(logp_new.to(dtype) - logp_old.detach().to(dtype))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()

    r = ratio.detach()
    return ClippedLossOutput(
        loss=loss,
        ratio=r,
        clip_fraction=((r - 1.0).abs() > clip_range).to(dtype).mean(),
        ratio_mean=r.mean(),
        ratio_min=r.min(),
        ratio_max=r.max(),
    )


# Adapted from flow_grpo scripts/train_sd3.py::main (MIT)
def kl_penalty(mean_new: Tensor, mean_ref: Tensor, std: Tensor | float) -> Tensor:
    """KL(N(mean_new, std^2) || N(mean_ref, std^2)) per sample, averaged over elements.

    With a shared std the KL of each element is ``(mean_new - mean_ref)^2 / (2 std^2)``;
    averaging (not summing) over the non-batch dims matches the averaged log-probs.
    ``mean_ref`` comes from the frozen reference policy and is detached.

    Args:
        mean_new: (B, ...) step means under the current policy.
        mean_ref: (B, ...) step means under the reference policy.
        std: scalar (float or 0-d tensor), (B,), or (B, 1, ..., 1) as the step functions
            return it; must be > 0.

    Returns:
        (B,) KL per sample.
    """
    if mean_new.shape != mean_ref.shape:
        raise ValueError(
            f"mean_new {tuple(mean_new.shape)} and mean_ref {tuple(mean_ref.shape)} must match"
        )
    if mean_new.dim() < 1:
        raise ValueError("mean_new must have a batch dimension, got a 0-d tensor")
    dtype = _stat_dtype(mean_new.dtype)
    batch = mean_new.shape[0]
    if isinstance(std, Tensor):
        std_t = std.to(device=mean_new.device, dtype=dtype)
        if std_t.dim() >= 1 and std_t.shape[0] == batch and std_t.numel() == batch:
            std_t = std_t.reshape(batch, *([1] * (mean_new.dim() - 1)))
        elif std_t.dim() != 0:
            raise ValueError(f"std must be a scalar, ({batch},) or ({batch}, 1, ...), got {tuple(std.shape)}")
    else:
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std} (the KL is undefined for eta = 0)")
        std_t = torch.tensor(float(std), dtype=dtype, device=mean_new.device)

    diff = mean_new.to(dtype) - mean_ref.detach().to(dtype)
    per_element = diff.square() / (2.0 * std_t.square())
    return per_element.reshape(batch, -1).mean(dim=1)


# --------------------------------------------------------------------------- sampling helpers


# Adapted from DanceGRPO fastvideo/train_grpo_flux.py::train_one_step (Apache-2.0)
def trained_step_count(num_steps: int, tau: float, rounding: str = "ceil") -> int:
    """How many of ``num_steps`` trainable steps a sample trains on.

    ``rounding="ceil"``: ``ceil(tau * num_steps)``; a float product a hair above an integer
    counts as that integer (0.6 * 25 = 15.000000000000002 gives 15), so a tau below about
    1e-9 / num_steps gives 0 (the config refuses it).
    ``rounding="floor"``: ``int(num_steps * tau)``, exactly the expression of the authors'
    release (``int(len(timesteps) * timestep_fraction)``), float error included (0.29 * 100 =
    28.999999999999996 gives 28 there and here); may be 0.

    Raises ValueError for an unknown rounding.
    """
    if rounding == "ceil":
        return max(0, math.ceil(tau * num_steps - _CEIL_SLACK))
    if rounding == "floor":
        return int(num_steps * tau)
    raise ValueError(f"rounding = {rounding!r} is not allowed: must be 'ceil' or 'floor'")


# Adapted from DanceGRPO fastvideo/train_grpo_flux.py::train_one_step (Apache-2.0)
def subsample_timesteps(
    num_samples: int,
    num_steps: int,
    tau: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    rounding: str = "ceil",
) -> Tensor:
    """Pick ``k = trained_step_count(num_steps, tau, rounding)`` distinct steps per sample to
    train on (``ceil(tau * num_steps)`` by default).

    Each row is an independent uniformly random subset of ``range(num_steps)``, sorted
    ascending.

    Returns:
        (num_samples, k) int64 tensor on ``device``.

    Raises:
        ValueError: tau outside (0, 1], num_steps < 1, or a tau selecting no step.
    """
    if not (0.0 < tau <= 1.0):
        raise ValueError(f"tau (fraction of steps trained) must be in (0, 1], got {tau}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    k = trained_step_count(num_steps, tau, rounding)
    if k == 0:
        chosen = f"floor({tau} * {num_steps})" if rounding == "floor" else f"ceil({tau} * {num_steps})"
        raise ValueError(f"tau = {tau} with {rounding} rounding selects {chosen} = 0 of {num_steps} steps: "
                         f"raise tau to at least {1 / num_steps:.4g}")
    # argsort of iid uniforms is a uniform random permutation per row; keep its first k.
    keys = torch.rand(
        num_samples, num_steps, generator=generator, device=_generated_on(generator, device)
    )
    picked = keys.argsort(dim=1)[:, :k].sort(dim=1).values
    return picked.to(device) if device is not None else picked


# Adapted from DanceGRPO fastvideo/train_grpo_flux.py::sample_reference_model (Apache-2.0)
def shared_group_noise(
    num_groups: int,
    group_size: int,
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise drawn once per group and repeated to all its members.

    Used for the initial latent: all samples of one prompt start from the same noise,
    which the paper shows prevents reward hacking. Noise is drawn in float32 and then
    cast, so a seed gives the same values for every ``dtype``.

    Returns:
        (num_groups * group_size, *shape) tensor, group-major.
    """
    if num_groups < 0 or group_size < 1:
        raise ValueError(
            f"need num_groups >= 0 and group_size >= 1, got {num_groups} and {group_size}"
        )
    shape = tuple(shape)
    noise = torch.randn(
        (num_groups, *shape), generator=generator, device=_generated_on(generator, device),
        dtype=torch.float32,
    )
    noise = noise.to(device=device if device is not None else noise.device, dtype=dtype)
    expanded = noise.unsqueeze(1).expand(num_groups, group_size, *shape)
    return expanded.reshape(num_groups * group_size, *shape)


def initial_noise(
    num_groups: int,
    group_size: int,
    shape: tuple[int, ...] | torch.Size,
    shared: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The initial latents of a rollout batch, group-major: `shared_group_noise` when
    `shared`, else independent standard normal noise per sample (float32)."""
    if shared:
        return shared_group_noise(num_groups, group_size, shape, generator=generator, device=device)
    noise = torch.randn((num_groups * group_size, *tuple(shape)), generator=generator,
                        device=_generated_on(generator, device), dtype=torch.float32)
    return noise.to(device) if device is not None else noise


# Adapted from DanceGRPO fastvideo/train_grpo_hunyuan.py::train_one_step (Apache-2.0)
def best_of_n_indices(rewards: Tensor, group_size: int, keep: int) -> Tensor:
    """Indices of the ``keep`` best and ``keep`` worst samples of every group.

    Within a group, samples are ranked by reward, highest first, ties by position in the
    batch (stable sort); the result holds ranks ``0..keep-1`` then the last ``keep`` ranks,
    in rank order. Groups follow each other, so ``batch[result]`` is itself a group-major
    batch with group size ``2 * keep``.

    Returns:
        (num_groups * 2 * keep,) int64 indices into the flat batch.
    """
    _check_1d(rewards, "rewards")
    num_groups = _num_groups(rewards.numel(), group_size)
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int, got {keep!r}")
    if 2 * keep > group_size:
        raise ValueError(
            f"2 * keep = {2 * keep} exceeds group_size {group_size}: the top and bottom "
            f"{keep} would overlap; use keep <= {group_size // 2}"
        )
    _check_finite_where_valid(rewards, None, "rewards",
                              hint="(best-of-N cannot rank them: drop or re-sample those groups first)")

    r = rewards.detach().to(_stat_dtype(rewards.dtype)).view(num_groups, group_size)
    order = torch.sort(r, dim=1, descending=True, stable=True).indices
    chosen = torch.cat([order[:, :keep], order[:, group_size - keep :]], dim=1)
    offsets = torch.arange(num_groups, device=rewards.device).unsqueeze(1) * group_size
    return (chosen + offsets).reshape(-1)


def binary_reward(rewards: Tensor, threshold: float) -> Tensor:
    """1.0 where ``reward > threshold``, else 0.0; NaN stays NaN so fault handling sees it.

    The comparison runs in float32 (float64 for float64 input) so a bf16 threshold
    rounding cannot flip a decision; the result is float32.
    """
    r = rewards.detach().to(_stat_dtype(rewards.dtype))
    out = (r > threshold).to(torch.float32)
    return torch.where(torch.isnan(r), torch.full_like(out, float("nan")), out)
