"""Shared by the multi-process tests: a free port, joining a gloo group in a spawned worker, and the
comparison of a sequence-parallel step with the single-process one."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT or a rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, port: int, world: int) -> None:
    """In a worker of `torch.multiprocessing.spawn`: torchrun's variables, one thread, the gloo group."""
    from dancegrpo.distributed import init_distributed
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_distributed("gloo")


def assert_sp_step_matches(result: tuple, reference: tuple, group, tol: float = 1e-5) -> None:
    """`result` and `reference`: (output, input grads {name: tensor}, parameter grads {name: tensor}).

    `result` comes from one rank of a sequence-parallel group, each of whose gradients is that
    rank's share: the shares are summed over `group` (in place) and must equal the reference's
    gradients, and the output the reference's, within `tol` absolute or relative (fp32; gradients
    summed over many tokens reach ~20).
    """
    out, input_grads, param_grads = result
    ref_out, ref_inputs, ref_params = reference
    for grads in (input_grads, param_grads):
        for grad in grads.values():
            dist.all_reduce(grad, group=group)
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    for kind, grads, ref_grads in (("input", input_grads, ref_inputs), ("parameter", param_grads, ref_params)):
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=tol, atol=tol,
                                       msg=lambda m, name=name, kind=kind: f"{kind} grad {name}: {m}")
