"""VideoAlign's video inputs: which frames, at what size, in which patch order (Qwen2-VL's).

The rules `dancegrpo.rewards.videoalign` reproduces (see its docstring for the release read):
uniform frame sampling by rate or count, Qwen2-VL's `smart_resize`, bicubic antialiased
resizing with the release's uint8 rounding, and Qwen2-VL's patch layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
MAX_ASPECT_RATIO = 200


# Adapted from VideoAlign vision_process.py::smart_resize (MIT)
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"frames of {height}x{width}: aspect ratio above {MAX_ASPECT_RATIO} is not supported")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        # at least one factor per side (the release's copy can reach 0 here and then fails; transformers clamps)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


# Adapted from VideoAlign vision_process.py::smart_nframes (MIT)
def sample_frame_indices(total: int, video_fps: float | None, fps: float | None = None,
                         num_frames: int | None = None) -> Tensor:
    """Indices of the frames VideoAlign looks at: `num_frames` of them, or `fps` per second of
    a video playing at `video_fps` (at least 4, at most 768 and `total`, an even count)."""
    def even(x: float) -> int:
        return round(x / FRAME_FACTOR) * FRAME_FACTOR
    if num_frames is not None:
        n = even(num_frames)
    else:
        if video_fps is None or fps is None:
            raise ValueError("frame sampling by rate needs the video's frame rate: set the reward option video_fps")
        lo = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = even(min(max(total / video_fps * fps, lo), hi))
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise ValueError(f"{total} frames give {n} sampled frames; VideoAlign needs at least {FRAME_FACTOR}")
    return torch.linspace(0, total - 1, n).round().long()


# Adapted from VideoAlign vision_process.py::fetch_video (MIT)
def resize_frames(frames: Tensor, height: int, width: int, quantize: bool = True) -> Tensor:
    """(T, 3, H, W) in [0, 255] -> bicubic antialiased resize; with `quantize`, rounded to integers
    before and after as the released pipeline's uint8 video frames are."""
    if quantize:
        frames = frames.round()
    if tuple(frames.shape[-2:]) != (height, width):
        frames = F.interpolate(frames, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        frames = frames.clamp(0, 255)
        if quantize:
            frames = frames.round()
    return frames


# Adapted from transformers src/transformers/models/qwen2_vl/video_processing_qwen2_vl.py::Qwen2VLVideoProcessor.patchify (Apache-2.0)  # noqa: E501
def patchify_video(frames: Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
                   ) -> tuple[Tensor, tuple[int, int, int]]:
    """Normalised (T, C, H, W) -> (grid_t*grid_h*grid_w, C*tps*p*p) patches in Qwen2-VL's order, and the grid.

    A frame count not divisible by the temporal patch repeats the last frame, as Qwen2-VL does.
    """
    t, c, h, w = frames.shape
    if t % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(temporal_patch_size - t % temporal_patch_size, -1, -1, -1)])
        t = frames.shape[0]
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, tps, p, p)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)
