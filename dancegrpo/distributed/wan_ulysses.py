"""Ulysses sequence parallelism for diffusers' WanTransformer3DModel (Wan 2.1 / 2.2, text- and image-to-video).

`install_ulysses(transformer, group)` makes every rank of the sequence-parallel group run the
transformer on 1/sp of the video tokens (contiguous slices of the flattened t, h, w token
order, the order of the patch embedding's `flatten(2)`):

- the patch embedding's output and the RoPE tables are sharded the same way, so each rank
  rotates its own tokens; a token count that sp does not divide is padded at the end (zero
  tokens, identity rotation), the padded keys are masked in self-attention and the padded
  outputs dropped;
- self-attention (`attn1` of every block) goes through `UlyssesWanSelfAttnProcessor`: q, k, v
  are projected, RMS-normed over all heads and rotated on this rank's tokens, then one
  all-to-all turns (B, N/sp, 3, H, D) into (B, N, 3, H/sp, D), attention runs on all tokens
  for this rank's heads and the inverse all-to-all brings the output back to (B, N/sp, H, D)
  before the output projection;
- cross-attention (`attn2`) keeps diffusers' own processor: its queries are this rank's video
  tokens and its keys and values the full text (and, for Wan 2.1 image-to-video, image) tokens,
  which every rank holds (the condition embedder runs on every rank), so no communication is
  needed; the feed-forward and the modulations are per token;
- a per-token timestep (Wan 2.2 TI2V: `timestep` of shape (B, N)) is sharded like the tokens,
  so the per-token modulation (blocks and output norm) follows each rank's tokens;
- the output projection's tokens are all-gathered (and the padding dropped) before the
  unpatchify, so every rank returns the full prediction.

Callers give every rank of a group the same inputs and compute the same loss; after backward,
all-reduce (sum) the gradients over the group (see `ulysses.py` for why).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from .ulysses import (TokenPadding, UlyssesHandle, check_heads_divisible, gather_sequence, group_size,
                      heads_to_sequence, pad_rows, sequence_to_heads, shard_sequence)

_WAN_PARTS = ("rope", "patch_embedding", "condition_embedder", "blocks", "proj_out")


def masked_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, video_len: int | None = None) -> torch.Tensor:
    """SDPA on (B, heads, N, D) q, k, v; with video_len, keys at positions >= video_len (padding) are masked.

    Returns (B, heads, N, D) in the dtype of q.
    """
    if video_len is None:
        return F.scaled_dot_product_attention(q, k, v)
    keep = torch.arange(k.shape[2], device=q.device) < video_len
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None, None, :])


def rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding of (B, N, H, D) `x` by (1, N, 1, D) tables (each pair of channels 2i, 2i+1
    rotated by the angle whose cosine is freqs_cos[..., 2i] and sine freqs_sin[..., 2i+1]), as
    diffusers' WanAttnProcessor applies it; the result has the dtype of x."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(x)


def _project_qkv(attn: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


class UlyssesWanSelfAttnProcessor:
    """Wan's self-attention (`attn1`) with the video tokens sharded over `group` (heads split over ranks)."""

    def __init__(self, group: ProcessGroup | None, padding: TokenPadding):
        self.group, self.padding = group, padding

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the Ulysses Wan self-attention processor takes neither encoder_hidden_states nor "
                             "attention_mask (it is installed on attn1, the self-attention of each block)")
        q, k, v = _project_qkv(attn, hidden_states)                      # (B, N/sp, H * D), this rank's tokens
        q, k = attn.norm_q(q), attn.norm_k(k)                             # RMS over all heads, per token
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))   # (B, N/sp, H, D)
        if rotary_emb is not None:   # this rank's slice of the RoPE tables (sharded by install_ulysses)
            q, k = rotate(q, *rotary_emb), rotate(k, *rotary_emb)
        # One all-to-all for q, k and v: (B, N/sp, 3, H, D) -> (B, N, 3, H/sp, D).
        q, k, v = sequence_to_heads(torch.stack([q, k, v], 2), self.group, seq_dim=1, head_dim=3).unbind(2)
        video_len = self.padding.video_len if self.padding.pad else None
        out = masked_self_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), video_len)
        out = heads_to_sequence(out.transpose(1, 2), self.group).flatten(2, 3).type_as(q)  # (B, N/sp, H * D)
        return attn.to_out[1](attn.to_out[0](out))


def _argument(args: tuple, kwargs: dict, name: str, position: int):
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


def install_ulysses(transformer: nn.Module, group: ProcessGroup | None) -> UlyssesHandle:
    """Shard a WanTransformer3DModel's video tokens over the sequence-parallel `group` (in place).

    Raises ValueError if `transformer` is not a WanTransformer3DModel (names the class and the
    missing parts) or if the group size does not divide `num_attention_heads` (names both), and
    RuntimeError on a second install. A video token count (frames x height x width after
    patchify) that the group size does not divide is padded, masked and trimmed. A per-token
    timestep must give one value per video token (or one per sample). Returns a handle whose
    `remove()` restores the single-process transformer.
    """
    missing = [name for name in _WAN_PARTS if not hasattr(transformer, name)]
    if missing:
        raise ValueError(f"{type(transformer).__name__} is not a WanTransformer3DModel (it has no "
                         f"{', '.join(missing)}): the Wan Ulysses installer cannot shard it")
    sp = group_size(group)
    check_heads_divisible(transformer.config.num_attention_heads, sp)
    if getattr(transformer, "_ulysses_installed", False):
        raise RuntimeError("install_ulysses was already called on this transformer: call remove() on its handle first")
    handle = UlyssesHandle(transformer, dict(transformer.attn_processors))
    padding = TokenPadding()
    for block in transformer.blocks:
        block.attn1.set_processor(UlyssesWanSelfAttnProcessor(group, padding))
    patch = tuple(transformer.config.patch_size)

    def shard_timestep(module, args, kwargs):   # per-token timesteps (B, N) follow the tokens
        timestep = _argument(args, kwargs, "timestep", 1)
        if timestep is None or timestep.ndim != 2 or timestep.shape[1] == 1:
            return None
        hidden = _argument(args, kwargs, "hidden_states", 0)
        tokens = math.prod(size // p for size, p in zip(hidden.shape[2:], patch))
        if timestep.shape[1] != tokens:
            raise ValueError(f"timestep of shape {tuple(timestep.shape)}: a per-token timestep needs one value per "
                             f"video token ({tokens} for latents of shape {tuple(hidden.shape)})")
        sharded = shard_sequence(pad_rows(timestep, 1, (-tokens) % sp), group, dim=1)
        if "timestep" in kwargs:
            return args, {**kwargs, "timestep": sharded}
        return (*args[:1], sharded, *args[2:]), kwargs

    # The transformer calls rope before the patch embedding, so the rope hook plans the padding of the call.
    def shard_rope(module, args, output):   # (cos, sin), each (1, N, 1, D): the same token slice
        pad = padding.plan(output[0].shape[1], sp)
        return tuple(shard_sequence(pad_rows(table, 1, pad, fill), group, dim=1)
                     for table, fill in zip(output, (1.0, 0.0)))   # padded rows: the identity rotation

    def shard_tokens(module, args, output):   # (B, C, T, H, W) -> (B, C, N/sp); the model then flattens
        tokens = output.flatten(2)            # and transposes it to (B, N/sp, C)
        if tokens.shape[2] != padding.video_len:
            raise RuntimeError(f"patch embedding gave {tokens.shape[2]} tokens but the RoPE table "
                               f"{padding.video_len}: the transformer's forward is not the one install_ulysses expects")
        return shard_sequence(pad_rows(tokens, 2, padding.pad), group, dim=2)

    def gather_tokens(module, args, output):  # (B, N/sp, C) -> (B, N, C) before the unpatchify
        return gather_sequence(output, group, dim=1)[:, :padding.video_len]

    handle.hooks += [transformer.register_forward_pre_hook(shard_timestep, with_kwargs=True),
                     transformer.rope.register_forward_hook(shard_rope),
                     transformer.patch_embedding.register_forward_hook(shard_tokens),
                     transformer.proj_out.register_forward_hook(gather_tokens)]
    transformer._ulysses_installed = True
    return handle
