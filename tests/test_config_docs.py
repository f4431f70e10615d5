"""docs/CONFIG.md: up to date, complete, and its keys and defaults are the ones the loader accepts."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import yaml

from reclora_ds.config import field_paths, load_config
from reclora_ds.config_docs import (
    CONFIGS,
    DOCS_PATH,
    REGENERATE,
    ConfigDoc,
    UndocumentedFieldsError,
    field_descriptions,
    render_config_docs,
)

IDS = [doc.name for doc in CONFIGS]


def test_config_md_is_up_to_date():
    fresh = render_config_docs()
    current = DOCS_PATH.read_text() if DOCS_PATH.is_file() else ""
    assert current == fresh, f"{DOCS_PATH} is stale: regenerate it with `{REGENERATE}`"


def _tables(text: str) -> dict[str, list[tuple[str, str]]]:
    """``## name`` -> [(key, default)] parsed back from the Markdown (section rows skipped)."""
    tables: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = tables.setdefault(line[3:].strip(), [])
        elif current is not None and line.startswith("| `"):  # a key row ("| **`x.*`**" = a section)
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            current.append((cells[0].strip("`"), cells[2].strip("`")))
    return tables


DOC_TABLES = _tables(DOCS_PATH.read_text()) if DOCS_PATH.is_file() else {}


@pytest.mark.parametrize("doc", CONFIGS, ids=IDS)
def test_every_field_is_documented(doc: ConfigDoc):
    keys = [key for key, _ in DOC_TABLES.get(doc.name, [])]
    assert keys == field_paths(doc.cls), f"table of {doc.name} in {DOCS_PATH} (regenerate: `{REGENERATE}`)"


def _nested(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, default in pairs:
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(default)
    return tree


@pytest.mark.parametrize("doc", CONFIGS, ids=IDS)
def test_documented_defaults_round_trip_through_the_loader(doc: ConfigDoc, tmp_path):
    """The doc's keys and defaults, typed as a user would (YAML file, ``key=value``), give ``cls()``."""
    pairs = DOC_TABLES.get(doc.name)
    assert pairs, f"no table for {doc.name} in {DOCS_PATH}"
    expected = doc.cls()

    data = _nested(pairs)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({doc.section: data} if doc.section else data, sort_keys=False))
    assert load_config(doc.cls, path, [], section=doc.section) == expected

    overrides = [f"{key}={default}" for key, default in pairs]
    assert load_config(doc.cls, None, overrides, section=doc.section) == expected
    if doc.section:
        prefixed = [f"{doc.section}.{item}" for item in overrides]
        assert load_config(doc.cls, None, prefixed, section=doc.section) == expected


@dataclasses.dataclass
class _Documented:
    """A config documented both ways.

    Attributes:
        from_section: described in the
            Attributes section (two lines).
        both (int): the attribute docstring wins.
    """

    inline: int = 1
    """Described by its
    attribute docstring."""
    from_section: str = ""
    both: int = 0
    """Attribute docstring."""


@dataclasses.dataclass
class _Inner:
    """Nested."""

    documented: int = 0
    """Yes."""
    undocumented: float = 0.0


@dataclasses.dataclass
class _Outer:
    """Outer."""

    inner: _Inner = dataclasses.field(default_factory=_Inner)
    name: str = ""


def test_descriptions_from_attribute_docstrings_and_attributes_section():
    assert field_descriptions(_Documented) == {
        "inline": "Described by its attribute docstring.",
        "from_section": "described in the Attributes section (two lines).",
        "both": "Attribute docstring.",
    }


def test_undocumented_fields_fail_loudly_with_every_one_listed():
    with pytest.raises(UndocumentedFieldsError) as info:
        render_config_docs([("outer", _Outer, "A test config.")])
    assert info.value.missing == [
        f"{__name__}._Outer.inner",
        f"{__name__}._Inner.undocumented",
        f"{__name__}._Outer.name",
    ]
