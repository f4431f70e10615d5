"""Typed configs: YAML files plus dotted command-line overrides, validated before any heavy work.

This module knows no domain: each stage's dataclass lives with its consumer
(:class:`reclora_ds.data.config.PrepareConfig`, :class:`reclora_ds.training.crm_config.CRMTrainConfig`,
:class:`reclora_ds.training.plora_config.PLoRATrainConfig`, the pipeline's own sections in
:mod:`reclora_ds.pipeline.config`); this module loads, overrides, validates and saves any of them.
Every stage has one dataclass. A YAML file gives its fields (nested dataclasses are nested mappings);
``key.sub=value`` overrides on the command line are applied on top. All problems (unknown or misspelled
sections and keys, wrong shapes, wrong types, failed ``__post_init__`` checks) are collected and reported
together, with the valid keys, in one :class:`ConfigError`. The resolved config is written beside every
output with :func:`save_config`, in the shape its command reads back.

Rules that keep a user's values literal and a user's mistakes loud:

* **Overrides of string settings are literal.** ``raw_dir=/data/raw #2`` and ``output_dir=0755`` give exactly
  those strings; only settings of another type (int, float, bool, lists, ...) are parsed as YAML scalars or
  flow collections. For an optional string (``str | None``) the text ``null`` means None; a value wholly in
  matching quotes is a YAML quoted string (``retrieval_dir=''`` is empty, as CONFIG.md writes it).
* **File values of string settings must be strings.** YAML reads an unquoted ``0755`` as the number 493
  and ``yes`` as true; such a value for a string setting is an error asking to quote it, never converted.
* **Sections.** A dataclass with a ``CONFIG_SECTION`` class attribute (or a ``section=`` argument) is read
  from that top-level section of the file; the file must hold it, and may hold only the known sections of
  a shared pipeline file (:data:`SHARED_FILE_SECTIONS`): a misspelled section (``prepar:``) or a file
  without the section is an error, never the defaults. :func:`save_config` writes the same section, so a
  run's saved ``config.yaml`` is a valid ``--config`` of the command that made it.

Example::

    cfg = load_config(PrepareConfig, "launch/configs/quickstart.yaml", ["prepare.min_history=10"], "prepare")
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# The top-level sections a shared (pipeline) config file may hold; a stage command reads its own and
# ignores the others, and rejects any other name (a misspelling such as ``prepar:``). The pipeline's loader
# (``reclora_ds.pipeline.config.SECTIONS``) has exactly these; a test checks it.
SHARED_FILE_SECTIONS = ("pipeline", "prepare", "sim", "embeddings", "plora")
# The file ``reclora-ds pipeline`` writes into a stage's output folder before running the stage's command
# (``reclora_ds.pipeline.stages.CONFIG_FILE``; a test checks they agree). An output folder holding only it
# counts as empty, and a ``--config`` of that name inside the output folder is the pipeline's, not the user's.
STAGE_CONFIG_FILE = "stage_config.yaml"
# What an override value of an optional string setting must be to mean None.
NULL_TEXT = "null"


class UserError(ValueError):
    """A mistake in what the user gave (a config, a path, a raw file), not a bug: every entry point prints
    it as ``error: <file/key>: <reason>`` and exits 2, without a traceback (``reclora_ds.cli``)."""


class ConfigError(UserError):
    """All problems found in a config, reported at once.

    ``str(error)`` is one line per problem, ``<source>: <problem>`` (the source is the file, or
    ``<defaults>``/``<command line>``), which the entry points print after ``error: ``.
    """

    def __init__(self, problems: list[str], source: str):
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in problems))

    def lines(self) -> list[str]:
        """``error: <source>: <problem>`` lines, as the entry points print them."""
        return [f"error: {self.source}: {p}" for p in self.problems]


@dataclasses.dataclass(frozen=True)
class OverrideText:
    """The unparsed text of a ``key=value`` override: kept literal for string settings, parsed as YAML
    for settings of other types (see :func:`_coerce`)."""

    text: str
    item: str  # the whole override, for messages

    def parsed(self) -> Any:
        """The text as a YAML scalar or flow collection (raises yaml.YAMLError)."""
        return yaml.safe_load(self.text) if self.text.strip() else ""

    def literal(self) -> str:
        """The text for a string setting: as it is, unless wholly enclosed in matching quotes (``''``,
        ``"a #b"``), which are a YAML quoted string (what CONFIG.md shows for an empty default)."""
        text = self.text
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                return text
            return value if isinstance(value, str) else text
        return text


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
    """``["a.b=3", "c=[1, 2]"]`` -> nested dict of :class:`OverrideText` leaves (parsed when the config is
    built, knowing each key's type: string settings stay literal)."""
    tree: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            problems.append(f"override {item!r} is not of the form key.sub=value")
            continue
        value = OverrideText(raw, item)
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


def _is_optional_str(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {
        str,
        type(None),
    }


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, lists for tuples.

    An :class:`OverrideText` is kept literal for ``str`` (and for ``str | None`` unless it is ``null``),
    and parsed as YAML for every other type.
    """
    if isinstance(value, OverrideText):
        if tp is str:
            return value.literal()
        if _is_optional_str(tp):
            return None if value.text.strip() == NULL_TEXT else value.literal()
        try:
            value = value.parsed()
        except yaml.YAMLError as exc:
            problems.append(f"{key}: override {value.item!r} is not a valid value ({exc.__class__.__name__})")
            return None
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
        if value is not None and not isinstance(value, (list, dict)):
            problems.append(
                f"{key}: expected a string, got {value!r} ({type(value).__name__}); YAML reads some unquoted "
                "text (0755, 1e3, yes, 2024-01-01) as another type: quote it"
            )
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    problems.append(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def did_you_mean(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'prepare'?)`` for a close match of a misspelled name, else ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, problems: list[str]) -> T | None:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = did_you_mean(str(key), list(names))
            problems.append(f"unknown key {dotted!r}" + close.replace(" '", f" '{prefix}", 1))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, OverrideText):
                value = {} if not value.text.strip() else value.text
            if not isinstance(value, Mapping):
                problems.append(
                    f"{dotted}: expected a section (mapping of its keys), got {type(value).__name__} {value!r}"
                )
                continue
            sub = _build(tp, value, f"{dotted}.", problems)
            if sub is not None:
                kwargs[key] = sub
        else:
            found: list[str] = []
            coerced = _coerce(value, tp, dotted, found)
            problems += found
            # A value of the wrong type is left out (the class's own checks would trip over it and the
            # other keys would go unchecked); a Literal's wrong choice has the right type and is kept, so
            # the class's check names it too.
            if not found or typing.get_origin(tp) is typing.Literal:
                kwargs[key] = coerced
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
    if p.is_dir():
        raise ConfigError(["is a folder, not a YAML config file"], str(path))
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"], str(path))
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text ({exc.reason} at byte {exc.start})"], str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {' '.join(str(exc).split())}"], str(path)) from None
    except RecursionError:
        raise ConfigError(["not valid YAML: nested too deeply"], str(path)) from None
    if not isinstance(loaded, Mapping):
        raise ConfigError([f"top level must be a mapping, got {type(loaded).__name__}"], str(path))
    return dict(loaded)


def config_section(cls: type) -> str | None:
    """The top-level section a config file holds ``cls`` under (its ``CONFIG_SECTION``), or None (flat)."""
    return getattr(cls, "CONFIG_SECTION", None)


def _select_section(data: dict[str, Any], cls: type, section: str, problems: list[str]) -> dict[str, Any]:
    """The ``section`` mapping of a file's top level; every other top-level key must be a known section."""
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key == section or key in SHARED_FILE_SECTIONS:
            continue
        if key in fields:
            if section in data:  # else reported below, with the hint to add the section
                problems.append(
                    f"{key!r} is at the top level, outside the {section!r} section: move it under `{section}:`"
                )
            continue
        problems.append(
            f"unknown section {key!r}"
            + did_you_mean(str(key), [section, *SHARED_FILE_SECTIONS])
            + f"; this command reads the {section!r} section"
        )
    if section not in data:
        flat = sorted(k for k in data if k in fields)
        hint = (
            f"; its top level has keys of that section ({', '.join(flat[:5])}): put them under `{section}:`"
            if flat
            else ""
        )
        problems.append(
            f"has no {section!r} section (a `{section}:` mapping), which this command reads" + hint
        )
        return {}
    value = data[section]
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(
            f"{section}: expected a section (mapping of its keys), got {type(value).__name__} {value!r}"
        )
        return {}
    return dict(value)


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), section: str | None = None
) -> T:
    """Load ``cls`` from a YAML file (its ``section``, by default ``cls.CONFIG_SECTION``; else the whole
    file) with dotted overrides on top.

    Overrides may be written with or without the section prefix (``min_history=3`` or
    ``prepare.min_history=3`` when ``section="prepare"``). A file without the section, or with another
    top-level name than :data:`SHARED_FILE_SECTIONS`, is an error (with a did-you-mean hint).
    """
    section = section if section is not None else config_section(cls)
    source = str(path) if path else "<command line>"
    problems: list[str] = []
    data = read_yaml_mapping(path) if path is not None else {}
    if section is not None and path is not None:
        data = _select_section(data, cls, section, problems)
    elif section is None:
        stray = [
            k
            for k in data
            if k in SHARED_FILE_SECTIONS and k not in {f.name for f in dataclasses.fields(cls)}
        ]
        if stray:
            problems.append(
                f"top-level section(s) {stray}: this command reads a flat file of {cls.__name__} keys, not a "
                "pipeline file (pass the stage's own config, or run `reclora-ds pipeline`)"
            )
            data = {k: v for k, v in data.items() if k not in stray}
    tree, override_problems = parse_overrides(overrides)
    problems += override_problems
    if section is not None and section in tree and isinstance(tree[section], dict):
        tree = merge({k: v for k, v in tree.items() if k != section}, tree[section])
    merged = merge(data, tree)
    try:
        cfg = config_from_dict(cls, merged, source)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems, source) from None
    if problems:
        raise ConfigError(problems + ["valid keys: " + ", ".join(field_paths(cls))], source)
    return cfg


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


def save_config(cfg: Any, path: str | Path, section: str | None = None) -> Path:
    """Write the resolved config as YAML (keys as declared), atomically, and return the path.

    The keys go under ``section`` (default: the class's ``CONFIG_SECTION``; none: at the top level), so
    the file is a valid ``--config`` of the command that reads ``cfg``'s class (:func:`load_config` with
    the same section gives back ``cfg``).
    """
    path = Path(path)
    section = section if section is not None else config_section(type(cfg))
    data = config_to_dict(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({section: data} if section else data, sort_keys=False, allow_unicode=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------------
# Output locations: checked before any heavy work
# ----------------------------------------------------------------------------------------------------------


def _is_temporary(name: str) -> bool:
    """A writer's temporary sibling (``.<name>.tmp-<pid>...``, reclora_ds.files and :func:`save_config`)."""
    return name.startswith(".") and ".tmp-" in name


def output_dir_problems(
    path: str | os.PathLike[str],
    key: str,
    *,
    is_own_output: Any = None,
    protected: Sequence[str | os.PathLike[str]] = (),
) -> list[str]:
    """Why ``path`` cannot receive a command's output folder (empty list: it can).

    Refused: an empty path; the current folder or one holding it; a path that is a file or lies under a
    file; a parent that cannot be created or written; a folder that holds ``protected`` paths (the user's
    config file, the raw data); an existing non-empty folder that is not this toolkit's own earlier output of
    the same kind (``is_own_output(path) -> str | None`` returns why not, or None when it is; a folder
    holding only :data:`STAGE_CONFIG_FILE` counts as empty). Only stats the file system; writes nothing.
    """
    text = os.fspath(path)
    if not text.strip():
        return [f"{key}: empty; give the folder to write to"]
    out = Path(text).expanduser()
    absolute = Path(os.path.abspath(out))
    cwd = Path.cwd()
    if absolute == cwd or absolute in cwd.parents:
        return [
            f"{key}={text!r}: is the current folder (or holds it); outputs replace their whole folder, "
            "so give a new or earlier-output subfolder (e.g. outputs/run1)"
        ]
    for item in protected:
        p = Path(os.path.abspath(Path(item).expanduser()))
        if p == absolute / STAGE_CONFIG_FILE:
            continue  # the pipeline's copy of the stage config (kept in the new folder)
        if p == absolute or absolute in p.parents:
            return [f"{key}={text!r}: holds {item} (your input), which writing the output would replace"]
    for parent in [absolute, *absolute.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == absolute else f"lies under {parent}, which is a file"
            return [f"{key}={text!r}: {where}"]
    existing = next(p for p in [absolute, *absolute.parents] if p.exists())
    if existing != absolute and not os.access(existing, os.W_OK | os.X_OK):
        return [f"{key}={text!r}: cannot be created: {existing} is not writable"]
    if existing == absolute:
        if not os.access(absolute.parent, os.W_OK | os.X_OK):
            return [f"{key}={text!r}: cannot be replaced: {absolute.parent} is not writable"]
        # the pipeline's stage config, and temporaries of a writer (another rank may be starting the
        # same run: ``.config.yaml.tmp-<pid>-...`` before its rename) do not make a folder foreign
        contents = [
            e for e in absolute.iterdir() if e.name != STAGE_CONFIG_FILE and not _is_temporary(e.name)
        ]
        if contents and is_own_output is not None:
            why = is_own_output(absolute)
            if why is not None:
                return [
                    f"{key}={text!r}: the folder exists and is not an earlier output of this command ({why}); "
                    "it is never overwritten: give a new folder, or empty/remove it yourself"
                ]
    return []


# ----------------------------------------------------------------------------------------------------------
# Entry points: user errors are reported, never raised as tracebacks
# ----------------------------------------------------------------------------------------------------------

USER_ERROR_EXIT = 2

# The toolkit's exception types that report a user's mistake (module, class), besides UserError and its
# subclasses (ConfigError, RawDataError, ...). Only modules already imported are looked at: an exception
# cannot be of a class that was never loaded, so catching costs no import.
USER_ERROR_CLASSES: tuple[tuple[str, str], ...] = (
    ("reclora_ds.files", "SidecarError"),
    ("reclora_ds.files", "DiskFullError"),
    ("reclora_ds.llm_loader", "LLMLoadError"),
    ("reclora_ds.backbone.errors", "BackboneError"),
    ("reclora_ds.retrieval.errors", "RetrievalInputError"),
    ("reclora_ds.data.histories", "RetrievedHistoriesError"),
    ("reclora_ds.training.adapter_io", "AdapterConfigMismatchError"),
    ("reclora_ds.training.adapter_io", "AdapterKeyError"),
    ("reclora_ds.training.rec_llm_io", "RecLLMFileError"),
    ("reclora_ds.training.checkpoint", "CheckpointError"),
    ("reclora_ds.training.scoring", "ScoringError"),
    ("reclora_ds.training.crm_states", "DatasetMismatchError"),
    ("reclora_ds.commands.export_user_lora", "ExportError"),
    ("reclora_ds.malloc_preload", "AllocatorError"),
    ("reclora_ds.training.plora_recipe", "AttentionFormError"),
)
# Operating-system errors about a path the user gave (a missing or unreadable file, a folder for a file).
PATH_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception type that is a user's mistake, among the modules loaded so far."""
    found: list[type[BaseException]] = [UserError, *PATH_ERRORS]
    for module, name in USER_ERROR_CLASSES:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def error_lines(exc: BaseException) -> list[str]:
    """``error: <file/key>: <reason>`` lines for a user error (a ConfigError gives one per problem)."""
    if isinstance(exc, ConfigError):
        return exc.lines()
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return [f"error: {exc.filename}: {exc.strerror}"]
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return [f"error: {line}" for line in (text or exc.__class__.__name__).splitlines()]


def report_user_error(exc: BaseException) -> int:
    """Print ``exc`` as ``error:`` lines on stderr; return the exit status of a user error (2)."""
    print("\n".join(error_lines(exc)), file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


def run_command(body: Callable[[], int]) -> int:
    """Run a command's body: its status, or 2 with ``error:`` lines for a user error (no traceback).

    Every command's ``main`` goes through this, so the commands, ``reclora-ds <command>`` and the
    ``launch/`` / ``tools/`` wrappers report the same way.
    """
    try:
        return body()
    except RecursionError:
        return report_user_error(UserError("input nested too deeply to read (a pathological JSON or YAML?)"))
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a user error
        if isinstance(exc, user_error_types()):
            return report_user_error(exc)
        raise


def marker_check(*markers: str) -> Callable[[Path], str | None]:
    """An ``is_own_output`` test for :func:`reclora_ds.config.output_dir_problems`: the folder is an earlier
    output of a command when it holds one of ``markers`` (the files that command writes first)."""

    def check(folder: Path) -> str | None:
        if any((folder / m).exists() for m in markers):
            return None
        return f"none of {', '.join(markers)} is in it"

    return check


def run_folder_check(cls: type, section: str | None) -> Callable[[Path], str | None]:
    """An ``is_own_output`` test for a training run folder: its ``config.yaml`` (written first) is a config
    of ``cls`` (under ``section``, or flat: runs saved before the section was written)."""
    import dataclasses

    import yaml

    names = {f.name for f in dataclasses.fields(cls)}

    def check(folder: Path) -> str | None:
        try:
            data = yaml.safe_load((folder / "config.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError):
            return "no readable config.yaml of a run"
        if isinstance(data, dict) and section is not None and isinstance(data.get(section), dict):
            data = data[section]
        if not isinstance(data, dict) or not data or not set(data) <= names:
            return f"its config.yaml is not a {cls.__name__}"
        return None

    return check


def check_output_location(
    path: str | os.PathLike[str] | None,
    key: str,
    markers: tuple[str, ...] | Callable[[Path], str | None],
    *,
    source: str,
    protected: tuple[str | os.PathLike[str] | None, ...] = (),
) -> None:
    """Refuse (ConfigError, exit 2) an output folder that cannot be created or is not the command's own.

    Args:
        markers: files of which one is in every earlier output of the command (a rerun may resume it), or
            an ``is_own_output`` test (:func:`run_folder_check`).
        protected: the user's inputs (config file, raw folder) that the output may not hold.
    """
    if path is None:
        return
    own = markers if callable(markers) else marker_check(*markers)
    problems = output_dir_problems(
        path, key, is_own_output=own, protected=[p for p in protected if p is not None]
    )
    if problems:
        raise ConfigError(problems, source)
