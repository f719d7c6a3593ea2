"""LoRA through peft: wrap a denoiser, expose only the LoRA weights to the trainer, save both ways.

The trainer trains, checkpoints and EMA-averages `adapter.trainable.parameters()` and calls
`requires_grad_(True)` on it. For LoRA that module must hold the LoRA weights alone (not the
frozen base), so `LoraParameters` is a thin module that registers the very same Parameter
objects as the peft model (no copies): optimizer steps, checkpoint loads and EMA swaps act on
the live LoRA layers.

On disk:
- `<dir>/<denoiser>_lora/`: peft's own format (adapter_config.json, adapter_model.safetensors),
  loadable with `PeftModel.from_pretrained(base, dir)`;
- optionally `<dir>/<denoiser>/`: the merged weights in the diffusers format, loadable with
  `<Class>.from_pretrained(dir, subfolder=<denoiser>)`, with no peft needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .options import CheckedOptions, at_least, greater_than

DEFAULT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]  # the authors' FLUX LoRA script


@dataclass
class LoraOptions(CheckedOptions):
    rank: int = 64
    alpha: float = 128.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    dropout: float = 0.0       # must be 0 (see validate): kept so that a config stating it reads as meant
    save_merged: bool = True   # also write merged full weights in the diffusers format
    init_from: str = ""        # a peft adapter folder to start from (e.g. a previous run's <denoiser>_lora)

    prefix = "lora."
    checks = {"rank": at_least(1), "alpha": greater_than(0)}

    def problems(self) -> list[str]:
        problems = []
        if not self.target_modules:
            problems.append("lora.target_modules = [] must name at least one module (e.g. to_q, to_k, to_v, to_out.0)")
        if self.dropout != 0:
            problems.append(f"lora.dropout = {self.dropout} must be 0: GRPO's first update needs its new log-probs "
                            "from the same computation as the rollout's old ones (ratio exactly 1), and dropout "
                            "draws a new random mask in every training forward pass (the rollout runs without it); "
                            "set lora.dropout: 0")
        return problems


def apply_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    """Wrap `model` in a peft LoRA model (base frozen) or load the adapter in `init_from`."""
    from peft import LoraConfig, PeftModel, get_peft_model
    model.requires_grad_(False)
    if options.init_from:
        folder = Path(options.init_from)
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"lora.init_from = {str(folder)!r} is not a peft adapter folder: missing "
                                    f"{folder / 'adapter_config.json'} (expected adapter_config.json, adapter_model.safetensors)")
        return PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, target_modules=list(options.target_modules),
                        lora_dropout=options.dropout, init_lora_weights=True)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"lora.target_modules = {options.target_modules}: {err}") from err


def _flat(name: str) -> str:
    return name.replace(".", "__")  # module attribute names cannot hold dots


class LoraParameters(nn.Module):
    """The trainable LoRA weights of a peft model as their own module (shared, not copied)."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        object.__setattr__(self, "owner", peft_model)  # not a submodule: its base weights stay out
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                self.register_parameter(_flat(name), param)
        if not len(list(self.parameters())):
            raise ValueError("LoRA found no layer to adapt: check lora.target_modules against the model's module names")

    def rebind(self) -> None:
        """Register the peft model's current LoRA Parameter objects again, under the same names.

        FSDP2's `fully_shard` replaces every parameter of the modules it shards by a new
        (DTensor) Parameter; after sharding the denoiser, call this so that the optimizer, the
        EMA and checkpoints act on the sharded LoRA weights, not on the full ones left behind.
        Raises RuntimeError if the set of LoRA weights changed (names are compared).
        """
        current = {_flat(name): param for name, param in self.owner.named_parameters() if "lora_" in name}
        if current.keys() != self._parameters.keys():
            missing, extra = sorted(self._parameters.keys() - current.keys()), sorted(current.keys() - self._parameters.keys())
            raise RuntimeError(f"the LoRA weights of the denoiser changed since they were collected: missing "
                               f"{missing[:3]} ({len(missing)}), new {extra[:3]} ({len(extra)})")
        for name, param in current.items():
            self.register_parameter(name, param)

    def train(self, mode: bool = True) -> "LoraParameters":
        super().train(mode)
        self.owner.train(mode)  # LoRA dropout follows the trainer's train/eval switches
        return self


def merged_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA delta merged in, under the base model's own keys."""
    from peft.tuners.lora import LoraLayer
    base = peft_model.get_base_model()
    state = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    adapter = peft_model.active_adapter if isinstance(peft_model.active_adapter, str) else peft_model.active_adapter[0]
    for module_name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            weight = module.get_base_layer().weight
            state[f"{module_name}.weight"] = (weight.detach() + module.get_delta_weight(adapter).to(weight.dtype))
    return state


@torch.no_grad()
def save_merged(peft_model: nn.Module, directory: str | Path) -> None:
    """Write merged weights with the base class's save_pretrained (diffusers layout).

    The clean model is built on the meta device and takes the merged tensors by assignment,
    so saving costs only the merged layers' memory, not a second copy of the model.
    """
    base = peft_model.get_base_model()
    state = merged_state_dict(peft_model)
    with torch.device("meta"):
        clean = type(base).from_config(base.config)
    clean.load_state_dict(state, assign=True, strict=True)
    clean.save_pretrained(str(directory))
