"""Renderer of the toy world: random scenes that satisfy a prompt, the ground truth the toy
generator is pretrained on.

Images are RGB floats in [0, 1] on a black background, (B, 3, S, S); layout coordinates are
in pixels (x right, y down). Objects are anti-aliased by supersampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .grammar import COLOURS, DEFAULT_SIZE, SHAPES, SceneSpec, parse_prompt

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
        u = torch.rand(_CANDIDATES_PER_DRAW, n, 3, generator=generator, dtype=torch.float64,
                       device="cpu").numpy()  # host-side layout sampling: a CPU generator
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
