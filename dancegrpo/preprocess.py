"""`dancegrpo preprocess`: encode a prompt file once with the model's own text encoders.

    dancegrpo preprocess --model flux --path data/flux --prompts prompts.txt --out data/flux_cache

Prompt files: plain text, one prompt a line; or JSONL, one object a line with "prompt" and,
for image-to-video, "image" (a path, relative to the JSONL file or absolute). The cache
(see models/prompt_cache.py) is what `model.options.prompt_cache` points at; its
`prompts.txt` can serve as `data.train_prompts`.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from tqdm import tqdm

from .io_errors import load_image, parse_json, read_text
from .models.checkpoint_layout import check_layout
from .models.prompt_cache import EMPTY_PROMPT, PromptCacheWriter
from .models.spec import get_model_spec, model_names


def read_prompt_file(path: str | Path) -> list[dict]:
    """Entries {"prompt": str, ...extras} from a UTF-8 .txt (one a line) or .jsonl file.

    A JSONL "image" is resolved against the file's folder and decoded here, before any
    encoding work, so a missing or corrupt image is reported with the line that names it.

    Raises:
        FileNotFoundError: the prompt file or an image is missing.
        ValueError: not UTF-8, bad JSON, a line without "prompt", an unreadable image (each
            naming path:line), no prompts, or one prompt twice with different extras.
    """
    path = Path(path)
    text = read_text(path, "prompt file", " (one prompt a line, or JSONL with \"prompt\")")
    entries = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            record = parse_json(line, path, "JSONL prompt line", line=number)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: each JSONL line needs a \"prompt\" string, got {line[:80]!r}")
            if "image" in record:
                if not isinstance(record["image"], str):
                    raise ValueError(f"{path}:{number}: \"image\" must be a path string, got {record['image']!r}")
                image = Path(record["image"])
                record["image"] = str(image if image.is_absolute() else path.parent / image)
                load_image(record["image"], "image", referenced_from=f"{path}:{number}")
            entries.append(record)
    else:
        entries = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    if not entries:
        raise ValueError(f"prompt file {str(path)!r} has no prompts")
    seen: dict[str, dict] = {}
    for entry in entries:
        earlier = seen.setdefault(entry["prompt"], entry)
        if earlier is not entry and earlier != entry:
            raise ValueError(f"{path}: prompt {entry['prompt']!r} appears twice with different extras "
                             f"({earlier} vs {entry}); the cache is keyed by prompt text")
    return list(seen.values())


def encoder_class(model: str) -> type:
    """The prompt encoder class of a registered model (its `ModelSpec.prompt_encoder`).

    Raises ValueError naming the models that have one when `model` is unknown or has none.
    """
    names = model_names("prompt_encoder")
    if model not in names:
        raise ValueError(f"preprocess: unknown model {model!r}: choose one of {sorted(names)}")
    return get_model_spec(model).prompt_encoder


def preprocess(model: str, path: str | Path, prompts: str | Path, out: str | Path, batch_size: int = 8,
               shard_size: int = 256, dtype: str | None = None, device: str = "cpu",
               options: dict | None = None, progress: bool = True) -> Path:
    """Encode every prompt of `prompts` with `model`'s text encoders into a cache at `out`."""
    cls = encoder_class(model)
    options = dict(options or {})
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "root", "device", "dtype"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"preprocess --model {model}: unknown option(s) {unknown}; allowed are {sorted(accepted)}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size = {batch_size} and shard_size = {shard_size} must be >= 1")
    dtype = dtype or cls.default_dtype
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype = {dtype!r} must be one of {', '.join(dtypes)}")
    entries = read_prompt_file(prompts)  # first: a bad prompt file or image is reported before anything loads
    root = check_layout(path, model, cls.components())
    if get_model_spec(model).cfg and all(e["prompt"] != EMPTY_PROMPT for e in entries):
        entries = [{"prompt": EMPTY_PROMPT}] + entries  # the unconditional branch of CFG
    encoder = cls(root, torch.device(device), dtypes[dtype], **options)
    writer = PromptCacheWriter(out, model, meta={"checkpoint": str(root), **encoder.meta()}, shard_size=shard_size)
    bar = tqdm(total=len(entries), desc=f"encoding prompts ({model})", unit="prompt", disable=not progress)
    for start in range(0, len(entries), batch_size):
        batch = entries[start: start + batch_size]
        tensors = encoder.encode([e["prompt"] for e in batch], batch)
        writer.add([e["prompt"] for e in batch], tensors)
        bar.update(len(batch))
    bar.close()
    return writer.close()
