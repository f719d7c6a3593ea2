"""Scale-out: process groups and DeviceMesh, Ulysses sequence parallelism."""
from .hunyuan_ulysses import UlyssesHandle, UlyssesHunyuanAttnProcessor, dense_attention, install_ulysses
from .mesh import ParallelLayout, build_mesh, init_distributed, plan_layout
from .ulysses import (all_to_all, check_heads_divisible, gather_heads, gather_sequence, heads_to_sequence,
                      sequence_to_heads, shard_sequence)

__all__ = ["ParallelLayout", "UlyssesHandle", "UlyssesHunyuanAttnProcessor", "all_to_all", "build_mesh",
           "check_heads_divisible", "dense_attention", "gather_heads", "gather_sequence", "heads_to_sequence",
           "init_distributed", "install_ulysses", "plan_layout", "sequence_to_heads", "shard_sequence"]
