"""Precomputed prompt conditioning: sharded safetensors plus a JSON index.

Text encoders are large (T5-XXL, a Llama-8B) and frozen, so training should never hold them
in memory: `dancegrpo preprocess` runs them once over the prompt file and writes

    <cache>/index.json              model name, tensor names/shapes/dtypes, meta, prompt -> (shard, row)
    <cache>/shard_00000.safetensors each tensor stacked over up to `shard_size` prompts
    <cache>/prompts.txt             the cached prompts, one a line (usable as data.train_prompts)

Adapters read rows back by prompt text; reads are memory-mapped slices of one row each,
so a large cache costs no RAM.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..messages import some_of

INDEX_FILE = "index.json"
PROMPTS_FILE = "prompts.txt"
FORMAT_VERSION = 1
#: The unconditional (empty) prompt every cache for a CFG model holds.
EMPTY_PROMPT = ""


class PromptCacheError(FileNotFoundError):
    """A prompt cache is missing, for another model, or lacks a prompt."""


class PromptCacheWriter:
    """Append encoded prompts batch by batch; `close()` writes the index (last, atomically)."""

    def __init__(self, directory: str | Path, model: str, meta: dict | None = None, shard_size: int = 256):
        if shard_size < 1:
            raise ValueError(f"shard_size = {shard_size} must be >= 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model, self.meta, self.shard_size = model, dict(meta or {}), shard_size
        self.entries: dict[str, list[int]] = {}
        self.shards: list[str] = []
        self.specs: dict[str, dict] = {}
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._pending_prompts: list[str] = []

    def add(self, prompts: list[str], tensors: dict[str, torch.Tensor]) -> None:
        """Add one batch: every tensor is batch-first with len(prompts) rows."""
        for name, value in tensors.items():
            if value.shape[0] != len(prompts):
                raise ValueError(f"tensor {name!r} has {value.shape[0]} rows for {len(prompts)} prompts")
            spec = {"shape": list(value.shape[1:]), "dtype": str(value.dtype).removeprefix("torch.")}
            if self.specs.setdefault(name, spec) != spec:
                raise ValueError(f"tensor {name!r} changed from {self.specs[name]} to {spec} between batches")
        for row, prompt in enumerate(prompts):
            if prompt in self.entries or prompt in self._pending_prompts:
                continue  # duplicates encode identically; keep the first
            self._pending_prompts.append(prompt)
            for name, value in tensors.items():
                self._pending.setdefault(name, []).append(value[row].detach().cpu())
            if len(self._pending_prompts) == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if not self._pending_prompts:
            return
        shard = len(self.shards)
        name = f"shard_{shard:05d}.safetensors"
        save_file({k: torch.stack(v).contiguous() for k, v in self._pending.items()}, str(self.directory / name))
        self.shards.append(name)
        for row, prompt in enumerate(self._pending_prompts):
            self.entries[prompt] = [shard, row]
        self._pending, self._pending_prompts = {}, []

    def close(self) -> Path:
        self._flush()
        index = {"format": FORMAT_VERSION, "model": self.model, "tensors": self.specs, "meta": self.meta,
                 "shards": self.shards, "entries": self.entries}
        tmp = self.directory / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=1, ensure_ascii=False))
        os.replace(tmp, self.directory / INDEX_FILE)
        prompts = [p for p in self.entries if p != EMPTY_PROMPT]
        (self.directory / PROMPTS_FILE).write_text("".join(p.replace("\n", " ") + "\n" for p in prompts))
        return self.directory


class PromptCache:
    """Read-only access to a cache written by PromptCacheWriter."""

    def __init__(self, directory: str | Path, models: tuple[str, ...] | str | None = None):
        self.directory = Path(directory).expanduser() if str(directory) else Path("")
        index_path = self.directory / INDEX_FILE
        if not str(directory) or not index_path.is_file():
            which = f"{str(self.directory)!r} has no {INDEX_FILE}" if str(directory) else "no prompt cache given"
            hint = (" (set model.options.prompt_cache to the folder written by `dancegrpo preprocess --model "
                    f"{models if isinstance(models, str) else (models or ('<name>',))[0]} --path <checkpoint> "
                    "--prompts <file> --out <folder>`)")
            raise PromptCacheError(f"prompt cache: {which}{hint}")
        from ..io_errors import check_safetensors, load_json
        index = load_json(index_path, "prompt cache index")
        if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION:
            index = index if isinstance(index, dict) else {}
            raise PromptCacheError(f"prompt cache {str(self.directory)!r}: format {index.get('format')!r}, "
                                   f"this version reads format {FORMAT_VERSION}; rerun `dancegrpo preprocess`")
        allowed = (models,) if isinstance(models, str) else models
        if allowed and index["model"] not in allowed:
            raise PromptCacheError(f"prompt cache {str(self.directory)!r} was written for model {index['model']!r}, "
                                   f"not {' or '.join(map(repr, allowed))}; rerun `dancegrpo preprocess` for this model")
        missing = [s for s in index["shards"] if not (self.directory / s).is_file()]
        if missing:
            raise PromptCacheError(f"prompt cache {str(self.directory)!r} is incomplete: missing {', '.join(missing)}")
        for shard in index["shards"]:  # headers only: a truncated or foreign shard is refused before any work
            names = check_safetensors(self.directory / shard, "prompt cache shard")
            absent = sorted(set(index["tensors"]) - set(names))
            if absent:
                raise PromptCacheError(f"prompt cache shard {str(self.directory / shard)!r} lacks the tensors {absent} "
                                       f"that {INDEX_FILE} lists; rerun `dancegrpo preprocess`")
        self.model: str = index["model"]
        self.meta: dict = index["meta"]
        self.tensors: dict[str, dict] = index["tensors"]
        self.entries: dict[str, list[int]] = index["entries"]
        self.shards: list[str] = index["shards"]

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def prompts(self) -> list[str]:
        return list(self.entries)

    def lookup(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Batch-first tensors for these prompts (CPU, stored dtype), in the given order."""
        absent = [p for p in prompts if p not in self.entries]
        if absent:
            shown = some_of(absent)
            raise PromptCacheError(
                f"prompt(s) {shown} not in the prompt cache {str(self.directory)!r} ({len(self.entries)} prompts); "
                "add them to the prompt file and rerun `dancegrpo preprocess`")
        rows: dict[str, list[torch.Tensor | None]] = {name: [None] * len(prompts) for name in self.tensors}
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for position, prompt in enumerate(prompts):
            shard, row = self.entries[prompt]
            by_shard.setdefault(shard, []).append((position, row))
        for shard, wanted in by_shard.items():
            with safe_open(str(self.directory / self.shards[shard]), framework="pt") as handle:
                for name in self.tensors:
                    view = handle.get_slice(name)
                    for position, row in wanted:
                        rows[name][position] = view[row: row + 1][0]
        return {name: torch.stack(values) for name, values in rows.items()}
