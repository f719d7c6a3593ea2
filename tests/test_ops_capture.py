"""The fused ops' hot path, checked on the CPU for what a CUDA graph needs: no host syncs, no
tensors built from host values, no per-call schedule work; and the whole-loop graph option.

A CUDA graph cannot contain a host sync (.item(), .tolist(), bool(tensor), .cpu()) nor a
tensor created from host data (torch.tensor(...) copies from the host). Without a GPU, the
`HostTraffic` counter below wraps those calls and counts them while the hot path runs.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from dancegrpo import cuda_graph, ops, sampler as sampler_module
from dancegrpo.models import repeat_cond
from dancegrpo.ops import schedule as schedule_module, sde_step as sde_step_module
from dancegrpo.rollout import run_rollout
from dancegrpo.sampler import DDIMSampler, FlowSampler, build_sampler
from ops_helpers import cpu_kernel_backends

KERNELS = cpu_kernel_backends()
SYNCS = ("item", "tolist", "__bool__", "cpu", "numpy", "__int__", "__float__", "__index__")
HOST_DATA = ("tensor", "as_tensor")


@contextlib.contextmanager
def host_traffic():
    """Count host syncs on tensors and tensors created from host data, by name."""
    counts: dict[str, int] = {}
    originals = []

    def wrap(owner, name):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            # as_tensor of a tensor is a no-op (or a device-side cast), not a copy from the host
            if not (name == "as_tensor" and args and isinstance(args[0], torch.Tensor)):
                counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)

        originals.append((owner, name, original))
        setattr(owner, name, counted)

    for name in SYNCS:
        wrap(torch.Tensor, name)
    for name in HOST_DATA:
        wrap(torch, name)
    try:
        yield counts
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


SAMPLERS = {
    "flow_dancegrpo": lambda: FlowSampler(10, 3.0, 0.7, "dancegrpo"),
    "flow_grpo": lambda: FlowSampler(10, 3.0, 0.7, "flow_grpo"),
    "ddim": lambda: DDIMSampler(10, 1.0),
}


def _inputs(shape=(3, 4, 6, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(3)]


def _rollout_and_training(sampler, backend, x, v, noise, step):
    """One rollout step, one training step (forward + backward) and the clipped loss."""
    with torch.no_grad():
        next_sample, old = ops.sampler_step(sampler, v, x, step, noise=noise, backend=backend)
    v_grad = v.clone().requires_grad_()
    _, new = ops.sampler_step(sampler, v_grad, x, step, prev_sample=next_sample, backend=backend)
    out = ops.fused_clipped_loss(new, old, torch.linspace(-1, 1, new.shape[0]), 1e-3, 5.0, backend=backend)
    out.loss.backward()
    return v_grad.grad


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_rollout_and_training_steps_have_no_host_syncs(backend, kind):
    sampler = SAMPLERS[kind]()
    x, v, noise = _inputs()
    step = torch.tensor([0, 4, 9])
    _rollout_and_training(sampler, backend, x, v, noise, step)  # builds and validates the table once
    with host_traffic() as counts:
        grad = _rollout_and_training(sampler, backend, x, v, noise, step)
    assert counts == {}, f"host syncs / host-built tensors on the hot path: {counts}"
    assert grad.abs().sum() > 0


def test_the_counter_sees_a_per_call_validation():
    """The detector can fail: per-sample tensor schedule values are validated on every call,
    which on the CPU reads the std back (bool(tensor))."""
    x, v, noise = _inputs()
    sigma = torch.tensor([0.9, 0.6, 0.3])
    with host_traffic() as counts:
        ops.fused_sde_step(v, x, sigma=sigma, sigma_next=sigma - 0.1, eta=0.5, noise=noise, backend=KERNELS[0])
    assert counts.get("__bool__", 0) >= 1
    with host_traffic() as counts:
        torch.as_tensor(torch.tensor([1.0])).item()
        torch.as_tensor(0.5)
    assert counts == {"tensor": 1, "item": 1, "as_tensor": 1}


class _Counting:
    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_the_schedule_is_built_once_per_sampler(monkeypatch, kind):
    builds = _Counting(monkeypatch, sampler_module, "step_table")
    per_call = _Counting(monkeypatch, sde_step_module, "step_table")
    flow = _Counting(monkeypatch, schedule_module, "flow_coefficients")
    ddim = _Counting(monkeypatch, schedule_module, "ddim_coefficients")
    sampler = SAMPLERS[kind]()
    x, v, noise = _inputs()
    for i in range(6):
        step = torch.full((3,), i, dtype=torch.long)
        _rollout_and_training(sampler, KERNELS[0], x, v, noise, step)
    assert builds.calls == 1 and sampler.table_builds == 1
    assert per_call.calls == 0 and flow.calls + ddim.calls == 1
    sampler.step_coefficients(torch.float64)  # another compute dtype: one more table
    assert sampler.table_builds == 2
    sampler.to("cpu")  # moving the sampler forgets its tables
    _rollout_and_training(sampler, KERNELS[0], x, v, noise, torch.tensor([1, 2, 3]))
    assert sampler.table_builds == 3


def test_float_schedules_are_converted_once(monkeypatch):
    monkeypatch.setattr(sde_step_module, "_float_tables", {})  # tables other tests cached in this process
    builds = _Counting(monkeypatch, sde_step_module, "step_table")
    x, v, noise = _inputs(seed=1)
    first = [ops.fused_sde_step(v, x, sigma=0.7, sigma_next=0.62, eta=0.7, noise=noise, backend=KERNELS[0])
             for _ in range(4)]
    assert builds.calls == 1
    assert all(torch.equal(out.log_prob, first[0].log_prob) for out in first)
    ops.fused_sde_step(v, x, sigma=0.7, sigma_next=0.62, eta=0.5, noise=noise, backend=KERNELS[0])
    assert builds.calls == 2
    # and the cached single-row table gives the numbers of per-sample tensors of the same values
    per_sample = ops.fused_sde_step(v, x, sigma=torch.full((3,), 0.7), sigma_next=torch.full((3,), 0.62), eta=0.7,
                                    noise=noise, backend=KERNELS[0])
    assert torch.equal(per_sample.log_prob, first[0].log_prob)
    assert torch.equal(per_sample.next_sample, first[0].next_sample)


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_sampler_table_gives_the_per_call_numbers_bit_for_bit(kind):
    sampler = SAMPLERS[kind]()
    x, v, noise = _inputs(seed=2)
    step = torch.tensor([0, 5, 9])
    got = ops.sampler_step(sampler, v, x, step, noise=noise, backend=KERNELS[0])
    # the per-call path: the eta argument differs from the sampler's by nothing but its type
    schedule = sde_step_module._sampler_schedule(sampler, step)
    want = ops.fused_sde_step(v, x, prediction=sampler.prediction, eta=torch.tensor(sampler.eta), noise=noise,
                              backend=KERNELS[0], **schedule)
    assert torch.equal(got.next_sample, want.next_sample) and torch.equal(got.log_prob, want.log_prob)


def test_step_indices_are_checked(monkeypatch):
    sampler = FlowSampler(10, 3.0, 0.7)
    x, v, noise = _inputs()
    with pytest.raises(IndexError, match="row 10, but the table has 10 rows"):
        ops.sampler_step(sampler, v, x, torch.tensor([0, 10, 2]), noise=noise, backend=KERNELS[0])
    monkeypatch.setattr("dancegrpo.ops.validation._debug_checks", True)
    with pytest.raises(ValueError, match=r"step indices \[-1\] are outside the sampler's 10 steps"):
        ops.sampler_step(sampler, v, x, torch.tensor([0, -1, 2]), noise=noise, backend=KERNELS[0])
    with pytest.raises(ValueError, match=r"step must be an int64 tensor of shape \(3,\)"):
        ops.sampler_step(sampler, v, x, torch.tensor([0, 1, 2], dtype=torch.int32), noise=noise, backend=KERNELS[0])
    with pytest.raises(ValueError, match=r"step must be an int64 tensor of shape \(3,\).*got int"):
        ops.sampler_step(sampler, v, x, 3, noise=noise, backend=KERNELS[0])


def test_an_eta_zero_sampler_is_refused_once_with_the_std_message():
    sampler = FlowSampler(10, 3.0, 0.0)
    x, v, noise = _inputs()
    with pytest.raises(ValueError, match="std must be > 0"):
        ops.sampler_step(sampler, v, x, torch.tensor([0, 1, 2]), noise=noise, backend=KERNELS[0])


# ------------------------------------------------------------------ whole-loop CUDA graph

def test_cuda_graph_is_refused_without_a_gpu(tiny_config):
    with pytest.raises(ValueError, match="sampler.cuda_graph: true .* needs a CUDA device, but the sampler runs on cpu"):
        build_sampler("flow", 4, 0.3, cuda_graph=True)
    from dancegrpo.trainer import Trainer

    tiny_config["sampler"]["cuda_graph"] = True
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Trainer(tiny_config)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        cuda_graph.graphed_rollout(None, FlowSampler(4, 3.0, 0.3), {}, torch.zeros(2, 3), [torch.arange(2)], None,
                                   "mean")


def test_the_graph_body_equals_the_eager_rollout_without_host_syncs(tiny_config):
    """denoise_chunk is what the graph captures; run eagerly here, it must give run_rollout's
    latents and log-probs bit for bit from the same noise draws, and touch the host never."""
    from dancegrpo.trainer import Trainer

    tiny_config["sampler"].update(num_steps=5, sde_window=[1, 4])
    trainer = Trainer(tiny_config)
    adapter, sampler = trainer.adapter, trainer.sampler
    cond = repeat_cond(adapter.encode_prompts(["a red circle", "a blue square"]), 2)
    init = torch.randn(4, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    eager = run_rollout(adapter, sampler, cond, init, chunk_size=4, generator=torch.Generator().manual_seed(1))

    gen = torch.Generator().manual_seed(1)
    noises = [torch.randn(init.shape, generator=gen) for _ in sampler.stochastic_steps]
    steps = [torch.full((4,), i, dtype=torch.long) for i in range(5)]
    latents = init.new_empty((4, 5, *init.shape[1:]))
    log_probs = torch.full((4, 5), float("nan"))
    with torch.no_grad():
        cuda_graph.denoise_chunk(adapter, sampler, init, cond, noises, steps, latents, log_probs)  # warm-up
        with host_traffic() as counts:
            cuda_graph.denoise_chunk(adapter, sampler, init, cond, noises, steps, latents, log_probs)
    assert counts == {}, f"host syncs / host-built tensors in the loop body: {counts}"
    assert torch.equal(latents, eager.latents[:, 1:])
    torch.testing.assert_close(log_probs, eager.log_probs, rtol=0, atol=0, equal_nan=True)  # exact
    assert log_probs[:, 1:4].isfinite().all() and log_probs[:, [0, 4]].isnan().all()
