"""Reading a configuration: YAML or a mapping into the schema's dataclasses, overrides, saving.

`load_config` converts every value to its field's type, reports unknown keys (with the
closest valid one), applies `section.field=value` overrides against the schema, then runs
every section's checks: all problems found come back together in one `ConfigError`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
from pathlib import Path
from typing import Any, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from ..messages import short_repr
from .schema import Config, ConfigError

_FAILED = object()  # marks a value that could not be converted (its problem is recorded)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _optional_inner(tp: Any) -> Any | None:
    """`X` for `X | None`, else None."""
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) == 1 and len(get_args(tp)) == 2:
            return inner[0]
    return None


def _describe(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_describe(inner)} or null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if get_origin(tp) is list:
        return f"a list of {_describe(get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if get_origin(tp) is dict:
        return "a mapping"
    if tp is Any:
        return "any value"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)",
            str: "a string"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str, errors: list[str], failed: set[str]) -> Any:
    """Return `value` as type `tp`, or `_FAILED` after recording the problem."""
    def fail(why: str = "") -> Any:
        errors.append(f"{path} = {short_repr(value)} has the wrong type: expected {_describe(tp)}"
                      f"{why}, got {type(value).__name__}")
        failed.add(path)
        return _FAILED

    inner = _optional_inner(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if inner is not None:
        return None if value is None else _convert(inner, value, path, errors, failed)
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty YAML section (`grpo:`) means all defaults
            value = {}
        return _build(tp, value, path, errors, failed) if isinstance(value, dict) else fail()
    if get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            return fail()
        items = [_convert(get_args(tp)[0], v, _join(path, i), errors, failed)
                 for i, v in enumerate(value)]
        if any(x is _FAILED for x in items):
            failed.add(path)  # the whole list falls back to its default
            return _FAILED
        return items
    if get_origin(tp) is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        return copy.deepcopy(value) if ok else fail(" with string keys")
    if tp is bool:
        return value if isinstance(value, bool) else fail()
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail()
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-5` (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                return fail()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            return fail()
        return number if math.isfinite(number) else fail(" (finite)")
    if tp is str:
        return value if isinstance(value, str) else fail()
    raise TypeError(f"config loader does not support the field type {tp!r} (at {path})")


def _unknown_key(path: str, key: Any, valid: Sequence[str]) -> str:
    guess = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {guess[0]!r}?)" if guess else ""
    section = f"of {path}" if path else "at the top level"
    name = str(key) if len(str(key)) <= 80 else short_repr(str(key))
    return (f"{_join(path, name)} is not a known key{hint}; "
            f"valid keys {section}: {', '.join(valid)}")


def _build(cls: type, data: dict, path: str, errors: list[str], failed: set[str]) -> Any:
    """Build dataclass `cls` from a mapping; a field that fails keeps its default."""
    hints, fields = _hints(cls), dataclasses.fields(cls)
    valid = [f.name for f in fields]
    errors.extend(_unknown_key(path, k, valid) for k in data if k not in hints)
    kwargs = {}
    for f in fields:
        fpath = _join(path, f.name)
        if f.name in data:
            value = _convert(hints[f.name], data[f.name], fpath, errors, failed)
            if value is not _FAILED:
                kwargs[f.name] = value
                continue
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{fpath} is required: expected {_describe(hints[f.name])}")
            failed.add(fpath)
        if f.default is not dataclasses.MISSING:
            kwargs[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs[f.name] = f.default_factory()
        else:
            kwargs[f.name] = None  # required and missing/bad: already reported
    return cls(**kwargs)


def _validate_tree(obj: Any, path: str) -> list[str]:
    """Run `validate()` on every nested dataclass (children first), prefixing paths."""
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        children = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, child in children:
            if dataclasses.is_dataclass(child):
                fpath = _join(path, f.name)
                problems += _validate_tree(child, fpath if i is None else _join(fpath, i))
    own = obj.validate() if hasattr(obj, "validate") else []
    return problems + [_join(path, p) for p in own]


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping and validate it.

    `path` prefixes every reported field path (e.g. "grpo" when building one section).
    Raises ConfigError listing every problem found.
    """
    errors: list[str] = []
    failed: set[str] = set()
    if not isinstance(data, dict):
        raise ConfigError([f"{path or 'configuration'} = {short_repr(data)} has the wrong type: expected "
                           f"a mapping, got {type(data).__name__}"])
    obj = _build(cls, data, path, errors, failed)

    def about_failed(problem: str) -> bool:  # a check on a default stand-in says nothing useful
        return any(re.search(rf"(?<![\w.]){re.escape(f)}(?!\w)", problem) for f in failed)

    errors += [p for p in _validate_tree(obj, path) if not about_failed(p)]
    if errors:
        raise ConfigError(errors)
    return obj


# ---------------------------------------------------------------------------------------
# Overrides ("trainer.lr=3e-5") and the public API

def _apply_override(data: dict, item: str) -> str | None:
    """Set one `dotted.path=value` in the raw mapping, checked against the schema.

    Returns a problem description, or None on success.
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        return (f"override {short_repr(item)} is malformed: write it as section.field=value, "
                "e.g. trainer.lr=3e-5")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        return f"override {short_repr(item)}: the value is not valid YAML ({exc})"
    parts = key.split(".")
    tp, node = Config, data
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        tp = _optional_inner(tp) or tp
        index: str | int = part
        if dataclasses.is_dataclass(tp) and isinstance(node, dict):
            if part not in _hints(tp):
                valid = [f.name for f in dataclasses.fields(tp)]
                return f"override {short_repr(item)}: {_unknown_key(where, part, valid)}"
            child_tp = _hints(tp)[part]
        elif isinstance(node, list) and (get_origin(tp) is list or tp is Any):
            if not part.isdigit() or int(part) >= len(node):
                count = f"{len(node)} entr{'y' if len(node) == 1 else 'ies'}"
                return (f"override {short_repr(item)}: {_join(where, part)} is not a valid index: "
                        f"{where} has {count}")
            index, child_tp = int(part), (Any if tp is Any else get_args(tp)[0])
        elif isinstance(node, dict) and (get_origin(tp) is dict or tp is Any):
            child_tp = Any
        else:
            return (f"override {short_repr(item)}: {where} is {_describe(tp)}, "
                    f"not a section with a field {part!r}")
        if depth == len(parts) - 1:
            node[index] = value
            return None
        if isinstance(node, dict) and node.get(index) is None and (
                dataclasses.is_dataclass(_optional_inner(child_tp) or child_tp)
                or get_origin(child_tp) is dict or child_tp is Any):
            node[index] = {}  # create a section (or an options sub-mapping) the recipe left out
        node, tp = (node.get(index) if isinstance(node, dict) else node[index]), child_tp
    return None


def load_config(source: str | os.PathLike | dict | Config, overrides: Sequence[str] = ()) -> Config:
    """Load a Config from a YAML path, a mapping or a Config; apply `key=value` overrides; validate.

    Raises ConfigError naming every bad field (or the missing file / bad override).
    """
    where = ""
    if isinstance(source, Config):
        data = config_to_dict(source)
    elif isinstance(source, dict):
        data = copy.deepcopy(source)  # overrides must not touch the caller's mapping
    else:
        where = os.fspath(source)
        from ..io_errors import load_yaml
        try:
            data = load_yaml(where, "config file")
        except FileNotFoundError:
            raise ConfigError([f"config file {where!r} does not exist"]) from None
        except ValueError as exc:  # not readable, not UTF-8 or not YAML: the message names file and line
            raise ConfigError([str(exc)]) from None
        data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"{where or 'configuration'} must be a mapping of sections "
                           f"(run, model, ...), got {type(data).__name__}"])
    _expand_shorthands(data)  # before overrides too, so parallel.fsdp.enabled=... finds a section
    problems = [p for p in (_apply_override(data, o) for o in overrides) if p]
    if problems:
        raise ConfigError(problems, header="bad overrides" + (f" for {where}" if where else ""))
    _expand_shorthands(data)
    try:
        return from_dict(Config, data)
    except ConfigError as exc:
        if not where:
            raise
        given = f" with the overrides {', '.join(short_repr(o) for o in overrides)}" if overrides else ""
        raise ConfigError(exc.problems, header=f"invalid configuration in {where}{given}") from None


def _expand_shorthands(data: dict) -> None:
    """`parallel.fsdp: true|false` means `parallel.fsdp: {enabled: true|false}`."""
    parallel = data.get("parallel")
    if isinstance(parallel, dict) and isinstance(parallel.get("fsdp"), bool):
        parallel["fsdp"] = {"enabled": parallel["fsdp"]}


def config_to_dict(cfg: Config) -> dict:
    """Return the config as plain nested dicts/lists/scalars (YAML-serialisable)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
