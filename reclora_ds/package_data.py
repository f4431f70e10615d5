"""The configs shipped inside the package, and how a relative config path finds them.

    reclora_ds/ds_configs/*.json        the DeepSpeed JSONs           (the repository's ds_configs/)
    reclora_ds/launch_configs/*.yaml    the pipeline and stage YAMLs  (the repository's launch/configs/)

In a checkout both folders are symbolic links to the repository's top-level folders, so each file exists
once; a wheel holds copies (``[tool.setuptools.package-data]`` in pyproject.toml), so ``pip install .``
works outside the checkout.

A config path that exists (absolute, or relative to the working directory) is always the one used. Only
when it does not exist, and it is a bare name of a shipped file (``zero2_fp32.json``) or the repository's
relative path to one (``ds_configs/zero2_fp32.json``, ``launch/configs/quickstart.yaml``), the packaged copy
is used instead, and the log says so. Any other missing path stays missing: a same-named shipped file is
never picked silently.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
DS_CONFIGS = PACKAGE_DIR / "ds_configs"
LAUNCH_CONFIGS = PACKAGE_DIR / "launch_configs"
# Where each folder sits in the repository: a relative path under it may name the packaged copy.
DS_CONFIGS_PREFIX = ("ds_configs",)
LAUNCH_CONFIGS_PREFIX = ("launch", "configs")


def packaged_copy(path: str | os.PathLike[str], folder: Path, prefix: tuple[str, ...]) -> Path | None:
    """The file of ``folder`` that the relative ``path`` names (a bare name, or ``prefix/name``); else None."""
    given = Path(path)
    if given.is_absolute() or given.parts[:-1] not in ((), prefix):
        return None
    candidate = folder / given.name
    return candidate if candidate.is_file() else None


def find_ds_config(path: str | os.PathLike[str]) -> Path:
    """The DeepSpeed JSON ``path``: as given (working directory first), else the packaged copy it names.

    Raises:
        FileNotFoundError: neither exists; the message lists the shipped names.
    """
    given = Path(path).expanduser()
    if given.is_file():
        log.info("DeepSpeed config: %s", given.resolve())
        return given
    packaged = packaged_copy(given, DS_CONFIGS, DS_CONFIGS_PREFIX)
    if packaged is None:
        shipped = ", ".join(sorted(p.name for p in DS_CONFIGS.glob("*.json")))
        raise FileNotFoundError(
            f"DeepSpeed config {path} not found in {Path.cwd()}, and it names none of the packaged ones "
            f"({DS_CONFIGS_PREFIX[0]}/: {shipped})"
        )
    log.info("DeepSpeed config %s: not in %s, using the packaged copy %s", path, Path.cwd(), packaged)
    return packaged


def resolve_launch_config(path: str | os.PathLike[str] | None) -> str | Path | None:
    """``path`` when it exists (or is None); else the packaged launch config it names; else ``path``
    unchanged, for the config loader to report as missing."""
    if path is None or Path(path).expanduser().exists():
        return path
    packaged = packaged_copy(path, LAUNCH_CONFIGS, LAUNCH_CONFIGS_PREFIX)
    if packaged is None:
        return path
    log.info("config %s: not in %s, using the packaged copy %s", path, Path.cwd(), packaged)
    return packaged
