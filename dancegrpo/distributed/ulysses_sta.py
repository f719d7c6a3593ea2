"""Ulysses sequence parallelism composed with sliding-tile attention (STA) in HunyuanVideo.

After the all-to-all a rank holds every video token for H/sp heads, so STA runs unchanged on
the full canvas; only per-head windows need slicing to this rank's heads. The STA controller
(canvas, sampling steps, per-step/per-layer windows) is the one `install_sta` sets up.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from ..attention.hunyuan_processor import STAController, STAHunyuanAttnProcessor, STAOptions, install_sta
from ..attention.sta_mask import normalize_windows
from .hunyuan_ulysses import UlyssesHandle, install_ulysses
from .ulysses import group_rank, group_size


class _HeadShardController:
    """The STA controller as seen by one head shard: per-head windows cut to this rank's heads."""

    def __init__(self, controller: STAController, heads: int, sp: int, rank: int):
        self._controller, self._heads, self._sp, self._rank = controller, heads, sp, rank

    def __getattr__(self, name):
        return getattr(self._controller, name)

    def window(self, step: int | None, layer: int):
        spec = self._controller.window(step, layer)
        if spec is None:
            return None
        windows = normalize_windows(spec, self._heads)
        if windows.shape[0] == 1:
            return spec
        return windows.chunk(self._sp, 0)[self._rank].tolist()


def _sta_attend(controller: _HeadShardController, layer: int):
    processor = STAHunyuanAttnProcessor(controller, layer)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_valid: torch.Tensor | None,
               video_len: int | None = None) -> torch.Tensor:
        if video_len is not None:
            raise ValueError(f"sliding-tile attention with sequence parallelism needs the video token count "
                             f"({video_len}) to be a multiple of the sequence-parallel size "
                             f"{controller._sp}: change the frame count or resolution, or use sp_size 1")
        return processor._attend(q, k, v, text_valid)

    return attend


def install_ulysses_around_sta(transformer: nn.Module, group: ProcessGroup | None,
                               controller: STAController) -> UlyssesHandle:
    """Ulysses on a transformer whose attention already runs sliding-tile attention under `controller`
    (installed by `install_sta`): after the all-to-all each rank attends with its heads' windows."""
    shard = _HeadShardController(controller, transformer.config.num_attention_heads, group_size(group),
                                 group_rank(group))
    return install_ulysses(transformer, group, attend_for_layer=lambda layer: _sta_attend(shard, layer))


def install_ulysses_sta(transformer: nn.Module, group: ProcessGroup | None,
                        options: dict | STAOptions) -> tuple[STAController, UlyssesHandle]:
    """STA (as `install_sta`) inside Ulysses sequence parallelism; returns the STA controller and the handle."""
    controller = install_sta(transformer, options)
    return controller, install_ulysses_around_sta(transformer, group, controller)
