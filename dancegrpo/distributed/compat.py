"""Which scale-out options go together: the pairs that cannot are refused from the config alone,
before any weights are read.

What works together (each tested on CPU with gloo processes, see docs/distributed.md): data
parallelism, FSDP2 and HSDP, activation checkpointing, compiled blocks, Ulysses (with or without
sliding-tile attention, with FSDP), a full fine-tune or LoRA under any of them, a KL term and an
EMA. What cannot, refused here:

- `parallel.sp_size > 1` with a model whose ModelSpec does not set `sequence_parallel`: Ulysses
  shards video tokens and is implemented for HunyuanVideoTransformer3DModel and
  WanTransformer3DModel only (`parallelize.SEQUENCE_PARALLEL_INSTALLERS`; image models scale
  with data parallelism and FSDP);
- `model.options.gradient_checkpointing: true` with `parallel.activation_checkpointing` other
  than `none`: both checkpoint the same blocks, which would be recomputed twice.
"""
from __future__ import annotations


def option_pair_problems(cfg) -> list[str]:
    """The refused pairs present in a Config (see the module docstring); [] when none."""
    from ..models import model_names
    par, model = cfg.parallel, cfg.model
    problems = []
    sequence_parallel = model_names("sequence_parallel")   # the models whose ModelSpec says so
    if par.sp_size > 1 and model.name not in sequence_parallel:
        problems.append(f"parallel.sp_size = {par.sp_size} with model.name = {model.name!r}: Ulysses sequence "
                        f"parallelism exists for {', '.join(sequence_parallel)} only; use sp_size 1 "
                        "(data parallelism and parallel.fsdp scale the other models)")
    if model.options.get("gradient_checkpointing") and par.activation_checkpointing != "none":
        problems.append(f"model.options.gradient_checkpointing = true with parallel.activation_checkpointing = "
                        f"{par.activation_checkpointing!r}: both checkpoint the same blocks; keep one (the "
                        "parallel one also offers 'selective' and checkpoint_every_n_blocks)")
    return problems


def check_option_pairs(cfg) -> None:
    """Raise ValueError listing every refused pair of options in `cfg`."""
    problems = option_pair_problems(cfg)
    if problems:
        raise ValueError("options that do not go together: " + "; ".join(problems))
