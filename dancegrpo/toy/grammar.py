"""Prompt grammar of the toy world: five GenEval-style prompt kinds over 4 colours x 3 shapes::

    single_object  "a red circle"
    position       "a red circle on the left" | "... on the right" | "... at the top" | "... at the bottom"
    count          "two red circles" | "three red circles"
    two_objects    "a red circle and a blue square"
    relation       "a red circle left of a blue square" | "right of" | "above" | "below"

`parse_prompt` turns a prompt into a `SceneSpec` (what a scene must contain), `all_prompts`
lists the grammar, `split_prompts` and `balance_by_kind` build the train / held-out sets,
and `PROMPT_SETS` names them for `dancegrpo.data.load_prompts` (`toy:train`, `toy:eval`, ...).
The renderer is `dancegrpo.toy.render`, the checker `dancegrpo.toy.checker`.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable


COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
KINDS: tuple[str, ...] = ("single_object", "position", "count", "two_objects", "relation")
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}
DEFAULT_SIZE = 32

ObjectSpec = tuple[str, str]  # (colour, shape)


@dataclass(frozen=True)
class SceneSpec:
    """A parsed prompt: what a scene must contain.

    `objects` holds one (colour, shape) for single_object / position / count prompts and two
    for two_objects / relation prompts (the relation reads objects[0] <relation> objects[1]).
    `count` is how many copies of the single object a count prompt asks for (1 otherwise).
    """

    kind: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    position: str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown scene kind {self.kind!r}; expected one of {KINDS}")
        for colour, shape in self.objects:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"unknown object ({colour!r}, {shape!r}); colours are {tuple(COLOURS)}, "
                                 f"shapes are {SHAPES}")
        n_objects = 2 if self.kind in ("two_objects", "relation") else 1
        if len(self.objects) != n_objects:
            raise ValueError(f"a {self.kind} scene needs {n_objects} object(s), got {self.objects}")
        if n_objects == 2 and self.objects[0] == self.objects[1]:
            raise ValueError(f"the two objects of a {self.kind} scene must differ in colour or shape, "
                             f"got {self.objects[0]} twice")
        if self.kind == "count" and self.count not in COUNT_WORDS:
            raise ValueError(f"count must be one of {tuple(COUNT_WORDS)}, got {self.count}")
        if self.kind != "count" and self.count != 1:
            raise ValueError(f"count={self.count} is only meaningful for kind='count', not {self.kind!r}")
        if (self.kind == "position") != (self.position is not None) or (
                self.position is not None and self.position not in POSITION_PHRASES):
            raise ValueError(f"position {self.position!r} does not fit kind {self.kind!r}; position scenes "
                             f"need one of {tuple(POSITION_PHRASES)}, other kinds None")
        if (self.kind == "relation") != (self.relation is not None) or (
                self.relation is not None and self.relation not in RELATIONS):
            raise ValueError(f"relation {self.relation!r} does not fit kind {self.kind!r}; relation scenes "
                             f"need one of {RELATIONS}, other kinds None")

    @property
    def prompt(self) -> str:
        """The canonical prompt text of this scene (inverse of `parse_prompt`)."""
        first = _object_phrase(self.objects[0])
        if self.kind == "single_object":
            return first
        if self.kind == "position":
            return f"{first} {POSITION_PHRASES[self.position]}"
        if self.kind == "count":
            colour, shape = self.objects[0]
            return f"{COUNT_WORDS[self.count]} {colour} {shape}s"
        second = _object_phrase(self.objects[1])
        if self.kind == "two_objects":
            return f"{first} and {second}"
        return f"{first} {self.relation} {second}"


def _object_phrase(obj: ObjectSpec) -> str:
    return f"a {obj[0]} {obj[1]}"


def all_specs() -> list[SceneSpec]:
    """Every scene of the grammar, in the deterministic order of `all_prompts`."""
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    pairs = [(a, b) for a in objects for b in objects if a != b]
    specs = [SceneSpec("single_object", (o,)) for o in objects]
    specs += [SceneSpec("position", (o,), position=p) for o in objects for p in POSITION_PHRASES]
    specs += [SceneSpec("count", (o,), count=n) for o in objects for n in COUNT_WORDS]
    specs += [SceneSpec("two_objects", pair) for pair in pairs]
    specs += [SceneSpec("relation", pair, relation=r) for pair in pairs for r in RELATIONS]
    return specs


def all_prompts() -> list[str]:
    """Every prompt of the grammar (744 of them), in a deterministic order grouped by kind."""
    return [spec.prompt for spec in all_specs()]


_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_OBJECT_RE = rf"an? ({_COLOUR_RE}) ({_SHAPE_RE})"
_POSITION_BY_PHRASE = {phrase: name for name, phrase in POSITION_PHRASES.items()}
_COUNT_BY_WORD = {word: n for n, word in COUNT_WORDS.items()}
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("single_object", re.compile(rf"{_OBJECT_RE}")),
    ("position", re.compile(rf"{_OBJECT_RE} ({'|'.join(_POSITION_BY_PHRASE)})")),
    ("count", re.compile(rf"({'|'.join(_COUNT_BY_WORD)}) ({_COLOUR_RE}) ({_SHAPE_RE})s")),
    ("two_objects", re.compile(rf"{_OBJECT_RE} and {_OBJECT_RE}")),
    ("relation", re.compile(rf"{_OBJECT_RE} ({'|'.join(RELATIONS)}) {_OBJECT_RE}")),
]
_ACCEPTED = (
    f"colour = {'|'.join(COLOURS)}, shape = {'|'.join(SHAPES)}; accepted prompts: "
    f"'a <colour> <shape>', 'a <colour> <shape> {'|'.join(_POSITION_BY_PHRASE)}', "
    f"'{'|'.join(_COUNT_BY_WORD)} <colour> <shape>s', 'a <colour> <shape> and a <colour> <shape>', "
    f"'a <colour> <shape> {'|'.join(RELATIONS)} a <colour> <shape>'"
)


def parse_prompt(text: str) -> SceneSpec:
    """Parse a prompt of the toy grammar (case and extra whitespace are ignored).

    Raises ValueError naming the prompt and listing the accepted patterns when it does not fit.
    """
    try:
        return _parse_normalised(" ".join(str(text).lower().split()).rstrip("."))
    except ValueError as err:
        raise ValueError(f"prompt {text!r} {err}") from None


@lru_cache(maxsize=4096)
def _parse_normalised(text: str) -> SceneSpec:
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groups()
        try:
            if kind == "single_object":
                return SceneSpec(kind, ((g[0], g[1]),))
            if kind == "position":
                return SceneSpec(kind, ((g[0], g[1]),), position=_POSITION_BY_PHRASE[g[2]])
            if kind == "count":
                return SceneSpec(kind, ((g[1], g[2]),), count=_COUNT_BY_WORD[g[0]])
            if kind == "two_objects":
                return SceneSpec(kind, ((g[0], g[1]), (g[2], g[3])))
            return SceneSpec(kind, ((g[0], g[1]), (g[3], g[4])), relation=g[2])
        except ValueError as err:
            raise ValueError(f"is not a valid toy scene: {err}") from None
    raise ValueError(f"does not fit the toy grammar; {_ACCEPTED}")


def split_prompts(eval_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic disjoint (train, eval) split of `all_prompts()`, stratified by kind.

    Within each kind, prompts are ranked by a SHA-256 hash of (seed, prompt) — stable across
    processes, unlike the salted built-in `hash` — and the lowest `eval_fraction` go to eval
    (at least one per kind, and at least one left for training). Both lists keep the
    `all_prompts` order.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    specs = all_specs()
    eval_set: set[str] = set()
    for kind in KINDS:
        prompts = [s.prompt for s in specs if s.kind == kind]
        ranked = sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
        n_eval = min(max(1, round(eval_fraction * len(prompts))), len(prompts) - 1)
        eval_set.update(ranked[:n_eval])
    ordered = [s.prompt for s in specs]
    return [p for p in ordered if p not in eval_set], [p for p in ordered if p in eval_set]


def balance_by_kind(prompts: list[str], per_kind: int | None = None, seed: int = 0) -> list[str]:
    """The prompts re-weighted so that every kind present has `per_kind` entries.

    The grammar is lopsided (relations are 71% of it, single objects 2%), so a uniform draw
    over prompts almost never asks for a single object or a position. GenEval weights its
    tasks equally; so do we: each kind's prompts, in a fixed hash order, are cycled (repeated
    when the kind has fewer than `per_kind`, cut when it has more) and the kinds interleaved.
    `per_kind` None = the largest kind's size, so nothing is cut.
    """
    by_kind: dict[str, list[str]] = {}
    for prompt in prompts:
        by_kind.setdefault(parse_prompt(prompt).kind, []).append(prompt)
    if not by_kind:
        raise ValueError("balance_by_kind: no prompts given")
    if per_kind is None:
        per_kind = max(len(group) for group in by_kind.values())
    if per_kind < 1:
        raise ValueError(f"per_kind must be >= 1, got {per_kind}")
    groups = [sorted(by_kind[kind], key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
              for kind in KINDS if kind in by_kind]
    # Round-robin over kinds, so every prefix of the list (eval_num_prompts) is balanced too.
    return [group[i % len(group)] for i in range(per_kind) for group in groups]



# --------------------------------------------------------------------------- builtin prompt sets

# Samples per prompt kind in the held-out set: 5 kinds x 48 = 240 samples, so its accuracy is
# GenEval's overall score (the mean over kinds), not a relation score in disguise.
TOY_EVAL_PER_KIND = 48


def train_prompts() -> list[str]:
    """`toy:train`: the training split, kind-balanced (every kind as often as the largest)."""
    return balance_by_kind(split_prompts()[0])


def eval_prompts() -> list[str]:
    """`toy:eval`: the held-out split, TOY_EVAL_PER_KIND samples per kind (small kinds repeat,
    each repeat a new seed); every prefix is balanced too."""
    return balance_by_kind(split_prompts()[1], TOY_EVAL_PER_KIND)


def eval_all_prompts() -> list[str]:
    """`toy:eval_all`: every held-out prompt once."""
    return split_prompts()[1]


#: The toy world's builtin prompt sets, `toy:<name>` in `dancegrpo.data.load_prompts`.
PROMPT_SETS: dict[str, Callable[[], list[str]]] = {
    "train": train_prompts,
    "eval": eval_prompts,
    "eval_all": eval_all_prompts,
    "all": all_prompts,
}
