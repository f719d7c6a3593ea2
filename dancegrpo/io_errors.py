"""Reading the files a user hands in, with errors that name the file, the place and the fix.

Every reader of a user's file goes through here: prompt files (text and JSONL), YAML
configs, JSON configs of checkpoints, images referenced by JSONL prompts, tensor files
(reward checkpoints, prompt-cache shards). A failure raises `InputFileError` (a ValueError)
whose message starts with ``path:line:column:`` where a position is known, says what is wrong
and what to do; a missing file raises FileNotFoundError naming it.

    >>> read_text("prompts.txt", "prompt file")   # a Latin-1 file
    InputFileError: prompts.txt:2:4: prompt file is not UTF-8: byte 0xe9 (in 'caf\\xe9 au lait')
    cannot be decoded. Re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 prompts.txt > prompts.utf8.txt` ...
"""
from __future__ import annotations

import json
import pickle
import shlex
from pathlib import Path
from typing import Any

__all__ = ["InputFileError", "read_text", "parse_json", "load_json", "load_yaml", "load_image",
           "load_tensor_file", "check_safetensors"]

# How much of an offending line an error message quotes.
_QUOTE_CHARS = 80


class InputFileError(ValueError):
    """A file handed in by the user cannot be used; the message names it and what to do."""


def _name(path: str | Path) -> str:
    return str(path)


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "...")


def _read_bytes(path: Path, what: str, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {_name(path)!r} not found{hint}") from None
    except IsADirectoryError:
        raise InputFileError(f"{what} {_name(path)!r} is a directory, not a file{hint}") from None
    except OSError as err:
        raise InputFileError(f"{what} {_name(path)!r} cannot be read: {err.strerror or err}") from None


def read_text(path: str | Path, what: str, hint: str = "") -> str:
    """The UTF-8 text of a user's file.

    Args:
        path: the file.
        what: what the file is, for messages ("prompt file", "config file").
        hint: appended to a not-found message (e.g. " (one prompt a line, or toy:train)").

    Raises:
        FileNotFoundError: no such file.
        InputFileError: a directory, unreadable, or not UTF-8; the last names the line, the
            column (characters, 1-based), the byte offset and value, and how to convert the file.
    """
    path = Path(path)
    data = _read_bytes(path, what, hint)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        start = data.rfind(b"\n", 0, err.start) + 1
        end = data.find(b"\n", err.start)
        line_bytes = data[start: end if end >= 0 else len(data)]
        line = data.count(b"\n", 0, err.start) + 1
        column = len(data[start: err.start].decode("utf-8", errors="replace")) + 1
        bad = data[err.start: err.end].hex(" ")
        shown = line_bytes.decode("utf-8", errors="backslashreplace").rstrip("\r")
        quoted = shlex.quote(str(path))
        raise InputFileError(
            f"{path}:{line}:{column}: {what} is not UTF-8: byte 0x{bad} at byte offset {err.start} "
            f"(in {_quote(shown)}) cannot be decoded. Re-save it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {quoted} > {shlex.quote(str(path.with_suffix('.utf8' + path.suffix)))}` "
            "(latin1 for Western-European text; `file` may tell the encoding it has)") from None


def parse_json(text: str, path: str | Path, what: str, line: int | None = None) -> Any:
    """`json.loads(text)`; a syntax error becomes InputFileError at ``path:line:column``.

    `line` is the file line `text` starts on (JSONL: the record's line), None for a whole file.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at_line = err.lineno if line is None else line + err.lineno - 1
        source = text.splitlines()[err.lineno - 1] if text.splitlines() else text
        raise InputFileError(f"{path}:{at_line}:{err.colno}: {what} is not valid JSON: {err.msg} "
                             f"(in {_quote(source)})") from None


def load_json(path: str | Path, what: str, hint: str = "") -> Any:
    """A JSON file: `read_text` then `parse_json` (errors name the file, line and column)."""
    return parse_json(read_text(path, what, hint), path, what)


def load_yaml(path: str | Path, what: str, hint: str = "") -> Any:
    """A YAML file (safe loader); a syntax error becomes InputFileError at ``path:line:column``."""
    import yaml
    text = read_text(path, what, hint)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
        raise InputFileError(f"{where}: {what} is not valid YAML: {problem or err}") from None


def load_image(path: str | Path, what: str = "image", referenced_from: str = ""):
    """A PIL image, fully decoded and converted to RGB.

    `referenced_from` says where the path came from (e.g. "data/i2v.jsonl:3"), for the message.

    Raises:
        FileNotFoundError: no such file.
        InputFileError: not an image PIL can read, or truncated/corrupt.
    """
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    origin = f" (named at {referenced_from})" if referenced_from else ""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {_name(path)!r}{origin} not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here
    except UnidentifiedImageError:
        raise InputFileError(f"{what} {_name(path)!r}{origin} is not an image PIL can read "
                             f"({path.stat().st_size} bytes): save it as PNG or JPEG") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InputFileError(f"{what} {_name(path)!r}{origin} is corrupt or truncated ({err}): "
                             "export it again or replace it") from None


def check_safetensors(path: str | Path, what: str) -> list[str]:
    """The tensor names of a safetensors file, after checking its header and length.

    Raises FileNotFoundError (missing) or InputFileError (not safetensors, truncated).
    """
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {_name(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise InputFileError(f"{what} {_name(path)!r} ({path.stat().st_size} bytes) is not a complete safetensors "
                             f"file ({err}): it may be truncated; copy or download it again") from None


def load_tensor_file(path: str | Path, what: str) -> Any:
    """The contents of a `.safetensors` file (dict of tensors) or of a tensor-only torch file
    (`.pt`, `.pth`, `.bin`: whatever it holds, loaded with ``weights_only=True``), on the CPU.

    Raises:
        FileNotFoundError: no such file.
        InputFileError: truncated or corrupt, not this format, or a pickle with objects other
            than tensors; the message names the file, its size and what to do.
    """
    import torch
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {_name(path)!r} not found")
    if path.suffix == ".safetensors":
        check_safetensors(path, what)
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... per failure
        size = path.stat().st_size
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower().replace("_", " "):
            why = ("it pickles objects other than tensors, which are not loaded on purpose; re-save its "
                   "state dict with torch.save({'state_dict': model.state_dict()}, path)")
        else:
            first = (str(err).splitlines() or [""])[0].split(". ")[0]  # torch's messages run on for lines
            why = f"it is truncated, corrupt or not a torch file ({type(err).__name__}: {first}); download it again"
        raise InputFileError(f"{what} {_name(path)!r} ({size} bytes) cannot be loaded: {why}") from None
