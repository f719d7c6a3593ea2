"""A training iteration structured like the published DanceGRPO code, on our model and math.

This is the baseline of bench/e2e.py. It reuses a Trainer's model, sampler, rewards,
optimizer and configuration, so only the structure of the loop differs from Trainer.step();
bench/README.md lists which structural choices of the authors' train_grpo_flux.py it keeps:

- rollout one sample per call (batch size 1), all steps of a sample in a row;
- decode each image on its own, write it to a PNG file and read it back, then score it with
  one reward call per image;
- advantages per prompt group in a Python loop;
- per sample, a random permutation of its stochastic steps, trained on the first ceil(tau*K);
- a forward and a backward pass per (sample, step), the loss divided by the accumulation
  count, and a host sync (`.item()`) per micro-step for the running loss, plus the per-sample
  `.item()` reads of reward, advantage and loss the published script prints;
- an optimizer step every N / updates_per_iteration samples (gradient accumulation).

With an SDE window (`sampler.sde_window`, as in configs/quickstart.yaml) only the K steps
inside it are stochastic: they draw noise and record a log-prob, and only they are trained;
the steps outside are ODE steps (the mean, no noise, no log-prob), taken as
dancegrpo.rollout.run_rollout takes them. The published code has no window (every step is
stochastic); without one both loops train ceil(tau*T) of the T steps. Both loops run under
the trainer's autocast setting (`run.autocast_dtype`).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dancegrpo import grpo, sde
from dancegrpo.data import prompts_for_iteration
from dancegrpo.models.base import index_cond, repeat_cond


def _png_round_trip(image: torch.Tensor, path: Path) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> PNG on disk -> (1, 3, H, W) in [0, 1], as the published rollout does."""
    array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)
    loaded = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(loaded).permute(2, 0, 1).unsqueeze(0).to(image.device)


def reference_iteration(trainer, iteration: int) -> dict:
    """One iteration with the published structure on `trainer`'s model; returns its loss and reward."""
    cfg, g = trainer.cfg, trainer.cfg.grpo
    adapter, sampler, device = trainer.adapter, trainer.sampler, trainer.device
    autocast = trainer.ctx.autocast
    prompts = prompts_for_iteration(trainer.train_prompts, iteration, g.prompts_per_iteration, cfg.run.seed)
    sample_prompts = [p for p in prompts for _ in range(g.group_size)]
    num_samples, steps = len(sample_prompts), sampler.num_steps
    stochastic = sampler.stochastic.tolist()           # once per iteration, as ours
    trainable = [s for s in range(steps) if stochastic[s]]
    if not trainable:
        raise ValueError("reference_iteration: no stochastic sampler steps to train on: set sampler.eta > 0")
    cond = repeat_cond(adapter.encode_prompts(prompts), g.group_size)
    gen = torch.Generator(device).manual_seed(1000 + iteration)
    initial = grpo.initial_noise(len(prompts), g.group_size, adapter.latent_shape(), g.shared_group_noise,
                                 generator=gen, device=device)

    # ---- rollout and reward, one sample at a time
    trainer.policy.eval()
    latents, log_probs, rewards = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(num_samples):
            x, c = initial[i : i + 1], index_cond(cond, slice(i, i + 1))
            trajectory, logps = [x], []
            with torch.no_grad():
                with autocast():
                    for s in range(steps):
                        step = torch.full((1,), s, device=device, dtype=torch.long)
                        out = adapter.predict(x, sampler.model_time(step), c)
                        mean, std = sampler.mean_std(out, x, step)
                        if stochastic[s]:
                            noise = torch.randn(x.shape, generator=gen, device=device)
                            x, logp = sde.sde_step_with_log_prob(mean, std, noise=noise, dtype=x.dtype)
                        else:  # an ODE step outside the SDE window: the mean, no noise, no log-prob
                            x, logp = mean.to(x.dtype), torch.full((1,), float("nan"), device=device)
                        trajectory.append(x)
                        logps.append(logp)
                image = adapter.decode(x)[0]
            image = _png_round_trip(image, Path(tmp) / f"sample_{i}.png")
            scores = trainer.rewards.score(image, [sample_prompts[i]])
            rewards.append(sum(w * scores.values[name] for name, w in trainer.rewards.weights.items()))
            latents.append(torch.stack(trajectory, dim=1))
            log_probs.append(torch.stack(logps, dim=1))
    latents, log_probs, reward = torch.cat(latents), torch.cat(log_probs), torch.cat(rewards).float()

    # ---- advantages per group, in a Python loop
    advantages = torch.zeros_like(reward)
    for start in range(0, num_samples, g.group_size):
        group = reward[start : start + g.group_size]
        advantages[start : start + g.group_size] = (group - group.mean()) / (group.std() + 1e-8)

    # ---- training: batch-1 forward and backward per (sample, step), host syncs per micro-step
    trainer.policy.train()
    train_steps = max(1, math.ceil(g.tau * len(trainable) - 1e-9))
    accumulation = max(1, num_samples // cfg.trainer.updates_per_iteration)
    # a permutation of the stochastic steps per sample (CPU generator: host-side indices)
    perms = torch.stack([torch.randperm(len(trainable), device="cpu",
                                        generator=torch.Generator().manual_seed(iteration * 7919 + i))
                         for i in range(num_samples)])
    total_loss = 0.0
    trainer.optimizer.zero_grad()
    for i in range(num_samples):
        c = index_cond(cond, slice(i, i + 1))
        for j in range(train_steps):
            s = trainable[int(perms[i, j])]
            step = torch.full((1,), s, device=device, dtype=torch.long)
            with autocast():
                out = adapter.predict(latents[i : i + 1, s], sampler.model_time(step), c)
                mean, std = sampler.mean_std(out, latents[i : i + 1, s], step)
                _, new_logp = sde.sde_step_with_log_prob(mean, std, prev_sample=latents[i : i + 1, s + 1])
                result = grpo.clipped_ratio_loss(new_logp, log_probs[i : i + 1, s], advantages[i : i + 1],
                                                 g.clip_range, g.adv_clip_max)
                loss = result.loss / (accumulation * train_steps)
            loss.backward()
            total_loss += loss.detach().clone().item()  # the published all-reduce + .item() per micro-step
        if (i + 1) % accumulation == 0:
            torch.nn.utils.clip_grad_norm_(trainer.params, cfg.trainer.grad_clip or math.inf)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
        # the per-sample prints of reward, advantage and loss read them back to the host
        _ = (reward[i].item(), advantages[i].item(), loss.item())
    return {"loss": total_loss, "reward_mean": reward.mean().item()}
