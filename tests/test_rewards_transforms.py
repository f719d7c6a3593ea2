"""Torch preprocessing vs PIL reference transforms (the ones the released reward models use).

Tolerances: on float pixels (PIL mode "F") the filters are the same, so 1e-5; on uint8
pixels PIL rounds and clips between its horizontal and vertical passes, which moves smooth
images by at most ~1.1 grey levels, so 1.5/255.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dancegrpo.rewards.image_transforms import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform, center_crop,
                                                frames_as_batch, resize_longest_side_and_pad, resize_shortest_side)
from tiny_rewards import smooth_images

FLOAT_TOL = 1e-5
UINT8_TOL = 1.5 / 255


def pil_resize_float(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, H, W) float -> PIL bicubic per channel in mode 'F' (no rounding)."""
    chans = [np.asarray(Image.fromarray(c.numpy().astype(np.float32), mode="F").resize((width, height),
                                                                                        Image.BICUBIC))
             for c in image]
    return torch.from_numpy(np.stack(chans).copy()).clamp(0, 1)  # uint8 images clip the overshoot


def pil_shortest_crop(image: torch.Tensor, size: int, crop: int, resize=pil_resize_float) -> torch.Tensor:
    """torchvision Resize(size) + CenterCrop(crop) semantics, done with PIL."""
    h, w = image.shape[-2:]
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    out = resize(image, nh, nw)
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    return out[:, top:top + crop, left:left + crop]


def pil_longest_pad(image: torch.Tensor, size: int) -> torch.Tensor:
    """HPS ResizeMaxSize semantics with PIL: longest side to size, black canvas, centred paste."""
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    out = torch.zeros(3, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[:, top:top + nh, left:left + nw] = pil_resize_float(image, nh, nw)
    return out


def pil_resize_uint8(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    u8 = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    out = np.asarray(Image.fromarray(u8).resize((width, height), Image.BICUBIC))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("hw", [(40, 60), (60, 41), (50, 70), (30, 30), (20, 24), (100, 100)])
def test_shortest_side_crop_matches_pil_float(hw):
    images = smooth_images(2, *hw, seed=hw[0])
    ours = center_crop(resize_shortest_side(images, 28), 28, 28)
    for i in range(2):
        ref = pil_shortest_crop(images[i], 28, 28)
        assert ours[i].shape == ref.shape
        assert (ours[i] - ref).abs().max() < FLOAT_TOL


@pytest.mark.parametrize("hw", [(64, 96), (100, 100), (224, 300)])
def test_shortest_side_crop_matches_pil_uint8(hw):
    images = (smooth_images(2, *hw, seed=1) * 255).round() / 255  # what a PNG round trip would give
    ours = center_crop(resize_shortest_side(images, 28), 28, 28)
    for i in range(2):
        ref = pil_shortest_crop(images[i], 28, 28, resize=pil_resize_uint8)
        assert (ours[i] - ref).abs().max() < UINT8_TOL


@pytest.mark.parametrize("hw", [(40, 60), (61, 40), (56, 56), (14, 20)])
def test_longest_side_pad_matches_pil(hw):
    images = smooth_images(2, *hw, seed=2)
    ours = resize_longest_side_and_pad(images, 28)
    for i in range(2):
        assert (ours[i] - pil_longest_pad(images[i], 28)).abs().max() < FLOAT_TOL


def test_transform_normalises_like_the_clip_processor():
    """ImageTransform from a preprocessor_config equals transformers' PIL CLIP image processor."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    cfg = {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}, "resample": 3,
           "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}
    transform = ImageTransform.from_preprocessor_config(cfg)
    processor = CLIPImageProcessorPil(**cfg)
    images = (smooth_images(3, 50, 70, seed=3) * 255).round() / 255
    pil = [Image.fromarray((im * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()) for im in images]
    ref = torch.as_tensor(np.asarray(processor(images=pil, return_tensors="np")["pixel_values"]))
    ours = transform(images)
    assert ours.shape == ref.shape == (3, 3, 28, 28)
    assert (ours - ref).abs().max() < UINT8_TOL / min(OPENAI_CLIP_STD)


def test_transform_output_is_normalised_resized_pixels():
    images = smooth_images(2, 40, 60, seed=4)
    out = ImageTransform(crop_size=(28, 28), resize_to=28)(images)
    ref = torch.stack([pil_shortest_crop(im, 28, 28) for im in images])
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    assert (out - (ref - mean) / std).abs().max() < FLOAT_TOL / min(OPENAI_CLIP_STD)


def test_preprocessor_config_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="resample=2"):
        ImageTransform.from_preprocessor_config({"resample": 2})
    with pytest.raises(ValueError, match="do_center_crop"):
        ImageTransform.from_preprocessor_config({"do_center_crop": False})


def test_frames_as_batch_and_shape_errors():
    video = torch.rand(2, 3, 3, 8, 8)
    flat, t = frames_as_batch(video)
    assert t == 3 and flat.shape == (6, 3, 8, 8) and torch.equal(flat[4], video[1, 1])
    assert frames_as_batch(video[:, 0])[1] == 1
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        frames_as_batch(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop(torch.rand(1, 3, 8, 8), 9, 9)


def test_crop_offsets_round_like_torchvision_or_floor_like_transformers():
    images = torch.arange(11.0).view(1, 1, 1, 11).expand(1, 3, 1, 11)  # margin 11 - 6 = 5: offsets 2 vs 2
    assert center_crop(images, 1, 6)[0, 0, 0, 0] == 2 and center_crop(images, 1, 6, "floor")[0, 0, 0, 0] == 2
    images = torch.arange(12.0).view(1, 1, 1, 12).expand(1, 3, 1, 12)  # margin 3: round(1.5) = 2, floor 1
    assert center_crop(images, 1, 9)[0, 0, 0, 0] == 2 and center_crop(images, 1, 9, "floor")[0, 0, 0, 0] == 1
