"""Output folders of the retrieval stages: built beside their destination, listed, checked on reading.

Every retrieval stage (item embeddings, the FAISS index, the retrieval folder) writes its output the same way,
so the guarantee is stated once:

* **Old or new, never a mix.** :func:`replace_output` fills a temporary sibling folder
  (:func:`reclora_ds.files.atomic_dir`) and renames it over the destination in one ``rename``; a kill or a
  full disk at any moment leaves the previous output as it was (or, between the two renames of the swap,
  under ``<name>.old``, which :func:`reclora_ds.files.resolve_old` finds) and never new files beside old
  metadata. The pipeline's ``stage_config.yaml`` is carried over into the new folder.
* **Never someone else's folder.** An existing non-empty destination that lacks the stage's sidecar is
  refused before anything is written (:func:`refuse_foreign`): replacing it would delete files this toolkit
  did not write.
* **Listed, and checked on reading.** The sidecar, written last inside the temporary folder, lists every
  file of the folder with its size and sha256 (:func:`listing`). Readers call :func:`listing_problems`:
  every listed file present with its size (and, where the reader asks, its sha256), and nothing else in the
  folder but the sidecar and the carried files. A file removed, added, truncated or left by another run is
  named in the error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from reclora_ds.config import STAGE_CONFIG_FILE
from reclora_ds.files import atomic_dir, sha256_file, temporary_sibling
from reclora_ds.retrieval.errors import RetrievalInputError

CARRIED_FILES = (STAGE_CONFIG_FILE,)
"""Files of the destination that are not the stage's own and go over into the new folder (the pipeline's
copy of the stage config)."""


def refuse_foreign(out: Path, sidecar: str) -> None:
    """Raise :class:`RetrievalInputError` when ``out`` is an existing non-empty folder without ``sidecar``.

    A folder holding only :data:`CARRIED_FILES` (or only hidden temporaries) counts as empty.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise RetrievalInputError(f"{out}: is a file, not an output folder")
    foreign = sorted(
        p.name for p in out.iterdir() if p.name not in CARRIED_FILES and not p.name.startswith(".")
    )
    if foreign and not (out / sidecar).is_file():
        raise RetrievalInputError(
            f"{out}: holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''} but no {sidecar}: not an earlier "
            "output of this stage, so it is not replaced (give an empty or new folder)"
        )


@contextlib.contextmanager
def replace_output(out: str | os.PathLike[str], sidecar: str) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out`` to fill (sidecar last); on success it replaces ``out``.

    Refuses a foreign ``out`` first (:func:`refuse_foreign`). On an exception (a kill, a full disk:
    :class:`reclora_ds.files.DiskFullError`) ``out`` is untouched and the temporary folder removed.
    """
    out = Path(out)
    refuse_foreign(out, sidecar)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        for name in CARRIED_FILES:
            if (out / name).is_file():
                shutil.copy2(out / name, tmp / name)
        yield tmp


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` gets ``source``'s content: a hard link (no copy; this toolkit's writers never modify a file
    in place, they replace it) or, across file systems, a copy; through a temporary name, so ``target`` is
    never half a file."""
    tmp = temporary_sibling(target)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def listing(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` of the files ``names`` (relative paths) under ``folder``."""
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        for name in sorted(names)
    }


def listing_problems(
    folder: Path,
    listed: dict[str, dict[str, Any]],
    sidecar: str,
    *,
    verify_sha256: Iterable[str] = (),
    optional_dirs: Iterable[str] = (),
) -> list[str]:
    """Differences between ``folder`` and the files its ``sidecar`` lists (empty list: it matches).

    Checked: every listed file exists with the listed size; the sha256 of the files in ``verify_sha256``;
    no other entry at the top of the folder except ``sidecar``, :data:`CARRIED_FILES` and hidden temporaries;
    in a listed subfolder (a name of ``listed`` containing ``/``) no unlisted file. A folder of
    ``optional_dirs`` may be absent as a whole (e.g. the shard cache, deletable), never in part.
    """
    problems = []
    optional = set(optional_dirs)
    absent_dirs = {d for d in optional if not (folder / d).exists()}
    for name, info in listed.items():
        top = name.split("/")[0]
        if top in absent_dirs:
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is listed in {sidecar} but missing")
        elif path.stat().st_size != info.get("bytes"):
            problems.append(f"{name} has {path.stat().st_size} bytes, {sidecar} lists {info.get('bytes')}")
        elif name in set(verify_sha256) and sha256_file(path) != info.get("sha256"):
            problems.append(f"{name} has another sha256 than {sidecar} lists (changed after it was written)")
    tops = {name.split("/")[0] for name in listed}
    allowed = tops | {sidecar, *CARRIED_FILES}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # a writer's temporary (removed by the next write)
        if entry.name not in allowed:
            problems.append(f"{entry.name} is in the folder but not listed in {sidecar} (from another run?)")
        elif entry.is_dir():
            for file in sorted(p for p in entry.rglob("*") if p.is_file()):
                rel = file.relative_to(folder).as_posix()
                if rel not in listed and not file.name.startswith("."):
                    problems.append(f"{rel} is in the folder but not listed in {sidecar} (from another run?)")
    return problems


def check_listing(folder: Path, listed: Any, sidecar: str, **kwargs: Any) -> None:
    """:func:`listing_problems`, raised as one :class:`RetrievalInputError` naming the folder."""
    if not isinstance(listed, dict):
        raise RetrievalInputError(
            f"{folder / sidecar}: has no file list ('files'): written by an older reclora_ds or another "
            "tool; write the output again"
        )
    problems = listing_problems(folder, listed, sidecar, **kwargs)
    if problems:
        raise RetrievalInputError(
            f"{folder}: does not match its {sidecar} (an interrupted or mixed write?): " + "; ".join(problems)
        )
