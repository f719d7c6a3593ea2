"""Reward-model preprocessing in torch, on the images' device, for whole batches.

The released reward models preprocess PIL images (open_clip: PIL bicubic resize of the
shortest side, centre crop; HPS v2: resize of the longest side and zero padding;
transformers' CLIPImageProcessor: like open_clip). PIL's bicubic filter with antialiasing
is the same filter as torch's `interpolate(mode="bicubic", antialias=True)` (Keys cubic,
a = -0.5, support widened by the scale factor), so on float pixels the two agree to
~1e-6; on uint8 pixels PIL also rounds between its two passes, which costs at most about
one grey level on smooth images (tests/test_rewards_transforms.py states the tolerances).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

#: The CLIP normalisation used by OpenAI CLIP, open_clip's laion2B models, HPS and PickScore.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_pixels(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected pixels shaped (N, 3, H, W), got {tuple(images.shape)}")


def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == size:
        return images  # PIL returns an unchanged copy for a same-size resize
    out = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0)  # PIL clips bicubic overshoot to the pixel range


# Adapted from open_clip src/open_clip/transform.py::image_transform (MIT)
def resize_shortest_side(images: Tensor, size: int) -> Tensor:
    """Bicubic (antialiased) resize so the shorter side is `size`, keeping the aspect ratio.

    The longer side is `int(size * long / short)`, truncated, as torchvision's `Resize(int)`
    and transformers' `shortest_edge` resize compute it.
    """
    _check_pixels(images)
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_size = (size, new_long) if h <= w else (new_long, size)
    return _resize(images, new_size)


# Adapted from open_clip src/open_clip/transform.py::image_transform (MIT)
def center_crop(images: Tensor, height: int, width: int, offsets: Literal["round", "floor"] = "round") -> Tensor:
    """Crop the centre `height x width`.

    Odd margins: torchvision's CenterCrop (open_clip) rounds the offset, `offsets="round"`;
    transformers' image processors floor it, `offsets="floor"`. One pixel apart, so it matters.
    """
    h, w = images.shape[-2:]
    if height > h or width > w:
        raise ValueError(f"cannot crop {height}x{width} from {h}x{w} images; resize them first")
    if offsets == "round":
        top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    else:
        top, left = (h - height) // 2, (w - width) // 2
    return images[..., top:top + height, left:left + width]


# Adapted from HPSv2 hpsv2/src/open_clip/transform.py::ResizeMaxSize (Apache-2.0)
def resize_longest_side_and_pad(images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """HPS v2's `ResizeMaxSize`: longest side to `size` (sides rounded), then pad to a square.

    The padding value is a pixel value (HPS pads with 0, i.e. black, before normalising).
    """
    _check_pixels(images)
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    if scale == 1.0:
        return images
    new_h, new_w = round(h * scale), round(w * scale)
    out = _resize(images, (new_h, new_w))
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(out, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x - mean) / std per channel, in the images' dtype."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class ImageTransform:
    """One reward model's preprocessing: resize mode, output size, normalisation.

    `mode="crop"`: shortest side to `resize_to`, centre crop `crop_size` (open_clip, CLIP
    processors). `mode="pad"`: longest side to `crop_size`, zero padding (HPS v2).
    `crop_offsets`: see `center_crop` ("round" for open_clip, "floor" for transformers).
    """

    crop_size: tuple[int, int] = (224, 224)
    resize_to: int = 224
    mode: Literal["crop", "pad"] = "crop"
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    crop_offsets: Literal["round", "floor"] = "round"

    def __call__(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) pixels in [0, 1] -> (N, 3, crop_h, crop_w) normalised, float32."""
        images = images.float()
        if self.mode == "pad":
            if self.crop_size[0] != self.crop_size[1]:
                raise ValueError(f"pad mode needs a square size, got {self.crop_size}")
            out = resize_longest_side_and_pad(images, self.crop_size[0])
        else:
            out = center_crop(resize_shortest_side(images, self.resize_to), *self.crop_size, offsets=self.crop_offsets)
        return normalize(out, self.mean, self.std)

    @classmethod
    def from_preprocessor_config(cls, config: dict) -> "ImageTransform":
        """Build from a transformers `preprocessor_config.json` dict (CLIPImageProcessor keys).

        Only the bicubic resize + centre crop pipeline is supported; anything else is an error
        rather than a silently different preprocessing.
        """
        if config.get("resample", 3) != 3:
            raise ValueError(f"preprocessor_config resample={config['resample']!r}: only 3 (bicubic) is supported")
        for flag in ("do_resize", "do_center_crop", "do_normalize"):
            if config.get(flag, True) is not True:
                raise ValueError(f"preprocessor_config {flag}={config[flag]!r}: only true is supported")
        rescale = config.get("rescale_factor", 1 / 255)
        if config.get("do_rescale", True) is not True or abs(rescale - 1 / 255) > 1e-9:
            raise ValueError(f"preprocessor_config rescale {rescale!r}: only 1/255 is supported")
        size = config.get("size", 224)
        resize_to = size.get("shortest_edge") if isinstance(size, dict) else size
        if resize_to is None:
            raise ValueError(f"preprocessor_config size={size!r}: expected {{'shortest_edge': N}}")
        crop = config.get("crop_size", resize_to)
        crop_hw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(crop_size=tuple(crop_hw), resize_to=int(resize_to), mode="crop",
                   mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
                   std=tuple(config.get("image_std", OPENAI_CLIP_STD)), crop_offsets="floor")


def frames_as_batch(images: Tensor) -> tuple[Tensor, int]:
    """(B, C, H, W) -> itself, 1; (B, T, C, H, W) -> (B*T, C, H, W), T.

    Image rewards score videos frame by frame; callers fold the T scores back per sample.
    """
    if images.ndim == 4:
        return images, 1
    if images.ndim == 5:
        b, t = images.shape[:2]
        return images.reshape(b * t, *images.shape[2:]), t
    raise ValueError(f"expected images (B, C, H, W) or videos (B, T, C, H, W), got shape {tuple(images.shape)}")
