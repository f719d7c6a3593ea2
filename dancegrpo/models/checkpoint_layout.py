"""Checks that a checkpoint directory has the diffusers layout a model needs, before any work.

A diffusers checkpoint is a folder with `model_index.json` and one subfolder per component
(`transformer/` or `unet/`, `vae/`, `text_encoder*/`, `tokenizer*/`, `scheduler/`). Loading
a half-downloaded folder fails deep inside from_pretrained with a message about a single
file; here the whole expected layout is stated up front, with what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# What makes a subfolder loadable, by kind of component.
_MODEL_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                  "diffusion_pytorch_model.bin", "model.safetensors", "model.safetensors.index.json",
                  "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")


class CheckpointLayoutError(FileNotFoundError):
    """A checkpoint directory is missing, incomplete or not the expected model."""


@dataclass(frozen=True)
class Component:
    """One subfolder of a diffusers checkpoint and what it must contain."""

    name: str
    kind: str  # "model" (config.json + weights), "tokenizer", or "scheduler"

    def describe(self) -> str:
        if self.kind == "model":
            return f"{self.name}/{{config.json, diffusion_pytorch_model.safetensors or model.safetensors (or shards + index)}}"
        if self.kind == "tokenizer":
            return f"{self.name}/{{tokenizer_config.json, tokenizer.json or vocab.json+merges.txt or spiece.model}}"
        return f"{self.name}/scheduler_config.json"

    def missing(self, root: Path) -> str | None:
        """The first missing file of this component (relative to root), or None."""
        folder = root / self.name
        if not folder.is_dir():
            return f"{self.name}/"
        if self.kind == "model":
            if not (folder / "config.json").is_file():
                return f"{self.name}/config.json"
            if not any((folder / w).is_file() for w in _MODEL_WEIGHTS):
                return f"{self.name}/diffusion_pytorch_model.safetensors (or model.safetensors, or shards + index)"
        elif self.kind == "tokenizer":
            if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
                return f"{self.name}/tokenizer.json (or vocab.json + merges.txt, or spiece.model)"
        elif not (folder / "scheduler_config.json").is_file():
            return f"{self.name}/scheduler_config.json"
        return None


def expected_layout(components: list[Component]) -> str:
    return "model_index.json, " + ", ".join(c.describe() for c in components)


def check_layout(path: str | Path, model: str, components: list[Component]) -> Path:
    """Refuse a checkpoint folder that lacks any of `components`; returns the resolved path.

    The error names the missing file and the whole expected layout, so one look tells what
    to download (e.g. `huggingface-cli download <repo> --local-dir <path>`).
    """
    if not str(path):
        raise CheckpointLayoutError(
            f"model {model!r} needs model.path: a local diffusers checkpoint directory with "
            f"{expected_layout(components)}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointLayoutError(
            f"{model}: checkpoint directory {str(root)!r} does not exist; expected a diffusers checkpoint "
            f"with {expected_layout(components)}")
    problems = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    problems += [m for m in (c.missing(root) for c in components) if m]
    if problems:
        raise CheckpointLayoutError(
            f"{model}: checkpoint {str(root)!r} is incomplete: missing {', '.join(problems)}. "
            f"Expected layout: {expected_layout(components)}")
    read_json(root / "model_index.json", model)
    return root


def read_json(path: Path, model: str = "") -> dict:
    """A checkpoint's JSON file; CheckpointLayoutError naming the file (and line, column) if it
    is missing, not UTF-8 or not JSON."""
    from ..io_errors import load_json
    try:
        return load_json(path, "checkpoint file")
    except (OSError, ValueError) as err:
        raise CheckpointLayoutError(f"{model + ': ' if model else ''}{err}") from None
