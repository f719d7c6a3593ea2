"""The STA definition (dancegrpo.attention.sta_mask) against hand-worked cases and a
brute-force per-token implementation of the rule written from the spec."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dancegrpo.attention import STAMask, TileLayout, sta_reference, tile_window_mask


def brute_force_mask(canvas, tile, window, text_valid):
    """Token-by-token: tile coordinates by integer division, the window rule per dimension."""
    T, H, W = canvas
    grid = [-(-c // t) for c, t in zip(canvas, tile)]
    coords = list(itertools.product(range(T), range(H), range(W)))
    nv, nt = len(coords), len(text_valid)
    n = nv + nt
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, qc in enumerate(coords):
        for j, kc in enumerate(coords):
            ok = True
            for d in range(3):
                qt, kt, w, g = qc[d] // tile[d], kc[d] // tile[d], window[d], grid[d]
                if w >= g:
                    continue
                centre = min(max(qt, w // 2), g - 1 - w // 2)
                ok &= abs(kt - centre) <= w // 2
            mask[i, j] = ok
        mask[i, nv:] = torch.tensor(text_valid)
    key_valid = torch.tensor([True] * nv + list(text_valid))
    mask[nv:, :] = key_valid
    return mask


def test_window_rule_hand_worked_1d():
    # 5 tiles, window 3: the centre is clamped into [1, 3], so the window shifts inward at both ends.
    expected = torch.tensor([[1, 1, 1, 0, 0],
                             [1, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0],
                             [0, 0, 1, 1, 1],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(tile_window_mask((5, 1, 1), [3, 1, 1])[0], expected)
    # window 1: each tile attends only itself
    assert torch.equal(tile_window_mask((1, 4, 1), [1, 1, 1])[0], torch.eye(4, dtype=torch.bool))


@pytest.mark.parametrize("n,w", [(7, 3), (7, 5), (6, 3), (4, 3), (9, 1)])
def test_window_never_shrinks_at_borders(n, w):
    mask = tile_window_mask((1, 1, n), [1, 1, w])[0]
    assert (mask.sum(1) == min(w, n)).all()
    for q in range(n):  # attended tiles are contiguous and include the query tile
        cols = mask[q].nonzero().flatten()
        assert mask[q, q] and cols.max() - cols.min() + 1 == len(cols)


def test_window_3d_is_product_of_dims():
    grid, window = (3, 4, 5), [1, 3, 3]
    mask = tile_window_mask(grid, window)[0]
    per_dim = [tile_window_mask(tuple(g if d == k else 1 for d, g in enumerate(grid)),
                                [w if d == k else 1 for d, w in enumerate(window)])[0] for k in range(3)]
    expected = torch.einsum("ac,bd,ef->abecdf", *[m.float() for m in per_dim]).reshape(mask.shape) > 0
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("canvas,tile,window", [((3, 5, 4), (2, 2, 2), (1, 3, 1)), ((5, 3, 7), (2, 2, 3), (3, 1, 2)),
                                                ((4, 4, 4), (2, 2, 2), (1, 1, 1))])
def test_dense_mask_matches_brute_force(canvas, tile, window):
    text_valid = [True, True, True, False]
    mask = STAMask.build(canvas, window, tile, text_tokens=4).dense_mask(torch.tensor([text_valid]))
    assert torch.equal(mask[0, 0], brute_force_mask(canvas, tile, window, text_valid))


def test_per_head_windows_equal_single_windows():
    windows = [[1, 1, 1], [3, 3, 3], [1, 3, 2]]
    per_head = STAMask.build((5, 6, 4), windows, (2, 2, 2), 3).dense_mask()
    for h, w in enumerate(windows):
        assert torch.equal(per_head[0, h], STAMask.build((5, 6, 4), w, (2, 2, 2), 3).dense_mask()[0, 0])


def test_tiling_padding_and_inverse():
    layout = TileLayout((3, 5, 4), (2, 2, 3))
    assert layout.grid == (2, 3, 2) and layout.padded_tokens == 2 * 3 * 2 * 12
    x = torch.randn(2, layout.num_tokens, 3)
    tiled = layout.to_tiles(x, dim=1)
    assert torch.equal(layout.from_tiles(tiled, dim=1), x)
    # padding positions are exactly those whose padded-canvas coordinate lies outside the canvas, and hold zeros
    pad = ~layout.token_valid
    assert pad.sum() == layout.padded_tokens - layout.num_tokens
    assert (tiled[:, pad] == 0).all()
    # tile-major: the first tile holds canvas positions t<2, h<2, w<3 in raster order
    first = layout.source_index[:12]
    expected = [(t * 5 + h) * 4 + w for t in range(2) for h in range(2) for w in range(3)]
    assert first.tolist() == expected


def test_full_window_is_dense_attention():
    torch.manual_seed(0)
    canvas, text = (3, 4, 5), 5
    q, k, v = (torch.randn(2, 2, 60 + text, 8, dtype=torch.float64) for _ in range(3))
    text_valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = sta_reference(q, k, v, canvas, [9, 9, 9], (2, 2, 2), text_valid)
    key_mask = torch.cat([torch.ones(2, 60, dtype=torch.bool), text_valid], 1)[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # diffusers' HunyuanVideo mask
    torch.testing.assert_close(out, expected)
    # exact full extent (window == tiles per dim) is also full attention
    exact = sta_reference(q, k, v, canvas, [2, 2, 3], (2, 2, 2), text_valid)
    torch.testing.assert_close(exact, expected)


def test_text_rules():
    mask = STAMask.build((2, 4, 4), [1, 1, 1], (1, 2, 2), 3).dense_mask(torch.tensor([[True, False, True]]))[0, 0]
    nv = 32
    assert mask[:nv, nv:].eq(torch.tensor([True, False, True])).all()      # image queries: valid text only
    assert mask[nv:, :nv].all() and mask[nv:, nv:].eq(torch.tensor([True, False, True])).all()
    assert not mask[:nv, :nv].all()                                          # the window does restrict video
