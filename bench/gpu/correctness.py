"""(a) Fused-op correctness against float64 references, for every backend on the device.

`fused_sde_step` in rollout mode (sampled action and its log-prob) and training mode
(log-prob of a recorded action and its gradient w.r.t. the model output), for the three
steps it implements, and `fused_clipped_loss` (loss, gradient, ratio statistics). The
references are written out here in float64 from the papers' formulas, independently of
dancegrpo.sde and dancegrpo.grpo:

- DanceGRPO (Xue et al. 2025, flow SDE): x0 = x - s v; score = -(x - (1 - s) x0) / s^2;
  mean = x + (s' - s) v - eta^2 / 2 * score * (s' - s); std = eta sqrt(s - s').
- Flow-GRPO (Liu et al. 2025, arXiv:2505.05470): sd = eta sqrt(s / (1 - s));
  mean = x (1 + sd^2 (s' - s) / (2 s)) + v (1 + sd^2 (1 - s) / (2 s)) (s' - s); std = sd sqrt(s - s').
- DDIM (Song et al. 2021, eq. 12, epsilon prediction): x0 = (x - sqrt(1 - a) e) / sqrt(a);
  std = eta sqrt((1 - a') / (1 - a) (1 - a / a')); mean = sqrt(a') x0 + sqrt(1 - a' - std^2) e.
- log-prob: the mean over elements of -(y - mean)^2 / (2 std^2) - log std - log(2 pi) / 2.
- clipped loss (PPO, Schulman et al. 2017): mean of max(-A r, -A clip(r, 1 - c, 1 + c)),
  r = exp(new - old), A clamped to +-adv_clip_max; d/d new = -A r where the unclipped term wins.

A row passes when its error is within the tolerance of its dtype (float32: relative 1e-4 of
the compared values' scale; bfloat16 latents: one bfloat16 rounding of the action, 2^-7 relative)
and, for the SDE step, the rollout and training log-probs of the same action are bit-identical.
"""
from __future__ import annotations

import math

import torch

from .common import Context, Skip

NAME = "correctness"
TITLE = "(a) Fused-op correctness against float64 references"
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
CASES = ("flow_dancegrpo", "flow_grpo", "ddim")
DTYPES = ("float32", "bfloat16")


def units(ctx: Context) -> list[str]:
    from dancegrpo import ops
    names = [b for b in ops.BACKENDS if ctx.cuda or b not in ("cuda",)]
    return [f"sde_step/{b}/{case}/{dtype}" for b in names for case in CASES for dtype in DTYPES] + \
        [f"clipped_loss/{b}" for b in names]


def _available(backend: str, device: torch.device) -> None:
    from dancegrpo import ops
    if backend not in ops.available_backends(device):
        try:
            ops.resolve_backend(backend, device)
        except (RuntimeError, ValueError) as exc:
            raise Skip(str(exc).split(". Available")[0]) from None
        raise Skip(f"backend {backend} is not available on {device}")


def _schedule(case: str, batch: int, device: torch.device) -> tuple[dict, dict]:
    """(kwargs of fused_sde_step, the same values as float64 tensors of shape (B,)) at mixed steps."""
    gen = torch.Generator().manual_seed(7)
    if case == "ddim":
        # A scaled-linear beta schedule (SD v1.4's: 0.00085 to 0.012 over 1000 steps), 50 DDIM steps.
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)
        t = torch.randint(21, 1000, (batch,), generator=gen, device="cpu")
        a, a_prev = abar[t], abar[t - 20]
        values = dict(abar_t=a, abar_prev=a_prev, eta=torch.full((batch,), 1.0, dtype=torch.float64))
        kwargs = dict(prediction="ddim", abar_t=a.float().to(device), abar_prev=a_prev.float().to(device), eta=1.0)
        return kwargs, values
    # A FLUX-style shifted schedule (shift 3) of 16 steps.
    t = torch.linspace(1, 0, 17, dtype=torch.float64)
    sigmas = 3 * t / (1 + 2 * t)
    steps = torch.randint(1, 15, (batch,), generator=gen, device="cpu")
    s, s_next = sigmas[steps].float(), sigmas[steps + 1].float()
    eta = 0.7
    values = dict(sigma=s.double(), sigma_next=s_next.double(), eta=torch.full((batch,), eta, dtype=torch.float64))
    form = "flow_grpo" if case == "flow_grpo" else "dancegrpo"
    kwargs = dict(prediction="flow", form=form, sigma=s.to(device), sigma_next=s_next.to(device), eta=eta)
    if form == "flow_grpo":
        kwargs["sigma_max"] = float(sigmas[1])
    return kwargs, values


def reference_mean_std(case: str, v: torch.Tensor, x: torch.Tensor, values: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean (B, ...) and std (B, 1, ...) of one step, from the formulas of the module docstring."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    x, v = x.double(), v.double()
    if case == "ddim":
        a, a_prev, eta = (values[k].to(x.device).view(shape) for k in ("abar_t", "abar_prev", "eta"))
        x0 = (x - torch.sqrt(1 - a) * v) / torch.sqrt(a)
        std = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        return torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev - std ** 2) * v, std
    s, s_next, eta = (values[k].to(x.device).view(shape) for k in ("sigma", "sigma_next", "eta"))
    dt = s_next - s
    if case == "flow_grpo":
        sd = eta * torch.sqrt(s / (1 - s))
        mean = x * (1 + sd ** 2 * dt / (2 * s)) + v * (1 + sd ** 2 * (1 - s) / (2 * s)) * dt
        return mean, sd * torch.sqrt(-dt)
    x0 = x - s * v
    score = -(x - (1 - s) * x0) / s ** 2
    return x + dt * v - 0.5 * eta ** 2 * score * dt, eta * torch.sqrt(-dt)


def reference_log_prob(action: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    lp = -((action.double() - mean) ** 2) / (2 * std ** 2) - torch.log(std) - HALF_LOG_2PI
    return lp.flatten(1).mean(1)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().clamp_min(1.0)
    return float((got.double() - want).abs().max() / scale)


def sde_step_unit(ctx: Context, backend: str, case: str, dtype_name: str) -> dict:
    from dancegrpo import ops
    _available(backend, ctx.device)
    dtype = getattr(torch, dtype_name)
    shape = (3, 4, 6, 8) if ctx.tiny else (4, 16, 45, 45)
    gen = torch.Generator(ctx.device).manual_seed(0)
    v, x, noise = (torch.randn(shape, generator=gen, device=ctx.device).to(dtype) for _ in range(3))
    kwargs, values = _schedule(case, shape[0], ctx.device)
    # Rollout mode: the action as stored (latent dtype) and its log-prob.
    out = ops.fused_sde_step(v, x, noise=noise, backend=backend, **kwargs)
    mean, std = reference_mean_std(case, v, x, values)
    want_action = mean + std * noise.double()
    action_err = _rel_err(out.next_sample, want_action)
    # The log-prob of the action the kernel stored (a bf16 action is rounded: score what was kept).
    lp_err = _rel_err(out.log_prob, reference_log_prob(out.next_sample, mean, std))
    # Training mode: log-prob of the recorded action and d(sum of log-probs)/d(model output).
    vg = v.detach().clone().requires_grad_(True)
    train = ops.fused_sde_step(vg, x, prev_sample=out.next_sample, backend=backend, **kwargs)
    weights = torch.linspace(0.5, 1.5, shape[0], device=ctx.device)
    (train.log_prob * weights).sum().backward()
    v64 = v.double().requires_grad_(True)
    mean64, std64 = reference_mean_std(case, v64, x, values)
    lp64 = reference_log_prob(out.next_sample, mean64, std64)
    (lp64 * weights.double()).sum().backward()
    grad_err = _rel_err(vg.grad, v64.grad) if vg.grad is not None else float("nan")
    identical = bool(torch.equal(train.log_prob, out.log_prob))
    # Tolerances: float32 rounding of the arithmetic; a bf16 action is one bf16 rounding of a float32 one.
    action_tol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5
    lp_tol, grad_tol = (1e-4, 1e-3) if dtype == torch.float32 else (1e-3, 2e-2)
    ok = action_err <= action_tol and lp_err <= lp_tol and grad_err <= grad_tol and identical
    return dict(op="sde_step", backend=backend, case=case, dtype=dtype_name, shape="x".join(map(str, shape)),
                action_rel_err=action_err, logp_rel_err=lp_err, grad_rel_err=grad_err,
                rollout_train_logp_identical=identical, tolerance=f"{action_tol:g}/{lp_tol:g}/{grad_tol:g}",
                status="ok" if ok else "FAILED")


def clipped_loss_unit(ctx: Context, backend: str) -> dict:
    from dancegrpo import ops
    _available(backend, ctx.device)
    n = 64 if ctx.tiny else 4096
    gen = torch.Generator(ctx.device).manual_seed(1)
    old = torch.randn(n, generator=gen, device=ctx.device) * 0.1
    new = (old + torch.randn(n, generator=gen, device=ctx.device) * 2e-4).requires_grad_(True)
    adv = torch.randn(n, generator=gen, device=ctx.device) * 3
    clip, adv_max = 1e-4, 5.0
    out = ops.fused_clipped_loss(new, old, adv, clip, adv_max, backend=backend)
    out.loss.backward()
    n64, o64, a64 = new.detach().double().requires_grad_(True), old.double(), adv.double().clamp(-adv_max, adv_max)
    ratio = torch.exp(n64 - o64)
    loss = torch.maximum(-a64 * ratio, -a64 * ratio.clamp(1 - clip, 1 + clip)).mean()
    loss.backward()
    clipped = ((ratio - 1).abs() > clip).double().mean()
    errs = dict(loss_rel_err=abs(float(out.loss) - float(loss)) / max(1.0, abs(float(loss))),
                grad_rel_err=_rel_err(new.grad, n64.grad) * n,   # per-element gradients are O(1/n)
                ratio_rel_err=_rel_err(out.ratio, ratio.detach()),
                clip_fraction_err=abs(float(out.clip_fraction) - float(clipped)))
    ok = (errs["loss_rel_err"] <= 1e-5 and errs["grad_rel_err"] <= 1e-5 and errs["ratio_rel_err"] <= 1e-6
          and errs["clip_fraction_err"] <= 1.5 / n)
    return dict(op="clipped_loss", backend=backend, case=f"N={n}", dtype="float32", shape=str(n), **errs,
                tolerance="1e-5/1e-5/1e-6/1.5/N", status="ok" if ok else "FAILED")


def run_unit(ctx: Context, unit: str) -> list[dict]:
    parts = unit.split("/")
    if parts[0] == "sde_step":
        return [sde_step_unit(ctx, *parts[1:])]
    return [clipped_loss_unit(ctx, parts[1])]


def summarize(rows: list[dict], ctx: Context) -> str:
    from .common import markdown_table
    ok = [r for r in rows if r.get("status") in ("ok", "FAILED")]
    sde = [r for r in ok if r.get("op") == "sde_step"]
    loss = [r for r in ok if r.get("op") == "clipped_loss"]
    parts = []
    if sde:
        parts.append(markdown_table(sde, ["backend", "case", "dtype", "action_rel_err", "logp_rel_err", "grad_rel_err",
                                          "rollout_train_logp_identical", "status"],
                                    ["backend", "step", "dtype", "action err", "log-prob err", "grad err",
                                     "rollout = training log-prob", "status"]))
    if loss:
        parts.append(markdown_table(loss, ["backend", "case", "loss_rel_err", "grad_rel_err", "ratio_rel_err",
                                           "clip_fraction_err", "status"]))
    parts.append("Errors are max |got - float64| / max(1, max |float64|) (the gradient of the loss times N). "
                 "Tolerances (action / log-prob / gradient): float32 1e-5 / 1e-4 / 1e-3, bfloat16 2^-7 / 1e-3 / 2e-2.")
    return "\n\n".join(parts)
