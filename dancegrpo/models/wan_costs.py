"""Token counts, FLOPs and parameter counts of diffusers' `WanTransformer3DModel` (Wan 2.1 / 2.2
text-to-video, Wan 2.1 image-to-video): the bench fields of the `wan_t2v` and `wan_i2v` specs.

Read off diffusers' transformer_wan.py (v0.42). With d = heads x head_dim, F the FFN width,
N_v video tokens, N_t text tokens, N_c = 257 CLIP image tokens (image-to-video only: the config
sets `image_dim` and `added_kv_proj_dim`) and lin(n, a, b) = 2 n a b (transformer_costs.lin):

- each `WanTransformerBlock`: self-attention over the video tokens, lin(N_v, d, 3d) + 4 N_v^2 d +
  lin(N_v, d, d); cross-attention, lin(N_v, d, d) (q) + lin(N_t, d, 2d) (k, v of the text) +
  4 N_v N_t d + lin(N_v, d, d) (out), plus for image-to-video lin(N_c, added_kv_proj_dim, 2d) +
  4 N_v N_c d (its image keys and values); the FFN lin(N_v, d, F) + lin(N_v, F, d). The AdaLN
  modulation is a learned table added to the shared timestep projection: no matmul per block;
- once per sample: the timestep embedder (freq_dim -> d -> d) and its projection (d -> 6d); the
  text embedder (text_dim -> d -> d on each text token); image-to-video's image embedder
  (image_dim -> image_dim -> d on each CLIP token); the patch embedding (a Conv3d, as
  lin(N_v, in_channels x prod(patch), d)); the output projection lin(N_v, d, out x prod(patch)).

Only matrix products and attention are counted (norms, RoPE, activations are not); tests compare
these with torch.utils.flop_counter and `sum(numel)` on tiny configs (tests/test_bench_costs.py).
"""
from __future__ import annotations

import math

from . import transformer_costs as costs

#: CLIP image tokens of Wan 2.1 image-to-video (ViT-H/14 at 224: 16 x 16 patches + the class token).
IMAGE_TOKENS = 257
#: WanPipeline's max_sequence_length (the UMT5 sequence of the prompt cache).
TEXT_TOKENS = 512


def _latent_frames(options: dict) -> int:
    return (options.get("frames", 1) - 1) // 4 + 1   # 4x temporal compression after the first frame


def token_counts(config: dict, options: dict) -> tuple[int, int]:
    """(video tokens, text tokens): the VAE's 8x spatial and 4x temporal compression, then the
    (t, h, w) patches of `config["patch_size"]`; text: options' max_sequence_length (512)."""
    pt, ph, pw = config["patch_size"]
    h, w = options["height"] // 8, options["width"] // 8
    return (_latent_frames(options) // pt) * (h // ph) * (w // pw), options.get("max_sequence_length", TEXT_TOKENS)


def _width(config: dict) -> tuple[int, int, int]:
    """(d, FFN width, channels x prod(patch) of the output)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    out = config.get("out_channels") or config["in_channels"]
    return d, config["ffn_dim"], out * math.prod(config["patch_size"])


def forward_flops(config: dict, image_tokens: int, text_tokens: int) -> int:
    """One sample's forward (the module docstring's terms; `image_tokens` are the video tokens)."""
    d, ffn, out = _width(config)
    nv, nt = image_tokens, text_tokens
    block = (costs.lin(nv, d, 3 * d) + 4 * nv * nv * d + costs.lin(nv, d, d)          # self-attention
             + costs.lin(nv, d, d) + costs.lin(nt, d, 2 * d) + 4 * nv * nt * d + costs.lin(nv, d, d)  # cross
             + costs.lin(nv, d, ffn) + costs.lin(nv, ffn, d))
    image = 0
    if config.get("image_dim"):
        nc, dim = IMAGE_TOKENS, config["image_dim"]
        block += costs.lin(nc, config["added_kv_proj_dim"], 2 * d) + 4 * nv * nc * d
        image = costs.lin(nc, dim, dim) + costs.lin(nc, dim, d)
    return (costs.embedder_flops(config["freq_dim"], d) + costs.lin(1, d, 6 * d)
            + costs.lin(nt, config["text_dim"], d) + costs.lin(nt, d, d) + image
            + costs.lin(nv, config["in_channels"] * math.prod(config["patch_size"]), d)
            + config["num_layers"] * block + costs.lin(nv, d, out))


def block_parameter_counts(config: dict) -> list[int]:
    """Each `WanTransformerBlock`: q, k, v, out and RMS norms (over d) of both attentions, the
    image keys and values (image-to-video), the cross-attention's affine LayerNorm (`cross_attn_norm`),
    the FFN and the 6 x d modulation table."""
    d, ffn, _ = _width(config)
    attention = 4 * costs.linear_params(d, d) + 2 * d
    block = 2 * attention + costs.mlp_params(d, ffn) + 6 * d + (2 * d if config.get("cross_attn_norm") else 0)
    if config.get("added_kv_proj_dim"):
        block += 2 * costs.linear_params(config["added_kv_proj_dim"], d) + d
    return [block] * config["num_layers"]


def parameter_count(config: dict) -> int:
    """Blocks, the patch embedding, the timestep / text (/ image) embedders, the output head and its
    2 x d modulation table."""
    d, _, out = _width(config)
    image = 0
    if config.get("image_dim"):
        dim = config["image_dim"]
        image = 2 * dim + costs.linear_params(dim, dim) + costs.linear_params(dim, d) + 2 * d   # norms, FFN
        image += (config.get("pos_embed_seq_len") or 0) * dim
    return (sum(block_parameter_counts(config))
            + costs.linear_params(config["in_channels"] * math.prod(config["patch_size"]), d)
            + costs.embedder_params(config["freq_dim"], d) + costs.linear_params(d, 6 * d)
            + costs.embedder_params(config["text_dim"], d) + image + costs.linear_params(d, out) + 2 * d)


# The tiny configs of `bench.throughput --tiny` and the tests: every part of the class at test size
# (image-to-video: 8 input channels, CLIP image tokens 12 wide; its text must be 512 tokens, the
# length diffusers' WanAttnProcessor splits the image tokens off at).
TINY_T2V = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=8, ffn_dim=32, num_layers=2, rope_max_seq_len=32, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads")
TINY_I2V = {**TINY_T2V, "in_channels": 8, "image_dim": 12, "added_kv_proj_dim": 16}   # = d, as published
TINY_T2V_OPTIONS = dict(height=64, width=64, frames=5, max_sequence_length=8)
TINY_I2V_OPTIONS = dict(height=64, width=64, frames=5, max_sequence_length=TEXT_TOKENS)
