"""FLOP and parameter counts of the MMDiT blocks that FLUX and HunyuanVideo share (diffusers' classes).

Generators build their `ModelSpec.forward_flops` / `parameter_count` from these pieces;
tests compare the totals with torch.utils.flop_counter and with `sum(numel)` of the diffusers
classes built from tiny configs (tests/test_bench_throughput.py, tests/test_scaling_model.py).

FLOPs, with d = heads x head_dim, n tokens and lin(n, a, b) = 2 n a b for a linear layer on
n rows (only matrix products and attention are counted; norms, RoPE and activations are not):

- double-stream block (image and text streams, each with its own weights; FLOPs add up):
  lin(n, d, 3d) (q, k, v) + 4 n^2 d (QK^T and AV) + lin(n, d, d) (out) + lin(n, d, r d) +
  lin(n, r d, d) (MLP, hidden r d) + 2 lin(1, d, 6d) (AdaLN-Zero modulation, once per sample);
- single-stream block: lin(n, d, 3d) + 4 n^2 d + lin(n, d, r d) + lin(n, (1 + r) d, d) + lin(1, d, 3d);
- an embedder (timestep, guidance, pooled text): Linear(fan_in, d) -> SiLU -> Linear(d, d), once per sample.
"""
from __future__ import annotations


def lin(rows: int, fan_in: int, fan_out: int) -> int:
    """FLOPs of a linear layer (multiply-adds x 2) on `rows` rows."""
    return 2 * rows * fan_in * fan_out


def double_block_flops(n: int, d: int, hidden: int) -> int:
    """A double-stream block on n = image + text tokens."""
    return (lin(n, d, 3 * d) + 4 * n * n * d + lin(n, d, d) + lin(n, d, hidden) + lin(n, hidden, d)
            + 2 * lin(1, d, 6 * d))


def single_block_flops(n: int, d: int, hidden: int) -> int:
    """A single-stream block on the joint sequence of n tokens (MLP and attention output in one projection)."""
    return lin(n, d, 3 * d) + 4 * n * n * d + lin(n, d, hidden) + lin(n, d + hidden, d) + lin(1, d, 3 * d)


def embedder_flops(fan_in: int, d: int) -> int:
    """Linear(fan_in, d) -> SiLU -> Linear(d, d), once per sample."""
    return lin(1, fan_in, d) + lin(1, d, d)


def linear_params(fan_in: int, fan_out: int, bias: bool = True) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def mlp_params(d: int, hidden: int) -> int:
    return linear_params(d, hidden) + linear_params(hidden, d)


def embedder_params(fan_in: int, d: int) -> int:
    return linear_params(fan_in, d) + linear_params(d, d)


def double_block_params(d: int, head_dim: int, hidden: int) -> int:
    """Two streams, each: AdaLN-Zero modulation (6d), q, k, v, out, MLP; RMS norms on q and k per stream."""
    return 2 * (linear_params(d, 6 * d) + 4 * linear_params(d, d) + mlp_params(d, hidden) + 2 * head_dim)


def single_block_params(d: int, head_dim: int, hidden: int) -> int:
    return (linear_params(d, 3 * d) + 3 * linear_params(d, d) + 2 * head_dim + linear_params(d, hidden)
            + linear_params(d + hidden, d))


def width(config: dict) -> tuple[int, int, int]:
    """(d, head_dim, MLP hidden size) of a FLUX / HunyuanVideo transformer config."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    return d, config["attention_head_dim"], int(d * config.get("mlp_ratio", 4.0))


def joint_attention_layers(config: dict) -> int:
    """Attention layers over the joint (image or video + text) sequence: double plus single blocks."""
    return config["num_layers"] + config["num_single_layers"]
