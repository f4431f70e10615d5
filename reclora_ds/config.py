"""Typed configs: YAML files plus dotted command-line overrides, validated before any heavy work.

This module knows no domain: each stage's dataclass lives with its consumer
(:class:`reclora_ds.data.config.PrepareConfig`, :class:`reclora_ds.training.crm_config.CRMTrainConfig`,
:class:`reclora_ds.training.plora_config.PLoRATrainConfig`, the pipeline's own sections in
:mod:`reclora_ds.pipeline.config`); this module loads, overrides, validates and saves any of them.
Every stage has one dataclass. A YAML file gives its fields (nested dataclasses are nested mappings);
``key.sub=value`` overrides on the command line are parsed as YAML scalars and applied on top. All
problems (unknown keys, wrong types, failed ``__post_init__`` checks) are collected and reported together,
with the valid keys, in one :class:`ConfigError`. The resolved config is written beside every output with
:func:`save_config`.

Example::

    cfg = load_config(PrepareConfig, "launch/configs/quickstart.yaml", ["prepare.min_history=10"], "prepare")
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """All problems found in a config, reported at once."""

    def __init__(self, problems: list[str], source: str):
        self.problems = problems
        super().__init__(f"invalid config ({source}):\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------------------------------------
# Loading, overriding, validating, saving
# ----------------------------------------------------------------------------------------------------------


def field_paths(cls: type) -> list[str]:
    """All dotted keys of a config dataclass, nested ones included (``goodreads.books_glob``)."""
    paths: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            paths.extend(f"{f.name}.{sub}" for sub in field_paths(tp))
        else:
            paths.append(f.name)
    return paths


def parse_overrides(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``["a.b=3", "c=[1, 2]"]`` -> nested dict; values are parsed as YAML scalars/flow collections."""
    tree: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} is not of the form key.sub=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problems.append(f"override {item!r}: value is not valid YAML ({exc.__class__.__name__})")
            continue
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {part!r} is set to a value and used as a section")
                break
        else:
            node[parts[-1]] = value
    return tree, problems


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge, ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        problems.append(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, arg, key, trial)
            if not trial:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
            return value
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                problems.append(f"{key}: expected {len(args)} items, got {len(value)}")
                return value
            items = [_coerce(v, a, f"{key}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{key}: expected a mapping, got {value!r}")
        return dict(value) if isinstance(value, Mapping) else value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. raw_dir=2024 is still a path
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    problems.append(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, problems: list[str]) -> T | None:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            problems.append(f"unknown key {dotted!r}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                problems.append(f"{dotted}: expected a section (mapping), got {value!r}")
                continue
            sub = _build(tp, value, f"{dotted}.", problems)
            if sub is not None:
                kwargs[key] = sub
        else:
            kwargs[key] = _coerce(value, tp, dotted, problems)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        problems.append(f"{prefix or ''}{exc}" if not prefix else f"{prefix.rstrip('.')}: {exc}")
        return None


def config_from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Build and validate ``cls`` from a nested mapping; raise one ConfigError listing every problem."""
    problems: list[str] = []
    cfg = _build(cls, data, "", problems)
    if problems or cfg is None:
        problems.append("valid keys: " + ", ".join(field_paths(cls)))
        raise ConfigError(problems, source)
    return cfg


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (empty file: ``{}``); ConfigError when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"], str(path))
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from exc
    if not isinstance(loaded, Mapping):
        raise ConfigError([f"top level must be a mapping, got {type(loaded).__name__}"], str(path))
    return dict(loaded)


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), section: str | None = None
) -> T:
    """Load ``cls`` from a YAML file (optionally one ``section`` of it) with dotted overrides on top.

    Overrides may be written with or without the section prefix (``min_history=3`` or
    ``prepare.min_history=3`` when ``section="prepare"``).
    """
    source = str(path) if path else "<defaults>"
    data = read_yaml_mapping(path) if path is not None else {}
    if section is not None and path is not None:
        data = dict(data.get(section, {}) or {})
    tree, problems = parse_overrides(overrides)
    if section is not None and section in tree and isinstance(tree[section], dict):
        tree = merge({k: v for k, v in tree.items() if k != section}, tree[section])
    if problems:
        raise ConfigError(problems + ["valid keys: " + ", ".join(field_paths(cls))], source)
    return config_from_dict(cls, merge(data, tree), source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain (YAML/JSON-safe) dict of a config dataclass; tuples become lists."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (sorted as declared) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
