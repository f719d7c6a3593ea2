"""Tests of the toy world's detector, GenEval-like checker and reward."""
from __future__ import annotations

import dataclasses
import math
import time
from collections import deque

import pytest
import torch

from dancegrpo.toy import checker, detect, grammar, render
from dancegrpo.toy.grammar import SceneSpec

SEEDS_PER_PROMPT = 3


@pytest.fixture(scope="module")
def ground_truth():
    """Every prompt rendered SEEDS_PER_PROMPT times, with the checker's verdicts."""
    prompts = grammar.all_prompts() * SEEDS_PER_PROMPT
    images = render.render_batch(prompts, torch.Generator().manual_seed(1234))
    return prompts, images, checker.check(images, prompts)


def _kind(prompt: str) -> str:
    return grammar.parse_prompt(prompt).kind


def _analytic_area(shape: str, side: float) -> float:
    return {"circle": math.pi * side**2 / 4, "square": side**2, "triangle": side**2 / 2}[shape]


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
    labels = detect.label_components(maps)
    for colour_map, label in zip(maps, labels):
        assert torch.equal(label > 0, colour_map >= 0)
        ours = {frozenset(map(tuple, (label == v).nonzero().tolist())) for v in label.unique() if v > 0}
        assert ours == _reference_components(colour_map)
    assert len(set(labels[0].unique().tolist()) & set(labels[1].unique().tolist())) == 1  # only background


def test_detections_match_layout():
    generator = torch.Generator().manual_seed(5)
    for spec in [s for s in grammar.all_specs() if s.kind in ("single_object", "count")]:
        layout = render.sample_layout(spec, generator)
        (dets,) = detect.detect_objects(render.rasterise([layout]))
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
    per_kind = {k: result.correct[[x == k for x in kinds]].float().mean().item() for k in grammar.KINDS}
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
    prompts = grammar.all_prompts()
    small = render.render_batch(prompts, torch.Generator().manual_seed(7), size=16)
    images = decoder.decode(pixels_to_latents(small))
    assert images.shape == (len(prompts), 3, 32, 32)
    result = checker.check(images, prompts)
    kinds = [_kind(p) for p in prompts]
    per_kind = {k: result.correct[[x == k for x in kinds]].float().mean().item() for k in grammar.KINDS}
    assert result.correct.float().mean().item() >= 0.98 and min(per_kind.values()) >= 0.95, per_kind


def test_checker_tolerates_blur_and_pixel_noise(ground_truth):
    """Generator samples are soft and noisy: degraded ground truth must still pass."""
    prompts, images, _ = ground_truth
    n = len(grammar.all_prompts())
    radius = torch.arange(-2, 3).float()
    kernel = torch.exp(-radius.square() / (2 * 0.7**2))
    kernel = kernel / kernel.sum()
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 5, 5)
    blurred = torch.nn.functional.conv2d(images[:n], kernel, padding=2, groups=3)
    noisy = blurred + 0.05 * torch.randn(blurred.shape, generator=torch.Generator().manual_seed(0))
    accuracy = checker.check(noisy, prompts[:n]).correct.float().mean().item()
    print(f"\naccuracy on blurred (sigma 0.7 px) noisy (std 0.05) ground truth: {accuracy:.4f}")
    assert accuracy >= 0.95


def _perturbations(spec: SceneSpec) -> dict[str, list[SceneSpec]]:
    """Specs differing from `spec` in one attribute, each of which the render must fail."""
    colours, shapes = list(grammar.COLOURS), list(grammar.SHAPES)
    (colour, shape), rest = spec.objects[0], spec.objects[1:]
    changes = {
        "colour": [dict(objects=((c, shape),) + rest) for c in colours if c != colour],
        "shape": [dict(objects=((colour, s),) + rest) for s in shapes if s != shape],
    }
    if spec.position is not None:
        opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[spec.position]
        changes["position"] = [dict(position=opposite)]
    if spec.relation is not None:
        changes["relation"] = [dict(relation=r) for r in grammar.RELATIONS if r != spec.relation]
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
    n = len(grammar.all_prompts())  # first seed only
    pairs: dict[str, tuple[list[int], list[str]]] = {}
    for i, prompt in enumerate(prompts[:n]):
        for what, specs in _perturbations(grammar.parse_prompt(prompt)).items():
            index, wrong = pairs.setdefault(what, ([], []))
            index.extend([i] * len(specs))
            wrong.extend(s.prompt for s in specs)
    assert set(pairs) == {"colour", "shape", "position", "relation", "count"}
    for what, (index, wrong) in pairs.items():
        result = checker.check(images[index], wrong)
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
    images = render.render_batch(["a red circle and a blue square", "three green triangles",
                                  "a yellow square left of a red triangle"] * 4, generator)
    looser = ["a blue square", "a green triangle", "a red triangle and a yellow square"] * 4
    assert checker.check(images, looser).correct.all()
    assert not checker.check(images[1:2], ["two green triangles"]).correct.any()


def test_clutter_penalty_charges_each_unrequested_object():
    P = render.PlacedObject
    layouts = [
        [P("red", "circle", 8, 8, 8)],                                    # exactly what is asked
        [P("red", "circle", 8, 8, 8), P("blue", "square", 8, 24, 24)],    # one object of another colour
        [P("red", "circle", 8, 8, 8), P("red", "square", 8, 24, 8), P("green", "triangle", 8, 16, 24)],
        [P("red", "circle", 8, 8, 8), P("red", "circle", 8, 24, 24)],     # "two red circles": no clutter
    ]
    images = render.rasterise(layouts)
    prompts = ["a red circle", "a red circle", "a red circle", "two red circles"]
    detections = checker.check(images, prompts).detections
    extras = [checker.unrequested_objects(grammar.parse_prompt(p), d) for p, d in zip(prompts, detections)]
    assert extras == [0, 1, 2, 0]
    plain = checker.ToyGenEvalReward(soft_shapes=True)
    penalised = checker.ToyGenEvalReward(soft_shapes=True, clutter_penalty=0.25)
    plain_out, penalised_out = plain(images, prompts), penalised(images, prompts)
    expected = plain_out.scores - 0.25 * torch.tensor(extras, dtype=torch.float32)
    torch.testing.assert_close(penalised_out.scores, expected)
    assert torch.equal(plain_out.metadata["accuracy"], penalised_out.metadata["accuracy"])  # accuracy ignores it
    with pytest.raises(ValueError, match="clutter_penalty"):
        checker.ToyGenEvalReward(clutter_penalty=-1)


def test_blank_and_noise_images_fail():
    prompts = grammar.all_prompts()
    black = checker.check(torch.zeros(len(prompts), 3, 32, 32), prompts)
    assert torch.all(black.score == 0) and not black.correct.any()
    noise = torch.rand(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert not checker.check(noise, prompts).correct.any()


def test_batched_check_equals_per_image_check(ground_truth):
    prompts, images, _ = ground_truth
    index = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0))[:48].tolist()
    # Mix right and wrong prompts so that scores vary.
    chosen = [prompts[i] if k % 2 else prompts[(i + 1) % len(prompts)] for k, i in enumerate(index)]
    batch = checker.check(images[index], chosen)
    for k, (i, prompt) in enumerate(zip(index, chosen)):
        single = checker.check(images[i:i + 1], [prompt])
        assert single.score.item() == batch.score[k].item()
        assert single.correct.item() == batch.correct[k].item()
        assert single.detections[0] == batch.detections[k]
    assert 0 < batch.correct.float().mean() < 1


def test_reward_wrapper_clamps_and_reports(ground_truth):
    prompts, images, result = ground_truth
    reward = checker.ToyGenEvalReward()
    assert reward.name == "toy_geneval"
    wrong = prompts[1:64] + prompts[:1]
    batch = images[:64]
    overshoot = batch * 1.4 - 0.2  # clamps back to a scene with the same blobs
    scores = reward(overshoot, wrong).scores
    assert scores.dtype == torch.float32 and scores.shape == (64,) and scores.device == batch.device
    assert torch.equal(scores, checker.check(overshoot.clamp(0, 1), wrong).score)
    output = reward(batch, prompts[:64])
    assert torch.equal(output.scores, result.score[:64])
    accuracy = output.metadata["accuracy"]
    assert accuracy.dtype == torch.bool and torch.equal(accuracy, result.correct[:64])
    with pytest.raises(ValueError, match="prompt"):
        reward(batch, prompts[:3])


def test_print_check_speed(ground_truth):
    prompts, images, _ = ground_truth
    checker.check(images[:64], prompts[:64])  # warm-up
    start = time.perf_counter()
    checker.check(images[:64], prompts[:64])
    print(f"\ncheck() on a batch of 64 at 32x32: {time.perf_counter() - start:.4f} s "
          f"({torch.get_num_threads()} threads)")


def test_soft_reward_is_graded_and_agrees_with_the_strict_check():
    prompts = [p for p in grammar.all_prompts() if grammar.parse_prompt(p).kind != "count"][::7]
    images = render.render_batch(prompts, torch.Generator().manual_seed(3))
    hard, soft = checker.ToyGenEvalReward(), checker.ToyGenEvalReward(soft_shapes=True)
    torch.testing.assert_close(soft(images, prompts).scores, hard(images, prompts).scores)  # ground truth: both 1
    # Ask for the wrong shape: strict credit for that object is 0, soft credit is partial but
    # below a match, and never below the strict score.
    swap = {"circle": "square", "square": "triangle", "triangle": "circle"}
    wrong = [" ".join(swap.get(w, w) for w in p.split()) for p in prompts]
    s, h = soft(images, wrong).scores, hard(images, wrong).scores
    assert (s >= h - 1e-6).all() and (s < 1).all() and (s > h).float().mean() > 0.5
    # A circle is more circle-like than square-like.
    dets = detect.detect_objects(render.render_batch(["a red circle"], torch.Generator().manual_seed(0)))[0]
    circle, square, _ = dets[0].similarity
    assert circle > square


def test_reward_reports_accuracy_and_kind_tags_scored_per_kind_by_the_reward_set():
    """Through the reward protocol: the strict accuracy and each prompt's kind as metadata,
    averaged overall and per kind by `metadata_metrics` (hand-counted expectations)."""
    from dancegrpo.rewards import RewardEntry, RewardSet, metadata_metrics

    prompts = ["a red circle", "a blue square on the left", "two green triangles", "a red circle above a blue square",
               "a yellow square"]
    truth = render.render_batch(prompts, torch.Generator().manual_seed(0))
    images = truth.clone()
    images[1] = 0  # the position scene blanked: that sample fails, the others pass
    output = checker.ToyGenEvalReward()(images, prompts)
    assert output.metadata["tag"] == ["single_object", "position", "count", "relation", "single_object"]
    assert output.metadata["accuracy"].tolist() == [True, False, True, True, True]
    scores = RewardSet([RewardEntry("toy_geneval", checker.ToyGenEvalReward())]).score(images, prompts)
    assert torch.equal(scores.values["toy_geneval"], output.scores)
    assert metadata_metrics(scores) == {"toy_geneval_accuracy": pytest.approx(4 / 5)}
    assert metadata_metrics(scores, by_tag=True) == {
        "toy_geneval_accuracy": pytest.approx(4 / 5), "toy_geneval_accuracy/single_object": 1.0,
        "toy_geneval_accuracy/position": 0.0, "toy_geneval_accuracy/count": 1.0, "toy_geneval_accuracy/relation": 1.0}
