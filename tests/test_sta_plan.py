"""STA tile choice (`tile="auto"`), window conversion, the kernel plan's block lists and the
flex_attention BlockMask built from them: against hand-worked values, brute-force search and
the dense token mask of the definition (tests/test_sta_mask.py checks that one by brute force)."""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dancegrpo.attention import STAMask, auto_tile, flex_block_mask, kernel_plan, sta_attention, sta_reference
from dancegrpo.attention import window_for_extent
from dancegrpo.attention.sta import _plan, flex_block_lists


def padded(canvas, tile):
    return math.prod(math.ceil(c / t) * t for c, t in zip(canvas, tile))


# ---------------------------------------------------------------------------------------------
# tile: auto

def test_auto_tile_hand_worked_recipe_canvases():
    # 14x30x30 (480x480x53): 14 = 2*7 and 30 = 2*3*5 hold only 2^3, a 64-token multiple needs 2^6, so one
    # side pads; the cheapest is 30 -> 32 (14x30x32 = 13440, +6.7%). Of the tiles padding exactly that much,
    # (2, 10, 16) is closest to 6x8x8: |log 2/6| + |log 10/8| + |log 16/8| = 2.015 (2x6x16: 2.079).
    assert auto_tile((14, 30, 30)) == (2, 10, 16)
    assert padded((14, 30, 30), (2, 10, 16)) == 13440 <= 1.10 * 12600
    assert padded((14, 30, 30), (6, 8, 8)) == 18 * 32 * 32            # the old default: +46%
    assert auto_tile((30, 48, 80)) == (6, 8, 8)                         # divides exactly: no padding
    # SkyReels-I2V 400x640x53: 14x25x40; 25 is odd, so h pads (25 -> 28 with h = 4): 14x28x40 = 15680 (+12%)
    assert auto_tile((14, 25, 40)) == (2, 4, 8)
    assert padded((14, 25, 40), (2, 4, 8)) == 15680


@pytest.mark.parametrize("canvas", [(14, 30, 30), (14, 25, 40), (30, 48, 80), (7, 9, 11), (1, 30, 30)])
def test_auto_tile_pads_least_among_kernel_tiles(canvas):
    """Brute force over every tile the rule admits (64..512 tokens, a multiple of 64, sides <= 12x16x16
    and <= the canvas side rounded up to a power of two): none pads less than the chosen tile."""
    tile = auto_tile(canvas)
    assert math.prod(tile) % 64 == 0 and 64 <= math.prod(tile) <= 512
    limits = [min(2 ** math.ceil(math.log2(c)), cap) for c, cap in zip(canvas, (12, 16, 16))]
    best = min(padded(canvas, t) for t in itertools.product(*(range(1, n + 1) for n in limits))
               if math.prod(t) % 64 == 0 and math.prod(t) <= 512)
    assert padded(canvas, tile) == best


def test_auto_tile_small_canvas_falls_back_to_smaller_blocks_and_tiny_canvas_raises():
    assert auto_tile((2, 4, 4)) == (2, 4, 4)          # 32 tokens: no 64-token tile fits, a 32-token one does
    assert kernel_plan((2, 4, 4), [1, 1, 1], "auto").block == 32
    with pytest.raises(ValueError, match="no STA tile"):
        auto_tile((1, 2, 4))
    with pytest.raises(ValueError, match="auto"):
        kernel_plan((2, 4, 4), [1, 1, 1], "automatic")


def test_explicit_tile_still_used():
    plan = kernel_plan((14, 30, 30), [1, 3, 3], (6, 8, 8), text_tokens=256)
    assert plan.tile == (6, 8, 8) and plan.video_padded == 18432 and plan.block == 128
    auto = kernel_plan((14, 30, 30), [1, 3, 3], "auto", text_tokens=256)
    assert auto.tile == (2, 10, 16) and auto.video_padded == 13440 and auto.block == 64


# ---------------------------------------------------------------------------------------------
# windows in tokens

def test_window_for_extent_hand_worked():
    # the extent of window 1x3x3 with 6x8x8 tiles is 6x24x24 tokens
    assert window_for_extent([6, 24, 24], (6, 8, 8)) == [1, 3, 3]
    # with 2x10x16: ceil(6/2) = 3, ceil(24/10) = 3, ceil(24/16) = 2 -> odd 3
    assert window_for_extent([6, 24, 24], (2, 10, 16)) == [3, 3, 3]
    assert window_for_extent([[1, 1, 1], [7, 8, 9]], (2, 4, 4)) == [[1, 1, 1], [5, 3, 3]]
    for bad in ([0, 1, 1], [1, 1], [[[1, 1, 1]]]):
        with pytest.raises(ValueError, match="extent"):
            window_for_extent(bad, (2, 2, 2))


@pytest.mark.parametrize("extent,tile", [([6, 24, 24], (2, 10, 16)), ([3, 9, 5], (2, 4, 4)), ([1, 1, 1], (3, 2, 5))])
def test_window_for_extent_covers_the_extent_with_the_fewest_odd_tiles(extent, tile):
    window = window_for_extent(extent, tile)
    for e, t, w in zip(extent, tile, window):
        assert w % 2 == 1 and w * t >= e          # covers
        assert w == 1 or (w - 2) * t < e          # the next smaller odd window would not


# ---------------------------------------------------------------------------------------------
# the kernel plan

def test_plan_skips_fully_padded_blocks_as_queries_and_keys():
    # canvas 4x4x4 in 3x4x4 tiles (48 tokens, block 16): the second time tile covers t = 3, 4, 5 of which
    # only t = 3 is real, so its blocks 4 and 5 (t = 4 and t = 5) hold padding only. Text: 3 tokens, block 6;
    # text queries attend every real block.
    plan = kernel_plan((4, 4, 4), [1, 1, 1], (3, 4, 4), text_tokens=3)
    assert plan.block == 16 and plan.video_padded == 96
    assert plan.block_real.tolist() == [True, True, True, True, False, False, True]
    assert plan.block_all_real.tolist() == [True, True, True, True, False, False, False]
    assert plan.kv_count[0].tolist() == [4, 4, 4, 2, 0, 0, 5]     # tile 0: its 3 blocks + text; tile 1: block 3
    assert plan.q_count[0].tolist() == [4, 4, 4, 2, 0, 0, 5]
    assert plan.attended_blocks == 3 * 4 + 2 + 5


def _packed_dense_mask(plan, canvas, window, tile, text_tokens, text_valid, heads):
    """The definition's dense mask (transformer order) moved to the kernel layout; padding rows/columns False."""
    dense = STAMask.build(canvas, window, tile, text_tokens, heads=heads).dense_mask(text_valid)  # (B, h, N, N)
    nv = math.prod(canvas)
    source = torch.cat([plan.mask.layout.source_index,
                        torch.tensor([nv + j if j < text_tokens else -1 for j in range(plan.text_padded)],
                                     dtype=torch.long)])
    real = source >= 0
    idx = source.clamp(min=0)
    packed = dense[:, :, idx][:, :, :, idx] & real[:, None] & real[None, :]
    return packed, real


def _decode(count, index):
    """(1, H, R) counts and (1, H, R, C) indices -> (H, R, C) bool of the listed columns."""
    heads, rows, cols = index.shape[1:]
    out = torch.zeros(heads, rows, cols, dtype=torch.bool)
    for h, r in itertools.product(range(heads), range(rows)):
        out[h, r, index[0, h, r, :count[0, h, r]].long()] = True
    return out


FLEX_CASES = {
    # canvas, tile, window(s), text tokens, text valid rows
    "per_head_text": ((3, 5, 6), (2, 2, 4), [[1, 3, 1], [2, 1, 2]], 5, [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
    "padded_blocks": ((4, 4, 4), (3, 4, 4), [1, 1, 1], 3, None),
    "auto_tile": ((3, 4, 6), "auto", [1, 1, 1], 4, [[1, 1, 0, 0]]),
    "no_text": ((5, 3, 7), (2, 2, 4), [3, 1, 1], 0, None),
    # text fills its block exactly: that block holds only real text tokens, yet with padded text keys it is partial
    "text_fills_block": ((2, 4, 4), (1, 4, 4), [1, 1, 1], 16, [[1] * 12 + [0] * 4, [1] * 16]),
    "text_fills_block_all_valid": ((2, 4, 4), (1, 4, 4), [1, 1, 1], 16, None),
}


@pytest.mark.parametrize("name", list(FLEX_CASES))
def test_flex_block_mask_equals_the_dense_definition_blockwise(name):
    canvas, tile, window, text, valid = FLEX_CASES[name]
    heads = 2
    text_valid = None if valid is None else torch.tensor(valid, dtype=torch.bool)
    batch = 1 if valid is None else len(valid)
    plan = kernel_plan(canvas, window, tile, text, heads)
    dense, real = _packed_dense_mask(plan, canvas, window, tile, text, text_valid, heads)
    b = plan.block
    nb = plan.num_tokens // b
    blocks = dense.view(dense.shape[0], dense.shape[1], nb, b, nb, b)
    any_pair = blocks.any(5).any(3).any(0)                                            # (h, NB, NB)
    row_real = real.view(nb, b)
    all_pairs = (blocks | ~row_real[None, None, :, :, None, None]).all(5).all(3).all(0)  # over real query rows
    mask = flex_block_mask(plan, plan.key_bias(text_valid, batch, "cpu"), all_text_valid=text_valid is None)
    partial = _decode(mask.kv_num_blocks, mask.kv_indices)
    full = _decode(mask.full_kv_num_blocks, mask.full_kv_indices)
    shape = (dense.shape[1], nb, nb)
    assert not (partial & full).any()
    assert torch.equal((partial | full).expand(shape), any_pair.expand(shape))      # exactly the attended blocks
    assert torch.equal(plan.block_mask.expand(shape), any_pair.expand(shape))
    if text_valid is None:
        assert torch.equal(full.expand(shape), (any_pair & all_pairs).expand(shape))  # full = every pair attended
    else:
        assert not (full & ~all_pairs).any()                                        # a full block never masks


@pytest.mark.parametrize("name", list(FLEX_CASES))
def test_flex_backend_equals_dense_reference(name):
    canvas, tile, window, text, valid = FLEX_CASES[name]
    text_valid = None if valid is None else torch.tensor(valid, dtype=torch.bool)
    batch = 1 if valid is None else len(valid)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, 2, math.prod(canvas) + text, 8, generator=generator, dtype=torch.float64)
               for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # eager flex_attention warns that it is unfused
        out = sta_attention(q, k, v, canvas, window, tile, text_valid, backend="flex")
    torch.testing.assert_close(out, sta_reference(q, k, v, canvas, window, tile, text_valid))


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_720p_block_mask_is_built_from_block_lists_without_a_dense_mask():
    """30x48x80 video + 256 text tokens (720p, 117 frames): 115456 tokens, a dense mask would hold 1.3e10
    entries. Building the plan and the BlockMask creates nothing larger than a few NB^2 block tables."""
    canvas, text = (30, 48, 80), 256
    _plan.cache_clear()
    with _LargestTensor() as probe:
        plan = kernel_plan(canvas, [3, 3, 3], "auto", text)
        mask = flex_block_mask(plan, plan.key_bias(None, 1, "cpu"), all_text_valid=True)
    tokens = math.prod(canvas) + text
    nb = plan.num_tokens // plan.block
    assert plan.tile == (6, 8, 8) and plan.block == 128 and nb == 900 + 2
    assert probe.largest <= 4 * nb * nb < tokens ** 2 / 1000
    held = [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices, mask.q_num_blocks,
            mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices]
    assert sum(x.numel() for x in held) <= 4 * (nb * nb + nb)
    # 3x3x3 tiles of 5x6x10: per query tile 27 tiles (windows shift inward), 3 blocks each, + 2 text blocks
    assert int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()) == 900 * (27 * 3 + 2) + 2 * nb
    assert flex_block_lists(plan, True) is flex_block_lists(plan, True)   # cached on the plan
