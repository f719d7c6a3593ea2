"""Write generated videos to disk: MP4 through PyAV, or PNG frames + GIF without it.

PyAV (`pip install dancegrpo[video]`) bundles its own ffmpeg, so MP4 needs no system
package. It stays optional: only `dancegrpo sample` writes videos, training never does.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

MP4_HINT = "install PyAV for MP4 output: pip install dancegrpo[video]"
_fallback_announced = False  # say it once per process, not once per video


def to_uint8_frames(frames: torch.Tensor | np.ndarray, upscale: int = 1) -> np.ndarray:
    """Frames as a (T, H, W, 3) uint8 array.

    Accepts float frames (T, 3, H, W) in [0, 1] (what the adapters decode to) or uint8
    frames (T, H, W, 3). `upscale` > 1 enlarges by nearest neighbour (tiny toy videos).
    """
    if isinstance(frames, torch.Tensor):
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"video tensor of shape {tuple(frames.shape)}: expected (frames, 3, height, width)")
        frames = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        frames = frames.permute(0, 2, 3, 1).cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video array of shape {frames.shape} and dtype {frames.dtype}: "
                         "expected uint8 (frames, height, width, 3) or a float tensor (frames, 3, height, width)")
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return np.ascontiguousarray(frames)


def write_mp4(path: str | Path, frames: torch.Tensor | np.ndarray, fps: float, *, lossless: bool = False,
              crf: int = 18) -> Path:
    """Encode `frames` (see `to_uint8_frames`) as an H.264 MP4 at `fps` frames per second.

    Default: yuv420p at `crf` (18 is visually lossless), the format every player and browser
    plays; yuv420p needs even sizes, so an odd height or width is padded by repeating the
    last row or column. `lossless=True` writes RGB H.264 at crf 0 (libx264rgb): exact pixels,
    for analysis rather than viewing (many players cannot play it).
    Raises ImportError when PyAV is not installed.
    """
    import av  # optional dependency: callers fall back to GIF without it

    if fps <= 0:
        raise ValueError(f"fps = {fps}: must be positive")
    pixels = to_uint8_frames(frames)
    if not lossless:  # 4:2:0 chroma subsampling works on 2x2 blocks
        pad_h, pad_w = pixels.shape[1] % 2, pixels.shape[2] % 2
        pixels = np.pad(pixels, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264rgb" if lossless else "libx264",
                                      rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = pixels.shape[2], pixels.shape[1]
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        stream.options = {"crf": str(0 if lossless else crf), "preset": "medium"}
        for image in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


def write_frames_and_gif(stem: str | Path, frames: torch.Tensor | np.ndarray, fps: float) -> Path:
    """Write `stem`/frame_0000.png ... and an animated `stem`.gif; returns the GIF's path."""
    from PIL import Image

    stem = Path(stem)
    pictures = [Image.fromarray(image) for image in to_uint8_frames(frames)]
    stem.mkdir(parents=True, exist_ok=True)
    for t, picture in enumerate(pictures):
        picture.save(stem / f"frame_{t:04d}.png")
    gif = stem.with_name(stem.name + ".gif")
    pictures[0].save(gif, save_all=True, append_images=pictures[1:], duration=round(1000 / fps), loop=0)
    return gif


def save_video(stem: str | Path, frames: torch.Tensor | np.ndarray, fps: float, upscale: int = 1) -> Path:
    """Write a video as `stem`.mp4, or, without PyAV, as PNG frames in `stem`/ and `stem`.gif.

    The fallback prints one line (once per process) saying how to get MP4. Returns the path
    written (MP4 or GIF).
    """
    global _fallback_announced
    pixels = to_uint8_frames(frames, upscale)
    stem = Path(stem)
    try:
        return write_mp4(stem.with_name(stem.name + ".mp4"), pixels, fps)
    except ImportError:
        if not _fallback_announced:
            _fallback_announced = True
            print(f"PyAV is not installed: writing PNG frames + GIF instead of MP4 ({MP4_HINT})")
        return write_frames_and_gif(stem, pixels, fps)
