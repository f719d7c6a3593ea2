"""Joining torchrun's processes: the data-parallel layout and the device mesh of a run."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import Config, ConfigError, trainable_pairs
from .compat import check_option_pairs
from .data_parallel import DataParallel
from .launch import init_process_group, launched_world_size


def setup_parallel(cfg: Config, device: torch.device) -> tuple[DataParallel, object | None, torch.device]:
    """(DataParallel, DeviceMesh or None, device) of this process; joins the process group when WORLD_SIZE > 1.

    Under torchrun a CUDA run moves to LOCAL_RANK's GPU (the returned device). Every refusal
    (sizes that do not divide, option pairs that cannot work together) comes before any weights
    are read. Raises ValueError / ConfigError naming the fields.
    """
    par = cfg.parallel
    if launched_world_size() == 1:
        for name, on in (("parallel.sp_size", par.sp_size != 1), ("parallel.fsdp.enabled", par.fsdp.enabled)):
            if on:
                raise ValueError(f"{name} needs several processes: launch with torchrun "
                                 f"(e.g. `torchrun --nproc_per_node 8 -m dancegrpo.cli train ...`), "
                                 "or turn it off for a single process")
        check_option_pairs(cfg)
        return DataParallel(placement=par.group_placement), None, device
    check_option_pairs(cfg)  # before any weights are read
    from .mesh import build_mesh
    init_process_group("gloo" if device.type == "cpu" else None)  # NCCL only for GPU tensors
    if device.type == "cuda":  # each process its own GPU: LOCAL_RANK's (set when joining)
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = build_mesh(par.sp_size, device.type)
    dp_mesh = mesh["dp"]
    dp = DataParallel(rank=dp_mesh.get_local_rank(), size=dp_mesh.size(), placement=par.group_placement,
                      group=dp_mesh.get_group(), world=dist.get_world_size())
    g = cfg.grpo
    dp.check_sizes(g.prompts_per_iteration, g.group_size)
    pairs, updates = trainable_pairs(cfg, dp.size), cfg.trainer.updates_per_iteration
    if pairs is not None and updates > pairs:
        raise ConfigError([f"trainer.updates_per_iteration = {updates} is more than the {pairs} (micro-batch, "
                           f"step) pairs each of the {dp.size} data-parallel ranks trains on per iteration; "
                           f"lower it to at most {pairs}, or use fewer ranks"])
    if dp.placement == "spread" and dp.size > 1 and g.best_of_n_keep and (2 * g.best_of_n_keep) % dp.size:
        raise ValueError(f"grpo.best_of_n_keep = {g.best_of_n_keep} with group_placement 'spread': each of the "
                         f"{dp.size} data-parallel ranks keeps an equal share of every group's 2 * best_of_n_keep = "
                         f"{2 * g.best_of_n_keep} samples; use a best_of_n_keep with 2 * best_of_n_keep a multiple "
                         f"of {dp.size}, or group_placement 'rank'")
    return dp, mesh, device
