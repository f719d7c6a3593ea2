"""Refuse a policy whose forward pass depends on its train/eval mode.

The trainer rolls out with the policy in eval mode and recomputes log-probs for the update in
train mode. GRPO's clipped ratio exp(logp_new - logp_old) must be exactly 1 at the first update
of an iteration (same weights, same inputs): the old and the new log-probs must come from the
same computation. Any module whose forward changes with `training` breaks that:

- dropout with p > 0 (nn.Dropout*, nn.AlphaDropout, peft's lora_dropout, nn.MultiheadAttention's
  dropout): a new random mask in every training forward pass, none in eval. Running both passes
  in train mode would not help either: two masks differ, so no dropout rate but 0 gives ratio 1;
  running both in eval mode would silently turn the configured dropout off;
- batch/instance norms that track running statistics: batch statistics in train mode, running
  ones in eval (and train mode also updates the running statistics);
- nn.RReLU with lower != upper: a random slope in train mode.

`check_mode_independent` finds the modules a `policy.train()` / `policy.eval()` switch actually
reaches (for LoRA that is the whole peft model, through `LoraParameters.train`) and refuses the
ones above by name, before any rollout. A custom module that reads `self.training` in its own
forward cannot be recognised this way; the trainer's metric `first_update_logp_max_dev` (and its
warning) catches those at the first iteration.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

MAX_LISTED = 5  # module names shown in the error; the count gives the rest


def mode_dependence(module: nn.Module) -> str | None:
    """Why `module`'s own forward differs between train and eval mode, or None if it does not."""
    if isinstance(module, _DropoutNd) and module.p > 0:
        return f"{type(module).__name__}(p={module.p})"
    if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
        return f"MultiheadAttention(dropout={module.dropout})"
    if isinstance(module, (_BatchNorm, _InstanceNorm)) and module.track_running_stats:
        return f"{type(module).__name__}(track_running_stats=True)"
    if isinstance(module, nn.RReLU) and module.lower != module.upper:
        return f"RReLU(lower={module.lower}, upper={module.upper})"
    return None


def modules_switched_by(policy: nn.Module, root: nn.Module | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules whose `training` flag `policy.train(mode)` changes.

    Looks at `policy`'s modules and, if given, `root`'s (the adapter: a `train()` override may
    reach modules outside `policy`, as LoRA's does). Every flag is restored afterwards. Names are
    `root`'s when the module is inside it, else `policy`'s.
    """
    named: dict[nn.Module, str] = {}
    for owner in (policy, root) if root is not None else (policy,):
        for name, module in owner.named_modules():
            named[module] = name if owner is root or module not in named else named[module]
    before = {module: module.training for module in named}
    try:
        policy.train(False)
        off = {module: module.training for module in named}
        policy.train(True)
        on = {module: module.training for module in named}
    finally:
        for module, flag in before.items():
            module.training = flag
    return [(named[m], m) for m in named if off[m] != on[m]]


def check_mode_independent(policy: nn.Module, root: nn.Module | None = None) -> None:
    """Raise ValueError naming every module (reached by `policy.train()`) whose forward depends on the mode."""
    found = [(name, why) for name, module in modules_switched_by(policy, root)
             if (why := mode_dependence(module)) is not None]
    if not found:
        return
    listed = ", ".join(f"{name or '<root>'} {why}" for name, why in found[:MAX_LISTED])
    more = f" and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
    raise ValueError(
        f"the trained model computes differently in train and eval mode ({len(found)} module(s): {listed}{more}). "
        "Rollouts run in eval mode and updates in train mode, and GRPO's first-update ratio must be exactly 1 "
        "(old and new log-probs from the same computation); random dropout masks or batch statistics make it "
        "drift. Set these rates to 0 (lora.dropout: 0; for the base model, its dropout fields in "
        "<model.path>/<denoiser>/config.json) or use a model without running-statistics norms")
