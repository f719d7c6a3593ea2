"""Triton kernels of the fused DanceGRPO ops (installed as `dancegrpo.kernels`).

The launchers take and return the same tensors as the C++/CUDA extensions, so
dancegrpo.ops drives every backend the same way. On a CPU they run only under the Triton
interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""
from .clipped_loss import clipped_loss
from .sde_step import sde_step_backward, sde_step_log_prob, sde_step_sample

__all__ = ["clipped_loss", "sde_step_backward", "sde_step_log_prob", "sde_step_sample"]
