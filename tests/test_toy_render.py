"""Tests of the toy world's renderer: geometry, anti-aliasing, constraints, determinism."""
from __future__ import annotations

import math

import pytest
import torch

from dancegrpo.toy import grammar, render


# --------------------------------------------------------------------------- renderer


def _analytic_area(shape: str, side: float) -> float:
    return {"circle": math.pi * side**2 / 4, "square": side**2, "triangle": side**2 / 2}[shape]


@pytest.mark.parametrize("size", [32, 64])
def test_rendered_objects_match_their_layout(size):
    """Drawn colour mass and centre of mass agree with the sampled geometry."""
    generator = torch.Generator().manual_seed(0)
    lo, hi = (f * size for f in render.OBJECT_SIZE_RANGE)
    for spec in [s for s in grammar.all_specs() if s.kind == "single_object"] * 2:
        (obj,) = render.sample_layout(spec, generator, size)
        assert lo <= obj.size <= hi
        image = render.rasterise([[obj]], size)[0]
        colour = torch.tensor(grammar.COLOURS[obj.colour])
        channel = int(colour.argmax())
        assert torch.all(image[colour == 0] == 0), "colours must stay pure"
        mass = image[channel]
        assert mass.sum().item() == pytest.approx(_analytic_area(obj.shape, obj.size), rel=0.08)
        centres = torch.arange(size) + 0.5
        cx = (mass.sum(0) * centres).sum() / mass.sum()
        cy = (mass.sum(1) * centres).sum() / mass.sum()
        assert abs(cx - obj.cx) < 0.2 and abs(cy - obj.cy) < 0.2
        # Anti-aliasing leaves partially covered pixels on the edges.
        assert ((mass > 0) & (mass < 1)).any()


def test_render_batch_shapes_range_and_determinism():
    prompts = ["a red circle on the left", "three blue squares", "a yellow triangle above a green circle"]
    images = render.render_batch(prompts, torch.Generator().manual_seed(7))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, render.render_batch(prompts, torch.Generator().manual_seed(7)))
    assert not torch.equal(images, render.render_batch(prompts, torch.Generator().manual_seed(8)))
    assert torch.equal(images[0], render.render(prompts[0], torch.Generator().manual_seed(7)))
    assert render.render(prompts[1], torch.Generator().manual_seed(0), size=48).shape == (3, 48, 48)


def test_layouts_respect_constraints():
    """Geometry straight from the sampler: margins, no overlap, positions and relations."""
    generator = torch.Generator().manual_seed(3)
    size = 32
    for spec in grammar.all_specs()[::3]:
        layout = render.sample_layout(spec, generator, size)
        assert len(layout) == len(spec.objects) * spec.count
        assert sorted((o.colour, o.shape) for o in layout) == sorted(list(spec.objects) * spec.count)
        masks = [render.rasterise([[obj]], size)[0].amax(0) > 0 for obj in layout]
        for i, a in enumerate(masks):
            assert not (a[0].any() or a[-1].any() or a[:, 0].any() or a[:, -1].any()), "touches the edge"
            grown = torch.nn.functional.max_pool2d(a[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
            for b in masks[i + 1:]:
                assert not (grown & b).any(), f"objects touch in {spec.prompt!r}"
        if spec.position is not None:
            x, y = layout[0].cx / size, layout[0].cy / size
            assert {"left": x < 0.4, "right": x > 0.6, "top": y < 0.4, "bottom": y > 0.6}[spec.position]
        if spec.relation is not None:
            dx, dy = (layout[0].cx - layout[1].cx) / size, (layout[0].cy - layout[1].cy) / size
            assert {"left of": dx < -0.2, "right of": dx > 0.2, "above": dy < -0.2, "below": dy > 0.2}[spec.relation]
            assert min(abs(dx), abs(dy)) <= 0.1  # in a row or a column
