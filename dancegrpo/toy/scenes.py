"""Toy world of coloured shapes: prompt grammar, scene renderer and a GenEval-like checker.

The grammar has five GenEval-style prompt kinds over 4 colours x 3 shapes::

    single_object  "a red circle"
    position       "a red circle on the left" | "... on the right" | "... at the top" | "... at the bottom"
    count          "two red circles" | "three red circles"
    two_objects    "a red circle and a blue square"
    relation       "a red circle left of a blue square" | "right of" | "above" | "below"

`render` draws a random scene satisfying a prompt (the ground truth the toy generator is
pretrained on); `check` detects shapes in images and scores them against prompts, and
`ToyGenEvalReward` wraps it as a reward for RL. Images are RGB floats in [0, 1] on a black
background; coordinates are in pixels for the renderer and in [0, 1] (x right, y down)
for detections.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------- grammar

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


# --------------------------------------------------------------------------- renderer
# Geometry as fractions of the image size S (at S=32: objects 9-12 px, 1 px border, 2 px gap).

OBJECT_SIZE_RANGE = (9 / 32, 12 / 32)  # side of squares, diameter of circles, base = height of triangles
BORDER = 1 / 32  # free margin kept between every object and the image edge
MIN_GAP = 2 / 32  # free gap between object bounding boxes, so blobs never touch after anti-aliasing
RENDER_POSITION_LIMIT = 0.4  # "left": centre x < 0.4 S, "right": > 0.6 S, same for top / bottom
RENDER_RELATION_OFFSET = 0.2  # "a left of b": centre of a at least 0.2 S left of b ...
RENDER_RELATION_CROSS = 0.1  # ... and within 0.1 S of b vertically (objects roughly in a row)
SUPERSAMPLING = 4
_CANDIDATES_PER_DRAW = 32
_MAX_DRAWS = 200
_RASTER_CHUNK_PIXELS = 2**21


@dataclass(frozen=True)
class PlacedObject:
    """One object of a rendered layout; (cx, cy) is its centre of mass, in pixels."""

    colour: str
    shape: str
    size: float
    cx: float
    cy: float


def _extents(shapes: list[str], sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-width, extent above and extent below the centre of mass, for each object."""
    is_triangle = np.array([s == "triangle" for s in shapes])
    # An upright triangle's centroid sits 2/3 of the way down from its apex.
    up = np.where(is_triangle, sizes * 2 / 3, sizes / 2)
    down = np.where(is_triangle, sizes / 3, sizes / 2)
    return sizes / 2, up, down


def sample_layout(spec: SceneSpec, generator: torch.Generator, size: int = DEFAULT_SIZE) -> list[PlacedObject]:
    """Sample object sizes and centres satisfying `spec`, by rejection in vectorised blocks.

    Objects keep a border from the image edge and a gap from each other; position and
    relation constraints hold on centres of mass with a clear margin over the checker's
    thresholds.
    """
    objects = list(spec.objects) * spec.count
    shapes = [shape for _, shape in objects]
    n = len(objects)
    lo, hi = OBJECT_SIZE_RANGE[0] * size, OBJECT_SIZE_RANGE[1] * size
    border, gap = BORDER * size, MIN_GAP * size
    for _ in range(_MAX_DRAWS):
        u = torch.rand(_CANDIDATES_PER_DRAW, n, 3, generator=generator, dtype=torch.float64).numpy()
        sizes = lo + u[..., 0] * (hi - lo)
        half_w, up, down = _extents(shapes, sizes)
        cx = border + half_w + u[..., 1] * (size - 2 * border - 2 * half_w)
        cy = border + up + u[..., 2] * (size - 2 * border - up - down)
        x0, x1, y0, y1 = cx - half_w, cx + half_w, cy - up, cy + down
        ok = np.ones(_CANDIDATES_PER_DRAW, dtype=bool)
        for i in range(n):
            for j in range(i + 1, n):
                ok &= ((x0[:, j] - x1[:, i] >= gap) | (x0[:, i] - x1[:, j] >= gap)
                       | (y0[:, j] - y1[:, i] >= gap) | (y0[:, i] - y1[:, j] >= gap))
        if spec.position is not None:
            ok &= _render_position_ok(spec.position, cx[:, 0] / size, cy[:, 0] / size)
        if spec.relation is not None:
            ok &= _render_relation_ok(spec.relation, (cx[:, 0] - cx[:, 1]) / size, (cy[:, 0] - cy[:, 1]) / size)
        hits = np.flatnonzero(ok)
        if hits.size:
            k = hits[0]
            return [PlacedObject(c, s, float(sizes[k, i]), float(cx[k, i]), float(cy[k, i]))
                    for i, (c, s) in enumerate(objects)]
    raise RuntimeError(f"could not place {spec.prompt!r} on a {size}x{size} canvas; the image size is too small")


def _render_position_ok(position: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    limit = RENDER_POSITION_LIMIT
    return {"left": x < limit, "right": x > 1 - limit, "top": y < limit, "bottom": y > 1 - limit}[position]


def _render_relation_ok(relation: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dx, dy: centre of the first object minus centre of the second, as fractions of S."""
    far, near = RENDER_RELATION_OFFSET, RENDER_RELATION_CROSS
    row, column = np.abs(dy) <= near, np.abs(dx) <= near
    return {"left of": row & (dx <= -far), "right of": row & (dx >= far),
            "above": column & (dy <= -far), "below": column & (dy >= far)}[relation]


def rasterise(layouts: list[list[PlacedObject]], size: int = DEFAULT_SIZE) -> Tensor:
    """Draw layouts into a (B, 3, size, size) batch with SUPERSAMPLING^2 samples per pixel."""
    flat = [(b, obj) for b, layout in enumerate(layouts) for obj in layout]
    images = torch.zeros(len(layouts), 3, size, size)
    # Chunks bound the supersampled masks' memory (they are SUPERSAMPLING^2 x the image size).
    chunk = max(1, _RASTER_CHUNK_PIXELS // (size * SUPERSAMPLING) ** 2)
    for start in range(0, len(flat), chunk):
        _draw_objects(images, flat[start:start + chunk])
    return images.clamp_(0.0, 1.0)


def _draw_objects(images: Tensor, flat: list[tuple[int, PlacedObject]]) -> None:
    """Add the anti-aliased coverage of each (batch index, object) to `images`, in place."""
    size = images.shape[-1]
    batch_index = torch.tensor([b for b, _ in flat])
    params = torch.tensor([[o.cx, o.cy, o.size] for _, o in flat]).view(-1, 3, 1, 1)
    cx, cy, side = params[:, 0], params[:, 1], params[:, 2]
    shape_index = torch.tensor([SHAPES.index(o.shape) for _, o in flat]).view(-1, 1, 1)
    colour = torch.tensor([COLOURS[o.colour] for _, o in flat])
    # Sample points at the centres of the sub-pixels, in output-pixel units.
    grid = (torch.arange(size * SUPERSAMPLING) + 0.5) / SUPERSAMPLING
    dx, dy = grid.view(1, 1, -1) - cx, grid.view(1, -1, 1) - cy
    half = side / 2
    circle = dx.square() + dy.square() <= half.square()
    square = (dx.abs() <= half) & (dy.abs() <= half)
    depth = (dy + side * 2 / 3) / side  # 0 at the apex, 1 at the base
    triangle = (depth >= 0) & (depth <= 1) & (dx.abs() <= depth * half)
    mask = torch.where(shape_index == 0, circle, torch.where(shape_index == 1, square, triangle))
    coverage = F.avg_pool2d(mask.unsqueeze(1).float(), SUPERSAMPLING)  # (N, 1, S, S)
    images.index_add_(0, batch_index, coverage * colour.view(-1, 3, 1, 1))


def render(spec: SceneSpec | str, generator: torch.Generator, size: int = DEFAULT_SIZE) -> Tensor:
    """Draw one random scene satisfying `spec` (or a prompt): a (3, size, size) tensor in [0, 1]."""
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    return rasterise([sample_layout(spec, generator, size)], size)[0]


def render_batch(prompts: list[str], generator: torch.Generator, size: int = DEFAULT_SIZE) -> Tensor:
    """Draw one random scene per prompt: a (B, 3, size, size) tensor in [0, 1]."""
    return rasterise([sample_layout(parse_prompt(p), generator, size) for p in prompts], size)


# --------------------------------------------------------------------------- checker

MIN_BRIGHTNESS = 0.3  # a pixel is foreground when its brightest channel exceeds this ...
MAX_CHROMA_DISTANCE = 0.35  # ... and its hue (colour / brightness) is this close to a palette colour
MIN_AREA_FRACTION = 8 / 32**2  # smaller components are noise (8 px at 32x32)
MIN_SHAPE_AREA_FRACTION = 24 / 32**2  # fill ratios of smaller blobs are pixel noise (rendered shapes are >= 40 px)
MAX_EXTENT_FRACTION = 0.75  # blobs spanning more of the image than this are not shapes
MIN_ASPECT = 0.6  # horizontal / vertical spread of a recognisable shape (1 / MIN_ASPECT at most)
# Shape rules, tuned on rendered ground truth, also blurred (Gaussian sigma <= 1 px) and with
# added pixel noise (std 0.05) as a stand-in for generator output. "Profile fill" = heaviest
# column's mass x heaviest row's mass / total mass: 1 for axis-aligned squares (measured
# 1.00-1.11), 4/pi for circles (1.15-1.33), 2 for sharp upright triangles with base = height
# (1.2-1.87 once blurred). The vertical skewness of the mass separates triangles (-0.62 to
# -0.37) from circles and squares (within +-0.06).
SQUARE_MAX_PROFILE_FILL = 1.13
CIRCLE_MAX_PROFILE_FILL = 1.5
TRIANGLE_PROFILE_FILL_RANGE = (1.15, 2.6)
MAX_SYMMETRIC_SKEW = 0.15
TRIANGLE_MAX_SKEW = -0.25
POSITION_THRESHOLDS = (0.45, 0.55)  # "left": cx < 0.45, "right": cx > 0.55; same for top / bottom
RELATION_MARGIN = 0.05  # "a left of b": cx_a < cx_b - margin and |dx| > |dy|
# Graded shape likeness for the soft reward: a Gaussian bump around each shape's prototype
# (profile fill, vertical skew), so a blob that is "more circle-like" scores higher even
# before it crosses the hard classification threshold.
SHAPE_PROTOTYPES = {"circle": (4 / 3.14159, 0.0), "square": (1.0, 0.0), "triangle": (1.6, -0.5)}
SHAPE_SIMILARITY_SCALE = (0.12, 0.2)

_PALETTE = torch.tensor(list(COLOURS.values()))
_COLOUR_NAMES = tuple(COLOURS)
_DETECT_CHUNK = 256


@dataclass(frozen=True)
class Detection:
    """A connected blob of one palette colour.

    `shape` is None when the blob fits no shape (noise, smears, background-sized fills).
    (cx, cy) is its centre of mass in [0, 1] image coordinates (x right, y down); `area` is
    its pixel count.
    """

    colour: str
    shape: str | None
    cx: float
    cy: float
    area: int
    similarity: tuple[float, ...] = ()  # graded likeness to each of SHAPES, in [0, 1] (0 if implausible)


@dataclass(frozen=True)
class CheckResult:
    """`score` (B,) float: fraction of the prompt's requirements met; `correct` (B,) bool: all met."""

    score: Tensor
    correct: Tensor
    detections: list[list[Detection]]


def classify_pixels(images: Tensor) -> Tensor:
    """Map each pixel of (B, 3, H, W) images to a palette index (B, H, W), -1 for background."""
    brightness = images.amax(dim=1)
    hue = images / brightness.clamp_min(1e-6).unsqueeze(1)
    distance = (hue.unsqueeze(1) - _PALETTE.view(1, -1, 3, 1, 1)).square().sum(dim=2)  # (B, P, H, W)
    best_distance, best = distance.min(dim=1)
    foreground = (brightness > MIN_BRIGHTNESS) & (best_distance < MAX_CHROMA_DISTANCE)
    return torch.where(foreground, best, torch.full_like(best, -1))


def label_components(colour_map: Tensor) -> Tensor:
    """4-connected components of equal non-negative values in a (B, H, W) map.

    Returns (B, H, W) int64 labels, 0 on background; each component is labelled with the
    largest flat index (+1) among its pixels, so labels are unique across the batch. Labels
    grow by neighbour-max propagation combined with pointer jumping (a pixel adopts the
    label of the pixel its label points at), which converges in a few dozen sweeps.
    """
    b, h, w = colour_map.shape
    foreground = colour_map >= 0
    ids = torch.arange(1, b * h * w + 1).view(b, h, w)
    labels = torch.where(foreground, ids, torch.zeros_like(ids))
    joined_h = foreground[:, :, 1:] & (colour_map[:, :, 1:] == colour_map[:, :, :-1])
    joined_v = foreground[:, 1:, :] & (colour_map[:, 1:, :] == colour_map[:, :-1, :])
    zero = torch.zeros((), dtype=labels.dtype)
    pad = torch.zeros(1, dtype=labels.dtype)
    for _ in range(h * w):
        new = labels.clone()
        new[:, :, 1:] = torch.maximum(new[:, :, 1:], torch.where(joined_h, new[:, :, :-1], zero))
        new[:, :, :-1] = torch.maximum(new[:, :, :-1], torch.where(joined_h, new[:, :, 1:], zero))
        new[:, 1:, :] = torch.maximum(new[:, 1:, :], torch.where(joined_v, new[:, :-1, :], zero))
        new[:, :-1, :] = torch.maximum(new[:, :-1, :], torch.where(joined_v, new[:, 1:, :], zero))
        # Pointer jumping: label L names pixel L-1, whose own label is >= L and in the same component.
        new = torch.cat([pad, new.view(-1)])[new.view(-1)].view(b, h, w)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


@dataclass(frozen=True)
class ComponentFeatures:
    """Per-component statistics of one batch chunk (K components), from `component_features`."""

    image: Tensor  # (K,) batch index
    colour: Tensor  # (K,) palette index
    area: Tensor  # (K,) pixel count
    cx: Tensor  # (K,) intensity-weighted centre, in [0, 1]
    cy: Tensor
    profile_fill: Tensor  # (K,) max column mass * max row mass / mass: square 1, circle 4/pi, triangle 2
    skew_y: Tensor  # (K,) vertical skewness of the mass: 0 when symmetric, < 0 for upright triangles
    aspect: Tensor  # (K,) horizontal / vertical spread (standard deviations)
    extent: Tensor  # (K,) larger side of the bounding box, as a fraction of the image side


def component_features(images: Tensor, colour_map: Tensor, labels: Tensor) -> ComponentFeatures:
    """Shape statistics of every labelled component, weighted by pixel brightness.

    Soft (intensity-weighted) statistics rather than thresholded bounding boxes, so that one
    stray edge pixel of a noisy image does not change a square into a circle.
    """
    h, w = images.shape[-2:]
    foreground = labels > 0
    _, ys, xs = foreground.nonzero(as_tuple=True)
    roots, component = torch.unique(labels[foreground], return_inverse=True)
    k = roots.numel()
    weight = images.amax(dim=1)[foreground]
    area = torch.zeros(k).index_add_(0, component, torch.ones_like(weight))
    mass = torch.zeros(k).index_add_(0, component, weight)
    x, y = xs.float() + 0.5, ys.float() + 0.5
    mean_x = torch.zeros(k).index_add_(0, component, weight * x) / mass
    mean_y = torch.zeros(k).index_add_(0, component, weight * y) / mass
    dx, dy = x - mean_x[component], y - mean_y[component]
    var_x = torch.zeros(k).index_add_(0, component, weight * dx.square()) / mass
    var_y = torch.zeros(k).index_add_(0, component, weight * dy.square()) / mass
    third_y = torch.zeros(k).index_add_(0, component, weight * dy.pow(3)) / mass
    column_mass = torch.zeros(k * w).index_add_(0, component * w + xs, weight).view(k, w)
    row_mass = torch.zeros(k * h).index_add_(0, component * h + ys, weight).view(k, h)
    # Components are connected, so the columns (rows) holding mass form their bounding box.
    box_w, box_h = (column_mass > 0).sum(1), (row_mass > 0).sum(1)
    return ComponentFeatures(
        image=(roots - 1) // (h * w),
        colour=colour_map.view(-1)[roots - 1],
        area=area,
        cx=mean_x / w,
        cy=mean_y / h,
        profile_fill=column_mass.amax(1) * row_mass.amax(1) / mass,
        skew_y=third_y / var_y.clamp_min(1e-6).pow(1.5),
        aspect=(var_x / var_y.clamp_min(1e-6)).sqrt(),
        extent=torch.maximum(box_w / w, box_h / h),
    )


def _classify_shapes(f: ComponentFeatures, image_area: int) -> list[str | None]:
    """Shape name per component from its profile fill and vertical skew; None if none fits."""
    plausible = ((f.area >= MIN_SHAPE_AREA_FRACTION * image_area) & (f.aspect >= MIN_ASPECT)
                 & (f.aspect <= 1 / MIN_ASPECT) & (f.extent <= MAX_EXTENT_FRACTION))
    symmetric = f.skew_y.abs() <= MAX_SYMMETRIC_SKEW
    square = plausible & symmetric & (f.profile_fill < SQUARE_MAX_PROFILE_FILL)
    circle = (plausible & symmetric & (f.profile_fill >= SQUARE_MAX_PROFILE_FILL)
              & (f.profile_fill < CIRCLE_MAX_PROFILE_FILL))
    triangle = (plausible & (f.skew_y <= TRIANGLE_MAX_SKEW) & (f.profile_fill >= TRIANGLE_PROFILE_FILL_RANGE[0])
                & (f.profile_fill <= TRIANGLE_PROFILE_FILL_RANGE[1]))
    return ["square" if s else "circle" if c else "triangle" if t else None
            for s, c, t in zip(square.tolist(), circle.tolist(), triangle.tolist())]


def _shape_similarity(f: ComponentFeatures, image_area: int) -> Tensor:
    """(K, len(SHAPES)) graded likeness of each component to each shape's prototype."""
    plausible = ((f.area >= MIN_SHAPE_AREA_FRACTION * image_area) & (f.aspect >= MIN_ASPECT)
                 & (f.aspect <= 1 / MIN_ASPECT) & (f.extent <= MAX_EXTENT_FRACTION))
    fill_scale, skew_scale = SHAPE_SIMILARITY_SCALE
    columns = []
    for shape in SHAPES:
        fill0, skew0 = SHAPE_PROTOTYPES[shape]
        z = ((f.profile_fill - fill0) / fill_scale).square() + ((f.skew_y - skew0) / skew_scale).square()
        columns.append(torch.exp(-0.5 * z))
    return torch.stack(columns, dim=1) * plausible.unsqueeze(1)


def detect_objects(images: Tensor) -> list[list[Detection]]:
    """Find coloured shapes in a (B, 3, H, W) batch in [0, 1] (clamped; moved to CPU).

    Pixels are assigned to the nearest palette colour when bright and close enough in hue,
    grouped into 4-connected same-colour components, components smaller than
    MIN_AREA_FRACTION of the image are dropped, and each remaining one is classified as a
    shape from brightness-weighted statistics (see `component_features`).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    images = images.detach().to("cpu", torch.float32).clamp(0.0, 1.0)
    # Large batches go in chunks: label propagation runs until the slowest component of the
    # whole chunk converges, and small working sets stay in cache.
    return [dets for start in range(0, images.shape[0], _DETECT_CHUNK)
            for dets in _detect_chunk(images[start:start + _DETECT_CHUNK])]


def _detect_chunk(images: Tensor) -> list[list[Detection]]:
    b, _, h, w = images.shape
    colour_map = classify_pixels(images)
    f = component_features(images, colour_map, label_components(colour_map))
    shapes = _classify_shapes(f, h * w)
    similarity = _shape_similarity(f, h * w).tolist()
    keep = (f.area >= MIN_AREA_FRACTION * h * w).tolist()
    detections: list[list[Detection]] = [[] for _ in range(b)]
    for i, (owner, colour, cx, cy, area) in enumerate(zip(f.image.tolist(), f.colour.tolist(), f.cx.tolist(),
                                                          f.cy.tolist(), f.area.tolist())):
        if keep[i]:
            detections[owner].append(Detection(_COLOUR_NAMES[colour], shapes[i], cx, cy, int(area),
                                               tuple(similarity[i])))
    return detections


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


def is_toy_prompt(prompt: str) -> bool:
    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True


def accuracy_by_kind(images: Tensor, prompts: list[str]) -> dict[str, float]:
    """Strict accuracy of each prompt kind present (GenEval reports its tasks separately)."""
    correct = check(images, prompts).correct.float()
    kinds = [parse_prompt(p).kind for p in prompts]
    return {kind: correct[[i for i, k in enumerate(kinds) if k == kind]].mean().item()
            for kind in KINDS if kind in kinds}


class ToyGenEvalReward:
    """Rule-based reward for the toy world: fraction of prompt requirements met, in [0, 1].

    With `soft_shapes=True` the reward gives graded credit for shape likeness (see
    `soft_requirements`): a denser learning signal for RL on a generator that draws blobs.
    With `clutter_penalty=c > 0`, each detection beyond what the prompt asks for (see
    `unrequested_objects`) subtracts c, so the reward can go below 0.
    `accuracy` is always the strict GenEval-style check.
    """

    name = "toy_geneval"

    def __init__(self, soft_shapes: bool = False, clutter_penalty: float = 0.0):
        if not clutter_penalty >= 0:
            raise ValueError(f"clutter_penalty = {clutter_penalty!r} must be >= 0 (0 turns it off)")
        self.soft_shapes = soft_shapes
        self.clutter_penalty = float(clutter_penalty)

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(B, 3, H, W) images (clamped to [0, 1]) and B prompts -> (B,) float32 on the images' device."""
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
        return score.to(images.device)

    def accuracy(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(B,) bool on the images' device: every requirement met (GenEval accuracy)."""
        return check(images, prompts).correct.to(images.device)
