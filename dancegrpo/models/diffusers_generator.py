"""What the four real generators share: options, loading checks, LoRA, prompt cache, saving.

Each concrete adapter (sd14, flux, hunyuan_video, skyreels_i2v) supplies its denoiser class,
the components it needs, its latent shape, `predict` and `decode`; this base class does the
rest the same way for all of them:

- options from `model.options`, checked (unknown keys and bad values named) before any load;
- the checkpoint layout and resolution checked before any weights are read;
- fp32 master weights for the trained denoiser (the trainer's `run.autocast_dtype` runs the
  forward passes in bf16); frozen parts (VAE, and the base weights under LoRA) in
  `frozen_dtype`;
- full fine-tuning or LoRA (peft); `frozen_reference()` gives the trainer the initial policy
  for the optional KL term (LoRA: adapters disabled, free; full: a frozen copy);
- `encode_prompts` reads the prompt cache, never a text encoder;
- `save_pretrained` writes a diffusers checkpoint folder (see there).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..attention.backends import BACKENDS as ATTENTION_BACKENDS
from ..attention.backends import install_attention_backend
from .base import Conditioning, FrozenReference
from .checkpoint_layout import Component, check_layout, read_json
from .lora import LoraOptions, LoraParameters, apply_lora, save_merged
from .options import CheckedOptions, at_least, one_of
from .prompt_cache import EMPTY_PROMPT, PromptCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GeneratorOptions(CheckedOptions):
    """Options every real generator takes (`model.options` in the config)."""

    prompt_cache: str = ""             # folder written by `dancegrpo preprocess` (required)
    height: int = 512
    width: int = 512
    lora: dict | None = None           # null = full fine-tune; else LoraOptions fields (rank, alpha, ...)
    gradient_checkpointing: bool = False
    frozen_dtype: str = "float32"      # VAE (and LoRA's frozen base weights): float32 | bfloat16 | float16
    decode_batch_size: int = 4         # samples per VAE decode call (memory)
    save_frozen: str = "link"          # how save_pretrained provides vae/, text encoders...: link | copy | none
    attention_backend: str = "auto"    # auto | flash | efficient | cudnn | math | flash_attn | flash_attn3 | xformers

    checks = {"frozen_dtype": one_of(DTYPES), "decode_batch_size": at_least(1),
              "save_frozen": one_of(("link", "copy", "none"), "link, copy or none"),
              "attention_backend": one_of(ATTENTION_BACKENDS)}

    def problems(self) -> list[str]:
        problems = []
        if self.height < 1 or self.width < 1:
            problems.append(f"height x width = {self.height} x {self.width} must be positive")
        if self.lora is not None:
            problems += self.lora_options().validate()
        return problems

    def lora_options(self) -> LoraOptions:
        if not isinstance(self.lora, dict):
            raise ValueError(f"lora = {self.lora!r} must be a mapping (rank, alpha, target_modules, ...) or null")
        known = {f.name for f in dataclasses.fields(LoraOptions)}
        unknown = sorted(set(self.lora) - known)
        if unknown:
            raise ValueError(f"unknown lora option(s) {unknown}: allowed are {sorted(known)}")
        return LoraOptions(**self.lora)


def parse_options(cls: type, model: str, options: dict) -> Any:
    """Build an options dataclass from a dict; every unknown key or bad value is reported at once."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"model {model!r}: unknown option(s) {unknown} in model.options; allowed are {sorted(known)}")
    parsed = cls(**options)
    problems = parsed.validate()
    if problems:
        raise ValueError(f"model {model!r}: invalid model.options: " + "; ".join(problems))
    return parsed


def vae_spatial_factor(vae_config: dict) -> int:
    """Pixels per latent cell along one side, from a VAE config (before loading weights)."""
    if "spatial_compression_ratio" in vae_config:
        return int(vae_config["spatial_compression_ratio"])
    return 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)


def check_resolution(model: str, height: int, width: int, multiple: int, why: str) -> None:
    bad = [f"{name} = {value}" for name, value in (("height", height), ("width", width)) if value % multiple]
    if bad:
        raise ValueError(f"model {model!r}: {' and '.join(bad)} not divisible by {multiple} ({why}); "
                         f"use e.g. {max(multiple, height // multiple * multiple)} x {max(multiple, width // multiple * multiple)}")


def check_frames(model: str, frames: int, temporal: int) -> None:
    """A video VAE that keeps the first frame and compresses the rest `temporal`x needs
    frames = temporal * k + 1; refuse any other count, naming the two nearest valid ones."""
    if (frames - 1) % temporal:
        k = (frames - 1) // temporal
        raise ValueError(f"model {model!r}: frames = {frames} is not {temporal}k+1 (the VAE compresses time "
                         f"{temporal}x after the first frame); use {temporal * k + 1} or "
                         f"{temporal * (k + 1) + 1} (1 = text-to-image)")


class LoraReference:
    """The trainer's reference interface (`active()`), for a LoRA denoiser: adapters off."""

    def __init__(self, peft_model: nn.Module):
        self.peft_model = peft_model

    def active(self):
        return self.peft_model.disable_adapter()


class DiffusersGenerator(nn.Module):
    """Base adapter over a diffusers checkpoint folder. Subclasses set the class attributes."""

    prediction: ClassVar[str] = "flow"
    model_name: ClassVar[str] = ""
    denoiser_attr: ClassVar[str] = "transformer"     # subfolder and attribute name
    options_class: ClassVar[type] = GeneratorOptions
    cache_models: ClassVar[tuple[str, ...]] = ()     # prompt caches this adapter can read
    needs_empty_prompt: ClassVar[bool] = False       # CFG: the cache must hold the empty prompt
    attention_masked: ClassVar[bool] = False         # the denoiser masks attention (padded text tokens)

    def __init__(self, source: Path, denoiser: nn.Module, vae: nn.Module, cache: PromptCache, options):
        super().__init__()
        self.source, self.options, self.cache = source, options, cache
        self.lora = options.lora_options() if options.lora is not None else None
        frozen = DTYPES[options.frozen_dtype]
        self.vae = vae.requires_grad_(False).eval()
        if options.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if self.lora is not None:
            if frozen != torch.float32:
                denoiser = denoiser.to(frozen)
            denoiser = apply_lora(denoiser, self.lora)
            # LoRA weights train in fp32 whatever the frozen base is (fp32 master weights).
            for name, p in denoiser.named_parameters():
                if "lora_" in name:
                    p.data = p.data.float()
            self._lora_params = LoraParameters(denoiser)
        setattr(self, self.denoiser_attr, denoiser)
        # every attention of the denoiser through the chosen kernel (dancegrpo/attention/backends.py)
        self.attention_backend = install_attention_backend(denoiser, options.attention_backend, self.model_name,
                                                           masked=self.attention_masked)
        if self.needs_empty_prompt and EMPTY_PROMPT not in cache:
            raise ValueError(f"prompt cache {str(cache.directory)!r} lacks the empty prompt this model needs for "
                             "classifier-free guidance; rerun `dancegrpo preprocess` (it adds it)")

    # ------------------------------------------------------------------ loading
    @classmethod
    def components(cls) -> list[Component]:
        return [Component(cls.denoiser_attr, "model"), Component("vae", "model")]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, options: dict | None = None) -> "DiffusersGenerator":
        """Load from a local diffusers checkpoint; options as in `model.options`."""
        opts = parse_options(cls.options_class, cls.model_name, dict(options or {}))
        root = check_layout(path, cls.model_name, cls.components())
        denoiser_config = read_json(root / cls.denoiser_attr / "config.json")
        vae_config = read_json(root / "vae" / "config.json")
        cls.check_before_loading(root, opts, denoiser_config, vae_config)
        cache = PromptCache(opts.prompt_cache, cls.cache_models or (cls.model_name,))
        cls.check_cache(cache, opts)
        denoiser = cls.load_denoiser(root)
        vae = cls.load_vae(root, DTYPES[opts.frozen_dtype])
        return cls(root, denoiser, vae, cache, opts)

    @classmethod
    def check_before_loading(cls, root: Path, options, denoiser_config: dict, vae_config: dict) -> None:
        """Refuse settings the checkpoint cannot take (resolution, frames...) before reading weights."""

    @classmethod
    def check_cache(cls, cache: PromptCache, options) -> None:
        """Refuse a prompt cache whose contents do not fit these options."""

    @classmethod
    def load_denoiser(cls, root: Path) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def load_vae(cls, root: Path, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    # ------------------------------------------------------------------ protocol
    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.denoiser_attr)

    @property
    def trainable(self) -> nn.Module:
        """What the trainer trains and checkpoints: the denoiser, or its LoRA weights alone."""
        return self._lora_params if self.lora is not None else self.denoiser

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def frozen_reference(self):
        """The initial policy for the KL term: an object whose `active()` context swaps it in."""
        if self.lora is not None:
            return LoraReference(self.denoiser)
        return FrozenReference(self, self.denoiser_attr)

    def lookup_prompts(self, prompts: list[str]) -> Conditioning:
        """Cached tensors of these prompts on the model's device."""
        return {k: v.to(self.device) for k, v in self.cache.lookup(list(prompts)).items()}

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        cond = self.lookup_prompts(prompts)
        if self.needs_empty_prompt:
            empty = self.lookup_prompts([EMPTY_PROMPT])
            cond.update({f"negative_{k}": v.expand(len(prompts), *v.shape[1:]).clone()
                         for k, v in empty.items() if k in self.negative_keys()})
        return cond

    def negative_keys(self) -> tuple[str, ...]:
        """Cache tensors that have an unconditional counterpart (text conditioning)."""
        return ()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        size = self.options.decode_batch_size
        with torch.no_grad():
            return torch.cat([self.decode_batch(chunk) for chunk in latents.split(size)])

    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write a diffusers checkpoint folder.

        - full fine-tune: `<denoiser>/` in the diffusers format;
        - LoRA: `<denoiser>_lora/` in peft's format and, with `lora.save_merged`, merged
          `<denoiser>/` weights;
        - `model_index.json` from the base checkpoint, and its other components (vae/, text
          encoders, tokenizers, scheduler/) linked (default), copied, or left out
          (`save_frozen`), so the folder loads as a whole pipeline and as `model.path`;
        - `dancegrpo_model.json`: the adapter name and options it was trained with.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        attr = self.denoiser_attr
        target = directory / attr
        if target.is_symlink():
            target.unlink()
        if self.lora is None:
            self.denoiser.save_pretrained(str(target))
        else:
            self.denoiser.save_pretrained(str(directory / f"{attr}_lora"))
            if self.lora.save_merged:
                save_merged(self.denoiser, target)
        shutil.copyfile(self.source / "model_index.json", directory / "model_index.json")
        if self.options.save_frozen != "none":
            for entry in sorted(self.source.iterdir()):
                if not entry.is_dir() or entry.name in (attr, f"{attr}_lora") or entry.name.startswith("."):
                    continue
                self._place(entry, directory / entry.name)
        info = {"model": self.model_name, "base_checkpoint": str(self.source),
                "options": dataclasses.asdict(self.options)}
        (directory / "dancegrpo_model.json").write_text(json.dumps(info, indent=2))

    def _place(self, source: Path, destination: Path) -> None:
        if destination.exists() or destination.is_symlink():
            if destination.resolve() == source.resolve():
                return
            if destination.is_symlink() or destination.is_file():
                destination.unlink()
            else:
                shutil.rmtree(destination)
        if self.options.save_frozen == "link":
            destination.symlink_to(source.resolve(), target_is_directory=True)
        else:
            shutil.copytree(source, destination)
