"""GenEval-like checker of the toy world, and the reward built on it.

`check` scores images against prompts from the detector's blobs (`dancegrpo.toy.detect`):
every object present, positions, relations and exact counts. `ToyGenEvalReward` is the
reward for RL; it reports the strict accuracy and each prompt's kind as reward metadata
(see `dancegrpo.rewards.RewardOutput`), which evaluation averages overall and per kind.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from ..rewards.protocol import RewardOutput
from .detect import Detection, detect_objects
from .grammar import SHAPES, SceneSpec, parse_prompt

POSITION_THRESHOLDS = (0.45, 0.55)  # "left": cx < 0.45, "right": cx > 0.55; same for top / bottom
RELATION_MARGIN = 0.05  # "a left of b": cx_a < cx_b - margin and |dx| > |dy|


@dataclass(frozen=True)
class CheckResult:
    """`score` (B,) float: fraction of the prompt's requirements met; `correct` (B,) bool: all met."""

    score: Tensor
    correct: Tensor
    detections: list[list[Detection]]


def _position_holds(position: str, det: Detection) -> bool:
    lo, hi = POSITION_THRESHOLDS
    return {"left": det.cx < lo, "right": det.cx > hi, "top": det.cy < lo, "bottom": det.cy > hi}[position]


def _relation_holds(relation: str, a: Detection, b: Detection) -> bool:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    m = RELATION_MARGIN
    horizontal, vertical = abs(dx) > abs(dy), abs(dy) > abs(dx)
    return {"left of": horizontal and dx < -m, "right of": horizontal and dx > m,
            "above": vertical and dy < -m, "below": vertical and dy > m}[relation]


def requirements(spec: SceneSpec, detections: list[Detection]) -> list[bool]:
    """The prompt's atomic requirements, each True when met by the detections of one image.

    Every object must be present; a position / relation must hold for the largest detection
    of each object (GenEval uses its most confident one); a count must be exact for that
    colour and shape. Other objects in the image are allowed.
    """
    matches = [sorted((d for d in detections if (d.colour, d.shape) == obj), key=lambda d: -d.area)
               for obj in spec.objects]
    met = [bool(m) for m in matches]
    if spec.kind == "position":
        met.append(bool(matches[0]) and _position_holds(spec.position, matches[0][0]))
    elif spec.kind == "count":
        met.append(len(matches[0]) == spec.count)
    elif spec.kind == "relation":
        met.append(all(matches) and _relation_holds(spec.relation, matches[0][0], matches[1][0]))
    return met


def soft_requirements(spec: SceneSpec, detections: list[Detection]) -> list[float]:
    """Graded version of `requirements` for use as an RL reward (never for accuracy).

    An object requirement is 1 for a hard match, else the best shape likeness among blobs of
    the right colour; position and relation requirements use the best such blob and are
    scaled by its likeness; counts stay exact. Equals `requirements` wherever that is met.
    """
    def likeness(d: Detection, shape: str) -> float:
        return 1.0 if d.shape == shape else (d.similarity[SHAPES.index(shape)] if d.similarity else 0.0)

    best = []
    for colour, shape in spec.objects:
        candidates = [d for d in detections if d.colour == colour]
        best.append(max(candidates, key=lambda d: (likeness(d, shape), d.area)) if candidates else None)
    met = [likeness(d, shape) if d else 0.0 for d, (_, shape) in zip(best, spec.objects)]
    if spec.kind == "position":
        met.append(met[0] * _position_holds(spec.position, best[0]) if best[0] else 0.0)
    elif spec.kind == "count":
        met.append(float(sum(d.colour == spec.objects[0][0] and d.shape == spec.objects[0][1]
                             for d in detections) == spec.count))
    elif spec.kind == "relation":
        met.append(min(met) * _relation_holds(spec.relation, best[0], best[1]) if all(best) else 0.0)
    hard = requirements(spec, detections)
    return [1.0 if h else m for h, m in zip(hard, met)]


def unrequested_objects(spec: SceneSpec, detections: list[Detection]) -> int:
    """How many detections exceed what the prompt asks for, colour by colour.

    A prompt asking for two red objects allows two red detections; a third red one, or any
    detection of a colour it does not name, is clutter. GenEval's accuracy ignores clutter
    (except through counts), so a policy can learn to scatter extra blobs to raise its odds
    of drawing the asked-for one; this count lets a training reward refuse that trade.
    """
    asked = Counter(colour for colour, _ in spec.objects for _ in range(spec.count))
    return sum((Counter(d.colour for d in detections) - asked).values())  # Counter "-" keeps the excess only


def check(images: Tensor, prompts: list[str]) -> CheckResult:
    """Score a (B, 3, H, W) batch in [0, 1] against one prompt per image (GenEval-style).

    `score` is the fraction of each prompt's requirements met (partial credit), `correct`
    whether all are. Results are on the CPU.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    specs = [parse_prompt(p) for p in prompts]
    detections = detect_objects(images)
    met = [requirements(spec, dets) for spec, dets in zip(specs, detections)]
    score = torch.tensor([sum(m) / len(m) for m in met], dtype=torch.float32)
    correct = torch.tensor([all(m) for m in met], dtype=torch.bool)
    return CheckResult(score=score, correct=correct, detections=detections)


class ToyGenEvalReward:
    """Rule-based reward for the toy world: fraction of prompt requirements met, in [0, 1].

    With `soft_shapes=True` the reward gives graded credit for shape likeness (see
    `soft_requirements`): a denser learning signal for RL on a generator that draws blobs.
    With `clutter_penalty=c > 0`, each detection beyond what the prompt asks for (see
    `unrequested_objects`) subtracts c, so the reward can go below 0.

    Returns a `RewardOutput`: the scores, and as metadata `accuracy` ((B,) bool, the strict
    GenEval-style check whatever the options) and `tag` (each prompt's kind, from KINDS),
    which evaluation reports as `toy_geneval_accuracy` and `toy_geneval_accuracy/<kind>`.
    """

    name = "toy_geneval"

    def __init__(self, soft_shapes: bool = False, clutter_penalty: float = 0.0):
        if not clutter_penalty >= 0:
            raise ValueError(f"clutter_penalty = {clutter_penalty!r} must be >= 0 (0 turns it off)")
        self.soft_shapes = soft_shapes
        self.clutter_penalty = float(clutter_penalty)

    def __call__(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        """(B, 3, H, W) images (clamped to [0, 1]) and B prompts -> (B,) float32 scores on the
        images' device, with metadata `accuracy` ((B,) bool, same device) and `tag` (B kinds)."""
        result = check(images, prompts)
        specs = [parse_prompt(p) for p in prompts]
        if self.soft_shapes:
            soft = [soft_requirements(spec, dets) for spec, dets in zip(specs, result.detections)]
            score = torch.tensor([sum(m) / len(m) for m in soft], dtype=torch.float32)
        else:
            score = result.score
        if self.clutter_penalty:
            extras = torch.tensor([unrequested_objects(spec, dets) for spec, dets in zip(specs, result.detections)],
                                  dtype=torch.float32)
            score = score - self.clutter_penalty * extras
        metadata = {"accuracy": result.correct.to(images.device), "tag": [spec.kind for spec in specs]}
        return RewardOutput(score.to(images.device), metadata)
