"""Ulysses sequence parallelism for diffusers' HunyuanVideoTransformer3DModel (HunyuanVideo, SkyReels-I2V).

`install_ulysses(transformer, group)` makes every rank of the sequence-parallel group run the
transformer on 1/sp of the video tokens:

- the patch embedding's output and the RoPE tables are sharded the same way (contiguous
  slices of the flattened t, h, w token order), so each rank rotates its own tokens; a token
  count that sp does not divide is padded at the end, the padded keys are masked in attention
  and the padded outputs dropped;
- the joint attention of the dual- and single-stream blocks goes through
  `UlyssesHunyuanAttnProcessor`: video q, k, v all-to-all to (all tokens, H/sp heads), text
  q, k, v (replicated: every rank holds all text tokens) keep this rank's heads, attention
  runs once per head shard, video goes back by the inverse all-to-all and the text output's
  heads are all-gathered (the text stream stays replicated);
- the output projection's tokens are all-gathered before the unpatchify, so every rank returns
  the full prediction.

Callers give every rank of a group the same inputs and compute the same loss; after backward,
all-reduce (sum) the gradients over the group (see `ulysses.py` for why).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from ..attention.hunyuan_processor import project_added_qkv, project_qkv
from .ulysses import (TokenPadding, UlyssesHandle, check_heads_divisible, gather_heads, gather_sequence, group_rank,
                      group_size, heads_to_sequence, pad_rows, sequence_to_heads, shard_sequence)

# attend(q, k, v, text_valid) on (B, heads, video + text, D); text_valid (B, text) marks real text keys.
# When the video tokens were padded to a multiple of sp it is also given video_len= (the real count).
AttendFn = Callable[..., torch.Tensor]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_valid: torch.Tensor | None,
                    video_len: int | None = None) -> torch.Tensor:
    """SDPA over video + text keys; padded text keys (and video keys past video_len) masked."""
    if text_valid is None and video_len is None:
        return F.scaled_dot_product_attention(q, k, v)
    text_len = 0 if text_valid is None else text_valid.shape[1]
    padded_video = k.shape[2] - text_len
    video = (torch.arange(padded_video, device=q.device) < (padded_video if video_len is None else video_len))
    video = video.expand(q.shape[0], padded_video)
    parts = [video] if text_valid is None else [video, text_valid.to(device=q.device, dtype=torch.bool)]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.cat(parts, 1)[:, None, None, :])


class UlyssesHunyuanAttnProcessor:
    """HunyuanVideo's joint attention (video tokens first, then text) with video sharded over `group`."""

    def __init__(self, group: ProcessGroup | None, attend: AttendFn = dense_attention,
                 padding: TokenPadding | None = None):
        self.group, self.attend, self.padding = group, attend, padding or TokenPadding()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        from diffusers.models.embeddings import apply_rotary_emb
        if encoder_hidden_states is None:
            raise ValueError("the Ulysses HunyuanVideo processor expects text tokens (encoder_hidden_states)")
        joint_projections = attn.add_q_proj is not None
        text_len = encoder_hidden_states.shape[1]
        if not joint_projections:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], 1)
        q, k, v = project_qkv(attn, hidden_states)
        video_len = q.shape[1] - (0 if joint_projections else text_len)  # this rank's video tokens
        if joint_projections:
            tq, tk, tv = project_added_qkv(attn, encoder_hidden_states)
        else:
            tq, tk, tv = q[:, video_len:], k[:, video_len:], v[:, video_len:]
        vq, vk, vv = q[:, :video_len], k[:, :video_len], v[:, :video_len]
        if image_rotary_emb is not None:  # this rank's slice of the RoPE table (sharded by install_ulysses)
            vq = apply_rotary_emb(vq, image_rotary_emb, sequence_dim=1)
            vk = apply_rotary_emb(vk, image_rotary_emb, sequence_dim=1)

        # One all-to-all for q, k and v: (B, N/sp, 3, H, D) -> (B, N, 3, H/sp, D).
        vq, vk, vv = sequence_to_heads(torch.stack([vq, vk, vv], 2), self.group, seq_dim=1, head_dim=3).unbind(2)
        sp, rank = group_size(self.group), group_rank(self.group)
        tq, tk, tv = (x.chunk(sp, 2)[rank] for x in (tq, tk, tv))  # replicated text: keep this rank's heads
        q, k, v = (torch.cat(pair, 1).transpose(1, 2) for pair in ((vq, tq), (vk, tk), (vv, tv)))

        text_valid = None if attention_mask is None else attention_mask.reshape(q.shape[0], -1)[:, -text_len:]
        pad_kwargs = {"video_len": self.padding.video_len} if self.padding.pad else {}
        out = self.attend(q, k, v, text_valid, **pad_kwargs).transpose(1, 2).to(q.dtype)  # (B, N + text, H/sp, D)
        full_video = out.shape[1] - text_len
        video_out = heads_to_sequence(out[:, :full_video], self.group).flatten(2, 3)
        text_out = gather_heads(out[:, full_video:], self.group).flatten(2, 3)
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def install_ulysses(transformer: nn.Module, group: ProcessGroup | None, attend: AttendFn = dense_attention,
                    attend_for_layer: Callable[[int], AttendFn] | None = None) -> UlyssesHandle:
    """Shard a HunyuanVideoTransformer3DModel's video tokens over the sequence-parallel `group`.

    The group size must divide the head count. A video token count (frames x height x width
    after patchify) that it does not divide is padded; `attend` then receives video_len=.
    attend_for_layer(layer) gives each layer (dual-stream blocks, then single-stream) its own
    attention (e.g. sliding-tile windows per layer); otherwise every layer uses `attend`.
    Returns a handle whose `remove()` undoes this.
    """
    config = transformer.config
    sp = group_size(group)
    check_heads_divisible(config.num_attention_heads, sp)
    if getattr(config, "image_condition_type", None) == "token_replace":
        raise ValueError("image_condition_type = 'token_replace' (HunyuanVideo-I2V) treats the first frame's tokens "
                         "apart, which the sequence sharding does not handle yet: use sp_size 1 for this model")
    if not all(hasattr(transformer, name) for name in ("x_embedder", "rope", "proj_out", "single_transformer_blocks")):
        raise ValueError(f"{type(transformer).__name__} is not a HunyuanVideoTransformer3DModel")
    if getattr(transformer, "_ulysses_installed", False):
        raise RuntimeError("install_ulysses was already called on this transformer: call remove() on its handle first")
    handle = UlyssesHandle(transformer, dict(transformer.attn_processors))
    padding = TokenPadding()
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for layer, block in enumerate(blocks):
        layer_attend = attend if attend_for_layer is None else attend_for_layer(layer)
        block.attn.set_processor(UlyssesHunyuanAttnProcessor(group, layer_attend, padding))

    # The transformer calls rope before x_embedder, so the rope hook plans the padding of the call.
    def shard_rope(module, args, output):  # (cos, sin), each (N, D/2): the same token slice
        pad = padding.plan(output[0].shape[0], sp)
        return tuple(shard_sequence(pad_rows(table, 0, pad, fill), group, dim=0)
                     for table, fill in zip(output, (1.0, 0.0)))  # padded rows: the identity rotation

    def shard_tokens(module, args, output):  # (B, N, C) -> (B, N/sp, C)
        if output.shape[1] != padding.video_len:
            raise RuntimeError(f"patch embedding gave {output.shape[1]} tokens but the RoPE table "
                               f"{padding.video_len}: the transformer's forward is not the one install_ulysses expects")
        return shard_sequence(pad_rows(output, 1, padding.pad), group, dim=1)

    def gather_tokens(module, args, output):  # (B, N/sp, C) -> (B, N, C) before the unpatchify
        return gather_sequence(output, group, dim=1)[:, :padding.video_len]

    handle.hooks += [transformer.x_embedder.register_forward_hook(shard_tokens),
                     transformer.rope.register_forward_hook(shard_rope),
                     transformer.proj_out.register_forward_hook(gather_tokens)]
    transformer._ulysses_installed = True
    return handle
