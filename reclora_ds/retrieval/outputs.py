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
  file of the folder with its size and sha256 (:func:`reclora_ds.files.listing`). Readers call :func:`reclora_ds.files.listing_problems`:
  every listed file present with its size (and, where the reader asks, its sha256), and nothing else in the
  folder but the sidecar and the carried files. A file removed, added, truncated or left by another run is
  named in the error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reclora_ds.config import STAGE_CONFIG_FILE
from reclora_ds.files import atomic_dir, listing_problems
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


def check_listing(folder: Path, listed: Any, sidecar: str, **kwargs: Any) -> None:
    """:func:`listing_problems`, raised as one :class:`RetrievalInputError` naming the folder."""
    if not isinstance(listed, dict):
        raise RetrievalInputError(
            f"{folder / sidecar}: has no file list ('files'): written by an older reclora_ds or another "
            "tool; write the output again"
        )
    problems = listing_problems(folder, listed, sidecar, also_allowed=CARRIED_FILES, **kwargs)
    if problems:
        raise RetrievalInputError(
            f"{folder}: does not match its {sidecar} (an interrupted or mixed write?): " + "; ".join(problems)
        )
