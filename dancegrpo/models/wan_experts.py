"""The experts of a Wan checkpoint as the trainer sees them: one transformer (Wan 2.1) or Wan 2.2's
high- and low-noise pair, of which the policy is the trained subset (`train_experts`).

Each trained expert is prepared as DiffusersGenerator prepares its one denoiser (gradient
checkpointing, LoRA with fp32 LoRA weights on a `frozen_dtype` base, the attention backend); an
expert left out is frozen in `frozen_dtype`. With two trained experts the policy is one module
holding both (`ExpertSet`: `transformer.*`, `transformer_2.*` in checkpoints), the KL reference
switches both, and save_pretrained writes both; an untrained expert is linked like vae/.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..attention.backends import install_attention_backend
from .base import FrozenReference
from .diffusers_generator import DTYPES, LoraReference
from .lora import LoraParameters, apply_lora, save_merged

#: expert name (`train_experts`) -> checkpoint subfolder and adapter attribute
EXPERTS = {"high": "transformer", "low": "transformer_2"}


class ExpertSet(nn.Module):
    """The trained experts of a two-expert model as one module (the trainer's policy): the same
    modules (or LoRA weight sets), registered under their checkpoint names."""

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)

    def rebind(self) -> None:
        """LoRA after FSDP sharding: each expert's LoraParameters picks up its sharded weights."""
        for module in self.children():
            if callable(getattr(module, "rebind", None)):
                module.rebind()


class _References:
    """Several frozen references (one per trained expert) switched on together."""

    def __init__(self, references: list):
        self.references = references

    @contextlib.contextmanager
    def active(self):
        with contextlib.ExitStack() as stack:
            for reference in self.references:
                stack.enter_context(reference.active())
            yield


def frozen_references(adapter):
    """The initial policy of every trained expert: LoRA adapters disabled, or frozen copies."""
    refs = [LoraReference(getattr(adapter, EXPERTS[n])) if adapter.lora is not None
            else FrozenReference(adapter, EXPERTS[n]) for n in adapter.trained]
    return refs[0] if len(refs) == 1 else _References(refs)


def expert_lora(adapter, attr: str):
    """This expert's LoRA options: `lora.init_from` is its peft folder or, with two trained experts,
    a folder holding `transformer_lora/` and `transformer_2_lora/` (a run's final_model/)."""
    lora = adapter.lora
    folder = Path(lora.init_from) if lora.init_from else None
    if folder is None or (len(adapter.trained) == 1 and not (folder / f"{attr}_lora").is_dir()):
        return lora
    if not (folder / f"{attr}_lora").is_dir():
        raise FileNotFoundError(f"lora.init_from = {str(folder)!r}: with two trained experts it must be a folder "
                                f"holding transformer_lora/ and transformer_2_lora/ (a run's final_model/); "
                                f"{attr}_lora/ is missing")
    return dataclasses.replace(lora, init_from=str(folder / f"{attr}_lora"))


def prepare_expert(adapter, module: nn.Module, attr: str, trained: bool):
    """(module, its LoraParameters or None): checkpointing, LoRA, frozen dtype and attention backend."""
    options = adapter.options
    frozen, lora_params = DTYPES[options.frozen_dtype], None
    if not trained:
        module = module.to(frozen).requires_grad_(False).eval()
    else:
        if options.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        if adapter.lora is not None:
            if frozen != torch.float32:
                module = module.to(frozen)
            module = apply_lora(module, expert_lora(adapter, attr))
            for name, p in module.named_parameters():
                if "lora_" in name:  # LoRA weights train in fp32 whatever the frozen base is
                    p.data = p.data.float()
            lora_params = LoraParameters(module)
    adapter.attention_backend = install_attention_backend(module, options.attention_backend, adapter.model_name,
                                                          masked=False)
    return module, lora_params


def save_experts(adapter, directory) -> None:
    """DiffusersGenerator.save_pretrained for every trained expert: `<expert>/` (full fine-tune) or
    `<expert>_lora/` plus, with `lora.save_merged`, the merged `<expert>/`; model_index.json; the
    other components, an untrained expert included, linked / copied / left out (`save_frozen`);
    dancegrpo_model.json (the adapter name and options)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in adapter.trained:
        attr = EXPERTS[name]
        module, target = getattr(adapter, attr), directory / attr
        if target.is_symlink():
            target.unlink()
        if adapter.lora is None:
            module.save_pretrained(str(target))
        else:
            module.save_pretrained(str(directory / f"{attr}_lora"))
            if adapter.lora.save_merged:
                save_merged(module, target)
        written += [attr, f"{attr}_lora"]
    shutil.copyfile(adapter.source / "model_index.json", directory / "model_index.json")
    if adapter.options.save_frozen != "none":
        for entry in sorted(adapter.source.iterdir()):
            if entry.is_dir() and entry.name not in written and not entry.name.startswith("."):
                adapter._place(entry, directory / entry.name)
    info = {"model": adapter.model_name, "base_checkpoint": str(adapter.source),
            "options": dataclasses.asdict(adapter.options)}
    (directory / "dancegrpo_model.json").write_text(json.dumps(info, indent=2))
