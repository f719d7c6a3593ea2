"""The reward protocol: what a reward returns and how a batch is scored.

A reward is a callable `reward(images, prompts)`; images are pixel tensors in [0, 1] on the
generator's device. It returns (B,) scores, or a `RewardOutput(scores, metadata)` (or the
plain tuple; Flow-GRPO's rewards return scores and metadata the same way). Metadata is per
sample: each entry is a (B,) tensor or a list of B items. Evaluation (`metadata_metrics`)
reports every (B,) tensor entry `key` of reward `name` as the mean `<name>_<key>` (e.g. a
rule-based checker's `accuracy`, (B,) bool: every requirement met), and, when the reward also
reports `tag` (B strings: a category per sample, as GenEval tags its prompts by task), the mean
per tag as `<name>_<key>/<tag>`. Training uses the scores only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from ..grpo import binary_reward

log = logging.getLogger(__name__)


class RewardOutput(NamedTuple):
    """What a reward returns when it reports more than its scores.

    scores: (B,) float (or anything `torch.as_tensor` turns into B numbers);
    metadata: per-sample entries, each a (B,) tensor or a list of B items; `tag` (B strings)
    names each sample's category for per-tag evaluation (see the module docstring).
    """

    scores: torch.Tensor
    metadata: dict[str, Any]


RewardFn = Callable[[torch.Tensor, list[str]], "torch.Tensor | RewardOutput"]

#: The metadata key naming each sample's category (GenEval's term for a prompt's task).
TAG = "tag"


def unpack_reward_output(output) -> tuple[Any, dict[str, Any]]:
    """(scores, metadata) of what a reward returned: a `(scores, metadata dict)` pair (a
    RewardOutput is one) as given, anything else as scores with no metadata."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict):
        return output[0], output[1]
    return output, {}


def as_reward_output(output, n: int, device: torch.device) -> RewardOutput:
    """A reward's return value, checked: scores as (n,) float32 on `device`, metadata entries as
    (n,) tensors on `device` or lists of n items.

    `output` is a tensor (or sequence) of scores, or a `(scores, metadata dict)` pair.
    Raises ValueError naming the wrong count or the metadata entry that is not per sample.
    """
    scores, metadata = unpack_reward_output(output)
    scores = torch.as_tensor(scores, device=device).float().reshape(-1)
    if scores.shape[0] != n:
        raise ValueError(f"returned {scores.shape[0]} scores for {n} samples")
    checked = {}
    for key, value in metadata.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            ok = value.dim() == 1 and value.shape[0] == n
        else:
            ok = isinstance(value, (list, tuple)) and len(value) == n
            value = list(value) if ok else value
        if not ok or (key == TAG and not all(isinstance(t, str) for t in value)):
            raise ValueError(f"metadata {key!r} is not per sample: expected a ({n},) tensor or a list of {n} "
                             f"{'strings' if key == TAG else 'items'}, got {_describe(value)}")
        checked[key] = value
    return RewardOutput(scores, checked)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__} of {len(value)}" if hasattr(value, "__len__") else repr(value)


def concat_outputs(parts: list[RewardOutput]) -> RewardOutput:
    """Checked outputs of consecutive chunks of one batch, joined in order (scores and every
    metadata entry). Raises ValueError when the chunks report different metadata keys."""
    keys = [set(part.metadata) for part in parts]
    if any(k != keys[0] for k in keys):
        raise ValueError(f"chunks of one batch report different metadata keys: {[sorted(k) for k in keys]}")
    metadata = {key: torch.cat([p.metadata[key] for p in parts]) if isinstance(parts[0].metadata[key], torch.Tensor)
                else [item for p in parts for item in p.metadata[key]] for key in parts[0].metadata}
    return RewardOutput(torch.cat([p.scores for p in parts]), metadata)


@dataclass
class RewardEntry:
    name: str
    fn: RewardFn
    weight: float = 1.0
    threshold: float | None = None


@dataclass
class RewardScores:
    values: dict[str, torch.Tensor]  # per reward, (N,), after thresholding; NaN where invalid
    valid: torch.Tensor              # (N,) bool: every reward finite for this sample
    faults: dict[str, int] = field(default_factory=dict)  # per reward: samples dropped
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # per reward: its per-sample metadata

    def select(self, rows: torch.Tensor) -> "RewardScores":
        """The scores of `rows` only ((K,) int64 indices or (N,) bool mask): values, validity and
        every metadata entry; fault counts stay those of the scored batch. Reads `rows` to the
        host only when some metadata entry is a list."""
        index = None
        if any(not isinstance(v, torch.Tensor) for entry in self.metadata.values() for v in entry.values()):
            index = rows.nonzero().flatten().tolist() if rows.dtype == torch.bool else rows.tolist()
        metadata = {name: {key: value[rows] if isinstance(value, torch.Tensor) else [value[i] for i in index]
                           for key, value in entry.items()} for name, entry in self.metadata.items()}
        return RewardScores({k: v[rows] for k, v in self.values.items()}, self.valid[rows], dict(self.faults), metadata)


class RewardSet:
    """Scores a batch with every reward; faults are counted, never papered over."""

    def __init__(self, entries: list[RewardEntry]):
        if not entries:
            raise ValueError("at least one reward is needed")
        self.entries = entries

    @property
    def weights(self) -> dict[str, float]:
        return {e.name: e.weight for e in self.entries}

    def score(self, images: torch.Tensor, prompts: list[str]) -> RewardScores:
        """Every reward on a batch: (N, ...) images, N prompts -> RewardScores (values, validity,
        fault counts, each reward's metadata). A reward that raises or returns a wrong count or
        malformed metadata scores NaN for the whole batch (logged, counted as faults)."""
        n = images.shape[0]
        values, faults, metadata = {}, {}, {}
        valid = torch.ones(n, dtype=torch.bool, device=images.device)
        for entry in self.entries:
            try:
                raw, metadata[entry.name] = as_reward_output(entry.fn(images, prompts), n, images.device)
            except Exception as err:  # a broken scorer drops the batch, loudly, instead of killing a long run
                log.error("reward %r failed on a batch of %d: %s", entry.name, n, err)
                raw, metadata[entry.name] = torch.full((n,), float("nan"), device=images.device), {}
            bad = ~torch.isfinite(raw)
            if bad.any():
                log.warning("reward %r: %d of %d samples non-finite; they leave this update",
                            entry.name, int(bad.sum()), n)
            faults[entry.name] = int(bad.sum())
            valid &= ~bad
            values[entry.name] = binary_reward(raw, entry.threshold) if entry.threshold is not None else raw
        return RewardScores(values=values, valid=valid, faults=faults, metadata=metadata)


def metadata_metrics(scores: RewardScores, by_tag: bool = False) -> dict[str, float]:
    """Means of the rewards' per-sample metadata, for evaluation reports.

    For reward `name` and each (B,) tensor entry `key` of its metadata: `<name>_<key>`, the
    mean over the batch (bool entries as 0/1, non-finite values left out; NaN when none is
    finite). With `by_tag` and a `tag` entry: also `<name>_<key>/<tag>`, the mean over the
    samples of that tag, tags in order of first appearance. Reads the values to the host.
    """
    out: dict[str, float] = {}
    for name, metadata in scores.metadata.items():
        measures = {key: value for key, value in metadata.items() if isinstance(value, torch.Tensor)}
        tags = metadata.get(TAG) if by_tag else None
        for key, value in measures.items():
            out[f"{name}_{key}"] = _finite_mean(value)
        if tags is not None:
            rows = {}
            for i, tag in enumerate(tags):
                rows.setdefault(tag, []).append(i)
            for key, value in measures.items():
                for tag, index in rows.items():
                    out[f"{name}_{key}/{tag}"] = _finite_mean(value[torch.tensor(index, device=value.device)])
    return out


def _finite_mean(values: torch.Tensor) -> float:
    """Mean of the finite entries, in float32 (float64 input: float64); NaN when none is finite."""
    values = values.double() if values.dtype == torch.float64 else values.float()
    return values[torch.isfinite(values)].mean().item()
