"""MP4 writer (dancegrpo.video_io): read back with PyAV itself, and the GIF fallback without it."""
from __future__ import annotations

import sys

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dancegrpo import video_io


def read_back(path) -> tuple[np.ndarray, float]:
    """All frames of a video file as (T, H, W, 3) uint8 RGB, and its frame rate, decoded by PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


def smooth_video(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random but smooth (T, 3, H, W) frames in [0, 1]: coarse noise, bilinearly enlarged.

    Chroma subsampling (yuv420p) averages colour over 2x2 blocks, so per-pixel noise would
    measure the format, not the writer.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(frames, 3, height // 16 + 1, width // 16 + 1, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)


def test_lossless_mp4_round_trip_is_exact(tmp_path):
    pixels = torch.randint(0, 256, (7, 24, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = video_io.write_mp4(tmp_path / "noise.mp4", pixels.numpy(), fps=12, lossless=True)
    frames, fps = read_back(path)
    assert frames.shape == (7, 24, 40, 3)
    assert fps == pytest.approx(12)
    np.testing.assert_array_equal(frames, pixels.numpy())


def test_default_mp4_matches_within_codec_tolerance(tmp_path):
    video = smooth_video(9, 32, 48)
    path = video_io.write_mp4(tmp_path / "smooth.mp4", video, fps=8.0)
    frames, fps = read_back(path)
    assert frames.shape == (9, 32, 48, 3)
    assert fps == pytest.approx(8.0)
    reference = (video.permute(0, 2, 3, 1) * 255).round().numpy()
    error = np.abs(frames.astype(np.float64) - reference)
    # Measured here: mean 3.3, 99th percentile 12 levels, mostly 4:2:0 chroma subsampling (2.8 at
    # crf 0). A swapped channel order, transposed or reordered frames give errors of tens of levels.
    per_frame = error.mean(axis=(1, 2, 3))
    assert per_frame.max() < 4.5 and np.percentile(error, 99) < 16, (per_frame, np.percentile(error, 99))


def test_odd_sizes_are_padded_for_yuv420(tmp_path):
    video = smooth_video(3, 17, 23)
    frames, _ = read_back(video_io.write_mp4(tmp_path / "odd.mp4", video, fps=4))
    assert frames.shape == (3, 18, 24, 3)
    reference = (video.permute(0, 2, 3, 1) * 255).round().numpy()
    assert np.abs(frames[:, :17, :23].astype(np.float64) - reference).mean() < 4.5
    np.testing.assert_allclose(frames[:, 17].astype(float), frames[:, 16].astype(float), atol=12)


def test_save_video_upscales_by_nearest_neighbour(tmp_path):
    pixels = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    video = pixels.float() / 255
    path = video_io.save_video(tmp_path / "clip", video, fps=5, upscale=4)
    assert path == tmp_path / "clip.mp4"
    frames, _ = read_back(path)
    assert frames.shape == (2, 16, 20, 3)
    expected = pixels.permute(0, 2, 3, 1).repeat_interleave(4, 1).repeat_interleave(4, 2).numpy()
    assert np.abs(frames.astype(float) - expected).mean() < 25  # noise through 4:2:0: only a coarse check
    np.testing.assert_array_equal(video_io.to_uint8_frames(video, upscale=4), expected)


def test_without_pyav_writes_png_frames_and_gif_and_says_how_to_get_mp4(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    monkeypatch.setattr(video_io, "_fallback_announced", False)
    video = smooth_video(4, 16, 24)
    first = video_io.save_video(tmp_path / "a", video, fps=10)
    second = video_io.save_video(tmp_path / "b", video, fps=10)
    assert (first, second) == (tmp_path / "a.gif", tmp_path / "b.gif")
    assert not list(tmp_path.glob("*.mp4"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "pip install dancegrpo[video]" in lines[0]
    gif = Image.open(first)
    assert gif.n_frames == 4 and gif.size == (24, 16) and gif.info["duration"] == 100
    pngs = sorted((tmp_path / "a").glob("frame_*.png"))
    assert len(pngs) == 4
    reference = (video[2].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[2]).convert("RGB")), reference)


def test_bad_inputs_are_refused_with_the_expected_layout(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(4, 16, 16\): expected \(frames, 3, height, width\)"):
        video_io.to_uint8_frames(torch.rand(4, 16, 16))
    with pytest.raises(ValueError, match="fps = 0"):
        video_io.write_mp4(tmp_path / "x.mp4", torch.rand(2, 3, 8, 8), fps=0)
