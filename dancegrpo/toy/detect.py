"""Object detector of the toy world: coloured blobs found in images, classified as shapes.

Pixels are assigned to the nearest palette colour, grouped into 4-connected components and
each component classified from brightness-weighted statistics. Images are (B, 3, H, W)
floats in [0, 1]; detections give centres in [0, 1] image coordinates (x right, y down).
The checker (`dancegrpo.toy.checker`) scores detections against prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .grammar import COLOURS, SHAPES

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

