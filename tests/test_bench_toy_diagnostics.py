"""The toy diagnostics read rendered ground truth correctly."""
import torch

from bench.toy_diagnostics import horizontal_centre, sample_statistics
from dancegrpo.toy.render import render_batch


def test_statistics_of_rendered_scenes():
    prompts = ["a red circle on the left", "a blue square on the right", "two green triangles"]
    images = render_batch(prompts, torch.Generator().manual_seed(0))
    stats = sample_statistics(images)
    assert stats["objects_per_image"] == 4 / 3
    assert stats["shape_share/circle"] == stats["shape_share/square"] == 1 / 4
    assert stats["shape_share/triangle"] == 2 / 4 and "shape_share/None" not in stats
    lit = (images.max(1).values >= 0.25).sum().item()
    assert abs(stats["dark_pixel_fraction"] - (1 - lit / images[:, 0].numel())) < 1e-6
    assert 9 ** 2 * 0.4 < stats["mean_object_area_px"] < 12 ** 2 * 1.1  # objects are 9-12 px across at 32 px
    centre = horizontal_centre(images[:2])
    assert centre[0] < 0.4 < 0.6 < centre[1]
