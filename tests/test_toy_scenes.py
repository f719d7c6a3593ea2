"""Tests of the toy world: grammar, split, renderer and the GenEval-like checker."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import time
from collections import deque

import pytest
import torch

from dancegrpo.toy import scenes
from dancegrpo.toy.scenes import SceneSpec

SEEDS_PER_PROMPT = 3


@pytest.fixture(scope="module")
def ground_truth():
    """Every prompt rendered SEEDS_PER_PROMPT times, with the checker's verdicts."""
    prompts = scenes.all_prompts() * SEEDS_PER_PROMPT
    images = scenes.render_batch(prompts, torch.Generator().manual_seed(1234))
    return prompts, images, scenes.check(images, prompts)


def _kind(prompt: str) -> str:
    return scenes.parse_prompt(prompt).kind


# --------------------------------------------------------------------------- grammar


def test_grammar_size_and_roundtrip():
    prompts = scenes.all_prompts()
    n_objects = len(scenes.COLOURS) * len(scenes.SHAPES)
    pairs = n_objects * (n_objects - 1)
    assert len(prompts) == n_objects * (1 + 4 + 2) + pairs * (1 + 4)
    assert len(set(prompts)) == len(prompts)
    assert prompts == scenes.all_prompts()
    for spec in scenes.all_specs():
        assert scenes.parse_prompt(spec.prompt) == spec


@pytest.mark.parametrize("text, expected", [
    ("a red circle", SceneSpec("single_object", (("red", "circle"),))),
    ("a green square at the top", SceneSpec("position", (("green", "square"),), position="top")),
    ("three yellow triangles", SceneSpec("count", (("yellow", "triangle"),), count=3)),
    ("a red circle and a red square", SceneSpec("two_objects", (("red", "circle"), ("red", "square")))),
    ("a red circle left of a blue square",
     SceneSpec("relation", (("red", "circle"), ("blue", "square")), relation="left of")),
    ("  Two  Blue Circles. ", SceneSpec("count", (("blue", "circle"),), count=2)),
])
def test_parse_known_prompts(text, expected):
    assert scenes.parse_prompt(text) == expected


@pytest.mark.parametrize("text", [
    "", "a purple circle", "a red hexagon on the left", "four red circles", "a red circle in the middle",
    "a red circle near a blue square", "a red circle and a red circle", "a blue square above a blue square",
])
def test_bad_prompts_raise_naming_the_prompt(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        scenes.parse_prompt(text)


@pytest.mark.parametrize("kwargs", [
    dict(kind="sizes", objects=(("red", "circle"),)),
    dict(kind="single_object", objects=(("pink", "circle"),)),
    dict(kind="single_object", objects=(("red", "circle"),), position="left"),
    dict(kind="position", objects=(("red", "circle"),)),
    dict(kind="count", objects=(("red", "circle"),), count=5),
    dict(kind="two_objects", objects=(("red", "circle"),)),
    dict(kind="relation", objects=(("red", "circle"), ("blue", "circle")), relation="near"),
])
def test_invalid_specs_raise(kwargs):
    with pytest.raises(ValueError):
        SceneSpec(**kwargs)


# --------------------------------------------------------------------------- split


def test_split_disjoint_covering_stratified_deterministic():
    train, evals = scenes.split_prompts(0.2, seed=0)
    assert not set(train) & set(evals)
    assert sorted(train + evals) == sorted(scenes.all_prompts())
    assert (train, evals) == scenes.split_prompts(0.2, seed=0)
    for kind in scenes.KINDS:
        n_train = sum(_kind(p) == kind for p in train)
        n_eval = sum(_kind(p) == kind for p in evals)
        assert n_train > 0 and n_eval > 0, kind
        assert abs(n_eval / (n_train + n_eval) - 0.2) < 0.05, kind
    assert scenes.split_prompts(0.2, seed=1)[1] != evals
    with pytest.raises(ValueError):
        scenes.split_prompts(1.5)


def test_split_does_not_depend_on_hash_salt():
    code = "from dancegrpo.toy import scenes; print(scenes.split_prompts(0.2, 0)[1])"
    salt = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"  # differs from this process's salt
    env = dict(os.environ, PYTHONHASHSEED=salt, PYTHONPATH=os.pathsep.join(sys.path))
    output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert output == f"{scenes.split_prompts(0.2, 0)[1]}\n"


# --------------------------------------------------------------------------- renderer


def _analytic_area(shape: str, side: float) -> float:
    return {"circle": math.pi * side**2 / 4, "square": side**2, "triangle": side**2 / 2}[shape]


@pytest.mark.parametrize("size", [32, 64])
def test_rendered_objects_match_their_layout(size):
    """Drawn colour mass and centre of mass agree with the sampled geometry."""
    generator = torch.Generator().manual_seed(0)
    lo, hi = (f * size for f in scenes.OBJECT_SIZE_RANGE)
    for spec in [s for s in scenes.all_specs() if s.kind == "single_object"] * 2:
        (obj,) = scenes.sample_layout(spec, generator, size)
        assert lo <= obj.size <= hi
        image = scenes.rasterise([[obj]], size)[0]
        colour = torch.tensor(scenes.COLOURS[obj.colour])
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
    images = scenes.render_batch(prompts, torch.Generator().manual_seed(7))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, scenes.render_batch(prompts, torch.Generator().manual_seed(7)))
    assert not torch.equal(images, scenes.render_batch(prompts, torch.Generator().manual_seed(8)))
    assert torch.equal(images[0], scenes.render(prompts[0], torch.Generator().manual_seed(7)))
    assert scenes.render(prompts[1], torch.Generator().manual_seed(0), size=48).shape == (3, 48, 48)


def test_layouts_respect_constraints():
    """Geometry straight from the sampler: margins, no overlap, positions and relations."""
    generator = torch.Generator().manual_seed(3)
    size = 32
    for spec in scenes.all_specs()[::3]:
        layout = scenes.sample_layout(spec, generator, size)
        assert len(layout) == len(spec.objects) * spec.count
        assert sorted((o.colour, o.shape) for o in layout) == sorted(list(spec.objects) * spec.count)
        masks = [scenes.rasterise([[obj]], size)[0].amax(0) > 0 for obj in layout]
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


# --------------------------------------------------------------------------- checker


def _reference_components(colour_map: torch.Tensor) -> set[frozenset]:
    """Breadth-first flood fill: each 4-connected same-value component as a set of pixels."""
    h, w = colour_map.shape
    seen, comps = set(), set()
    for y in range(h):
        for x in range(w):
            if colour_map[y, x] < 0 or (y, x) in seen:
                continue
            comp, queue = set(), deque([(y, x)])
            seen.add((y, x))
            while queue:
                cy, cx = queue.popleft()
                comp.add((cy, cx))
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    inside = 0 <= ny < h and 0 <= nx < w
                    if inside and (ny, nx) not in seen and colour_map[ny, nx] == colour_map[cy, cx]:
                        seen.add((ny, nx))
                        queue.append((ny, nx))
            comps.add(frozenset(comp))
    return comps


def test_label_components_matches_flood_fill():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randint(-1, 3, (4, 20, 24), generator=generator)
    maps[0] = torch.where(torch.rand(20, 24, generator=generator) < 0.7, 1, -1)  # large winding components
    labels = scenes.label_components(maps)
    for colour_map, label in zip(maps, labels):
        assert torch.equal(label > 0, colour_map >= 0)
        ours = {frozenset(map(tuple, (label == v).nonzero().tolist())) for v in label.unique() if v > 0}
        assert ours == _reference_components(colour_map)
    assert len(set(labels[0].unique().tolist()) & set(labels[1].unique().tolist())) == 1  # only background


def test_detections_match_layout():
    generator = torch.Generator().manual_seed(5)
    for spec in [s for s in scenes.all_specs() if s.kind in ("single_object", "count")]:
        layout = scenes.sample_layout(spec, generator)
        (dets,) = scenes.detect_objects(scenes.rasterise([layout]))
        assert len(dets) == len(layout)
        for obj in layout:
            det = min(dets, key=lambda d: math.hypot(d.cx * 32 - obj.cx, d.cy * 32 - obj.cy))
            assert (det.colour, det.shape) == (obj.colour, obj.shape)
            assert math.hypot(det.cx * 32 - obj.cx, det.cy * 32 - obj.cy) < 0.75
            assert det.area == pytest.approx(_analytic_area(obj.shape, obj.size), rel=0.3)


def test_checker_accepts_rendered_ground_truth(ground_truth):
    prompts, _, result = ground_truth
    kinds = [_kind(p) for p in prompts]
    overall = result.correct.float().mean().item()
    per_kind = {k: result.correct[[x == k for x in kinds]].float().mean().item() for k in scenes.KINDS}
    print(f"\nground-truth accuracy over {len(prompts)} renders: {overall:.4f}; per kind: "
          + ", ".join(f"{k} {v:.4f}" for k, v in per_kind.items()))
    assert overall >= 0.98
    assert all(v >= 0.95 for v in per_kind.values()), per_kind
    assert torch.equal(result.score == 1, result.correct)


def test_checker_reads_16px_ground_truth_through_the_toy_decoder():
    """The embedded generator works at 16x16 and decodes with a bicubic 2x upsampling: the
    checker must accept ground truth rendered at 16x16 and passed through that same decode."""
    from dancegrpo.models.toy_flux import build_toy_flux, pixels_to_latents
    decoder = build_toy_flux(image_size=16, output_size=32, transformer_overrides=dict(
        num_layers=1, num_single_layers=0, attention_head_dim=8, num_attention_heads=1, joint_attention_dim=8,
        pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)), text_overrides=dict(dim=8, num_heads=1, ff_dim=8))
    prompts = scenes.all_prompts()
    small = scenes.render_batch(prompts, torch.Generator().manual_seed(7), size=16)
    images = decoder.decode(pixels_to_latents(small))
    assert images.shape == (len(prompts), 3, 32, 32)
    result = scenes.check(images, prompts)
    kinds = [_kind(p) for p in prompts]
    per_kind = {k: result.correct[[x == k for x in kinds]].float().mean().item() for k in scenes.KINDS}
    assert result.correct.float().mean().item() >= 0.98 and min(per_kind.values()) >= 0.95, per_kind


def test_checker_tolerates_blur_and_pixel_noise(ground_truth):
    """Generator samples are soft and noisy: degraded ground truth must still pass."""
    prompts, images, _ = ground_truth
    n = len(scenes.all_prompts())
    radius = torch.arange(-2, 3).float()
    kernel = torch.exp(-radius.square() / (2 * 0.7**2))
    kernel = kernel / kernel.sum()
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 5, 5)
    blurred = torch.nn.functional.conv2d(images[:n], kernel, padding=2, groups=3)
    noisy = blurred + 0.05 * torch.randn(blurred.shape, generator=torch.Generator().manual_seed(0))
    accuracy = scenes.check(noisy, prompts[:n]).correct.float().mean().item()
    print(f"\naccuracy on blurred (sigma 0.7 px) noisy (std 0.05) ground truth: {accuracy:.4f}")
    assert accuracy >= 0.95


def _perturbations(spec: SceneSpec) -> dict[str, list[SceneSpec]]:
    """Specs differing from `spec` in one attribute, each of which the render must fail."""
    colours, shapes = list(scenes.COLOURS), list(scenes.SHAPES)
    (colour, shape), rest = spec.objects[0], spec.objects[1:]
    changes = {
        "colour": [dict(objects=((c, shape),) + rest) for c in colours if c != colour],
        "shape": [dict(objects=((colour, s),) + rest) for s in shapes if s != shape],
    }
    if spec.position is not None:
        opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[spec.position]
        changes["position"] = [dict(position=opposite)]
    if spec.relation is not None:
        changes["relation"] = [dict(relation=r) for r in scenes.RELATIONS if r != spec.relation]
    if spec.kind == "count":
        changes["count"] = [dict(count=5 - spec.count)]
    valid = {}
    for what, options in changes.items():
        valid[what] = []
        for change in options:
            try:
                valid[what].append(dataclasses.replace(spec, **change))
            except ValueError:  # e.g. the recoloured object now equals the second one
                pass
    return valid


def test_checker_rejects_mismatched_prompts(ground_truth):
    prompts, images, _ = ground_truth
    n = len(scenes.all_prompts())  # first seed only
    pairs: dict[str, tuple[list[int], list[str]]] = {}
    for i, prompt in enumerate(prompts[:n]):
        for what, specs in _perturbations(scenes.parse_prompt(prompt)).items():
            index, wrong = pairs.setdefault(what, ([], []))
            index.extend([i] * len(specs))
            wrong.extend(s.prompt for s in specs)
    assert set(pairs) == {"colour", "shape", "position", "relation", "count"}
    for what, (index, wrong) in pairs.items():
        result = scenes.check(images[index], wrong)
        rejected = (~result.correct).float().mean().item()
        print(f"{what} mismatches rejected: {rejected:.4f} of {len(wrong)}")
        assert rejected >= 0.95, what
        assert (result.score < 1).float().mean().item() >= 0.95, what
        if what == "relation":  # partial credit: both objects are still there
            assert ((result.score - 2 / 3).abs() < 1e-6).float().mean() >= 0.95
        if what == "count":  # the objects are present, the count is wrong
            assert (result.score == 0.5).float().mean() >= 0.95


def test_extra_objects_are_allowed_except_for_counts():
    generator = torch.Generator().manual_seed(11)
    images = scenes.render_batch(["a red circle and a blue square", "three green triangles",
                                  "a yellow square left of a red triangle"] * 4, generator)
    looser = ["a blue square", "a green triangle", "a red triangle and a yellow square"] * 4
    assert scenes.check(images, looser).correct.all()
    assert not scenes.check(images[1:2], ["two green triangles"]).correct.any()


def test_clutter_penalty_charges_each_unrequested_object():
    P = scenes.PlacedObject
    layouts = [
        [P("red", "circle", 8, 8, 8)],                                    # exactly what is asked
        [P("red", "circle", 8, 8, 8), P("blue", "square", 8, 24, 24)],    # one object of another colour
        [P("red", "circle", 8, 8, 8), P("red", "square", 8, 24, 8), P("green", "triangle", 8, 16, 24)],
        [P("red", "circle", 8, 8, 8), P("red", "circle", 8, 24, 24)],     # "two red circles": no clutter
    ]
    images = scenes.rasterise(layouts)
    prompts = ["a red circle", "a red circle", "a red circle", "two red circles"]
    detections = scenes.check(images, prompts).detections
    extras = [scenes.unrequested_objects(scenes.parse_prompt(p), d) for p, d in zip(prompts, detections)]
    assert extras == [0, 1, 2, 0]
    plain = scenes.ToyGenEvalReward(soft_shapes=True)
    penalised = scenes.ToyGenEvalReward(soft_shapes=True, clutter_penalty=0.25)
    expected = plain(images, prompts) - 0.25 * torch.tensor(extras, dtype=torch.float32)
    torch.testing.assert_close(penalised(images, prompts), expected)
    assert torch.equal(plain.accuracy(images, prompts), penalised.accuracy(images, prompts))  # accuracy ignores it
    with pytest.raises(ValueError, match="clutter_penalty"):
        scenes.ToyGenEvalReward(clutter_penalty=-1)


def test_blank_and_noise_images_fail():
    prompts = scenes.all_prompts()
    black = scenes.check(torch.zeros(len(prompts), 3, 32, 32), prompts)
    assert torch.all(black.score == 0) and not black.correct.any()
    noise = torch.rand(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert not scenes.check(noise, prompts).correct.any()


def test_batched_check_equals_per_image_check(ground_truth):
    prompts, images, _ = ground_truth
    index = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0))[:48].tolist()
    # Mix right and wrong prompts so that scores vary.
    chosen = [prompts[i] if k % 2 else prompts[(i + 1) % len(prompts)] for k, i in enumerate(index)]
    batch = scenes.check(images[index], chosen)
    for k, (i, prompt) in enumerate(zip(index, chosen)):
        single = scenes.check(images[i:i + 1], [prompt])
        assert single.score.item() == batch.score[k].item()
        assert single.correct.item() == batch.correct[k].item()
        assert single.detections[0] == batch.detections[k]
    assert 0 < batch.correct.float().mean() < 1


def test_reward_wrapper_clamps_and_reports(ground_truth):
    prompts, images, result = ground_truth
    reward = scenes.ToyGenEvalReward()
    assert reward.name == "toy_geneval"
    wrong = prompts[1:64] + prompts[:1]
    batch = images[:64]
    overshoot = batch * 1.4 - 0.2  # clamps back to a scene with the same blobs
    scores = reward(overshoot, wrong)
    assert scores.dtype == torch.float32 and scores.shape == (64,) and scores.device == batch.device
    assert torch.equal(scores, scenes.check(overshoot.clamp(0, 1), wrong).score)
    assert torch.equal(reward(batch, prompts[:64]), result.score[:64])
    accuracy = reward.accuracy(batch, prompts[:64])
    assert accuracy.dtype == torch.bool and torch.equal(accuracy, result.correct[:64])
    with pytest.raises(ValueError, match="prompt"):
        reward(batch, prompts[:3])


def test_print_check_speed(ground_truth):
    prompts, images, _ = ground_truth
    scenes.check(images[:64], prompts[:64])  # warm-up
    start = time.perf_counter()
    scenes.check(images[:64], prompts[:64])
    print(f"\ncheck() on a batch of 64 at 32x32: {time.perf_counter() - start:.4f} s "
          f"({torch.get_num_threads()} threads)")


def test_soft_reward_is_graded_and_agrees_with_the_strict_check():
    prompts = [p for p in scenes.all_prompts() if scenes.parse_prompt(p).kind != "count"][::7]
    images = scenes.render_batch(prompts, torch.Generator().manual_seed(3))
    hard, soft = scenes.ToyGenEvalReward(), scenes.ToyGenEvalReward(soft_shapes=True)
    torch.testing.assert_close(soft(images, prompts), hard(images, prompts))  # ground truth: both 1
    # Ask for the wrong shape: strict credit for that object is 0, soft credit is partial but
    # below a match, and never below the strict score.
    swap = {"circle": "square", "square": "triangle", "triangle": "circle"}
    wrong = [" ".join(swap.get(w, w) for w in p.split()) for p in prompts]
    s, h = soft(images, wrong), hard(images, wrong)
    assert (s >= h - 1e-6).all() and (s < 1).all() and (s > h).float().mean() > 0.5
    # A circle is more circle-like than square-like.
    dets = scenes.detect_objects(scenes.render_batch(["a red circle"], torch.Generator().manual_seed(0)))[0]
    circle, square, _ = dets[0].similarity
    assert circle > square


def test_accuracy_by_kind_scores_each_kind_on_its_own():
    prompts = ["a red circle", "a blue square on the left", "two green triangles", "a red circle above a blue square"]
    gen = torch.Generator().manual_seed(0)
    truth = scenes.render_batch(prompts, gen)
    assert scenes.accuracy_by_kind(truth, prompts) == {
        "single_object": 1.0, "position": 1.0, "count": 1.0, "relation": 1.0}
    wrong = truth.clone()
    wrong[1] = 0  # the position scene's image blanked: only that kind drops
    by_kind = scenes.accuracy_by_kind(wrong, prompts)
    assert by_kind["position"] == 0.0 and by_kind["single_object"] == by_kind["count"] == 1.0
    assert scenes.is_toy_prompt("a red circle") and not scenes.is_toy_prompt("a photo of a cat")
