"""Retrieved histories: the one type and the one on-disk format of per-sample history rows.

The Long-Short Modality Retriever (:mod:`reclora_ds.retrieval.retriever`) writes them; every reader (the
CRM loader of stage 1, stage 2's CRM and prompt histories, scoring, adapter export, CRM states) opens them
with :func:`load_retrieved` and looks rows up with :meth:`RetrievedHistories.lookup`.

Shape legend: S samples in the folder, K rows per sample (one array per K), B looked-up samples.

A retrieval folder::

    sample_ids.npy     int64 [S], strictly ascending (every sample of train, valid and test; the few-shot
                       split is a subset of train)
    rows_k<K>.npy      int32 [S, K] per retrieved K: rows of ``timelines.parquet`` (user-major, so a row
                       gives both the item and the rating of a behaviour), valid rows first and in
                       chronological order, NO_ROW (-1) padding when the history holds fewer than K
    retrieval.json     the sidecar, written last: format, format_version, mode (``similarity`` or ``recent``), ks,
                       n_samples, outputs per K, the processed dataset's metadata sha256, the index checksum

Row ``i`` of every array belongs to ``sample_ids[i]``. A sample's K rows are the K most similar of its whole
prior history (mode ``similarity``) or its K most recent (mode ``recent``), re-sorted into time order, so a
loader takes them as they are: rows_k10 is *not* the last 10 entries of rows_k60 (those are the 10 most
recent of the top 60), which is why each K has its own array and :meth:`RetrievedHistories.lookup` refuses a
K that was not retrieved.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reclora_ds.config import STAGE_CONFIG_FILE
from reclora_ds.files import SidecarError, listing_problems, read_sidecar

FORMAT = "reclora_ds.retrieval"
FORMAT_VERSION = 2  # 2: the sidecar names its format
SIDECAR_FILE = "retrieval.json"
SAMPLE_IDS_FILE = "sample_ids.npy"
NO_ROW = -1  # an empty slot of a rows array
RETRIEVAL_MODES = ("similarity", "recent")


def rows_file(k: int) -> str:
    """File name of the K-row array."""
    return f"rows_k{k}.npy"


class RetrievedHistoriesError(ValueError):
    """A retrieval folder is missing, incomplete, of another format, or belongs to another dataset."""


@dataclass
class RetrievedHistories:
    """Retrieved timeline rows per sample, joined by ``sample_id`` (arrays memory-mapped).

    Attributes:
        sample_ids: int64 [S], strictly ascending.
        rows: K -> int32 [S, K] (see the module docstring for the row layout).
        meta: the sidecar (``retrieval.json``).
        path: the folder it was read from (None when built in memory).
    """

    sample_ids: np.ndarray
    rows: dict[int, np.ndarray]
    meta: dict[str, Any]
    path: Path | None = None

    def __post_init__(self) -> None:
        self.sample_ids = np.asarray(self.sample_ids, dtype=np.int64)
        if len(self.sample_ids) > 1 and not np.all(self.sample_ids[1:] > self.sample_ids[:-1]):
            raise RetrievedHistoriesError(f"{self._where()}: sample_ids are not strictly ascending")
        for k, arr in self.rows.items():
            if arr.shape != (len(self.sample_ids), k):
                raise RetrievedHistoriesError(
                    f"{self._where()}: rows for K={k} have shape {arr.shape}, expected {(len(self.sample_ids), k)}"
                )

    def _where(self) -> str:
        return str(self.path) if self.path else "retrieved histories"

    @property
    def ks(self) -> tuple[int, ...]:
        """The retrieved K values, ascending."""
        return tuple(sorted(self.rows))

    @property
    def sidecar_sha256(self) -> str:
        """sha256 of the sidecar: it names the dataset, index and K values, so it identifies the retrieval."""
        return hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()

    def require_k(self, k: int) -> None:
        if k not in self.rows:
            raise RetrievedHistoriesError(
                f"{self._where()} holds K in {list(self.ks)}, not {k}: retrieve K={k} too "
                f"(tools/retrieve_histories.py --ks ... {k}), or use a retrieved length"
            )

    def lookup(self, sample_ids: np.ndarray, k: int) -> np.ndarray:
        """Rows int64 [B, k] of the given samples (NO_ROW = empty slot); unknown sample ids raise KeyError."""
        self.require_k(k)
        wanted = np.asarray(sample_ids, dtype=np.int64)
        pos = np.searchsorted(self.sample_ids, wanted)
        pos_c = np.minimum(pos, max(len(self.sample_ids) - 1, 0))
        found = (pos < len(self.sample_ids)) & (self.sample_ids[pos_c] == wanted)
        if not found.all():
            missing = wanted[~found]
            raise KeyError(
                f"{self._where()} lacks {len(missing)} sample ids (e.g. {missing[:5].tolist()}); "
                "was the retrieval run on this processed dataset?"
            )
        return np.asarray(self.rows[k][pos_c], dtype=np.int64)


def read_retrieval_sidecar(folder: str | Path) -> dict[str, Any]:
    """The checked ``retrieval.json`` of a retrieval folder."""
    side = Path(folder) / SIDECAR_FILE
    if not side.is_file():
        raise RetrievedHistoriesError(
            f"{side}: missing; a retrieval folder is written by tools/retrieve_histories.py "
            "(the pipeline's retrieval stage)"
        )
    try:
        return read_sidecar(
            side, FORMAT, FORMAT_VERSION, required=("mode", "ks", "n_samples", "outputs", "dataset")
        )
    except SidecarError as exc:
        raise RetrievedHistoriesError(str(exc)) from exc


def _config_diff(a: dict | None, b: dict | None) -> str:
    a, b = a or {}, b or {}
    diffs = [
        f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]
    return "; ".join(diffs) if diffs else "configs equal (the raw data or the code changed)"


def load_retrieved(
    folder: str | Path,
    dataset_dir: str | Path | None = None,
    *,
    mode: str | None = None,
    index_sha256: str | None = None,
) -> RetrievedHistories:
    """Open a retrieval folder and check it (format, shapes, and what it was computed from).

    Args:
        folder: the retrieval folder.
        dataset_dir: the processed dataset the rows must index; its ``metadata.json`` sha256 must be the
            one the retrieval recorded (another prepare config or other raw data would shift every row).
        mode: when given, the retrieval mode the folder must hold (``similarity`` or ``recent``).
        index_sha256: when given, the FAISS index checksum the retrieval must have used.
    """
    folder = Path(folder)
    meta = read_retrieval_sidecar(folder)
    listed = meta.get("files")
    if not isinstance(listed, dict):
        raise RetrievedHistoriesError(
            f"{folder / SIDECAR_FILE}: has no file list ('files'): written by an older reclora_ds; run the "
            "retrieval again"
        )
    problems = listing_problems(folder, listed, SIDECAR_FILE, also_allowed=(STAGE_CONFIG_FILE,))
    if problems:
        raise RetrievedHistoriesError(
            f"{folder}: does not match its {SIDECAR_FILE} (an interrupted or mixed write?): "
            + "; ".join(problems)
        )
    if mode is not None and meta["mode"] != mode:
        raise RetrievedHistoriesError(
            f"{folder / SIDECAR_FILE}: holds mode {meta['mode']!r}, asked for {mode!r}"
        )
    if dataset_dir is not None:
        from reclora_ds.data.processed import metadata_sha256

        current = metadata_sha256(dataset_dir)
        recorded = meta["dataset"].get("metadata_sha256")
        if recorded != current:
            config = json.loads((Path(dataset_dir) / "metadata.json").read_text()).get("config")
            raise RetrievedHistoriesError(
                f"{folder}: retrieved for a dataset whose metadata.json has sha256 {str(recorded)[:12]}, but "
                f"{dataset_dir} has {current[:12]} (prepared with another config or other raw data: "
                f"{_config_diff(meta['dataset'].get('config'), config)}); re-run the retrieval on this dataset"
            )
    if index_sha256 is not None:
        recorded = (meta.get("index") or {}).get("sha256")
        if recorded != index_sha256:
            raise RetrievedHistoriesError(
                f"{folder}: retrieved with index sha256 {recorded}, not {index_sha256}; re-run the retrieval"
            )
    ids_path = folder / SAMPLE_IDS_FILE
    if not ids_path.is_file():
        raise RetrievedHistoriesError(f"{ids_path}: missing (listed by {SIDECAR_FILE})")
    sample_ids = np.load(ids_path)
    if sample_ids.dtype != np.int64 or sample_ids.ndim != 1 or len(sample_ids) != meta["n_samples"]:
        raise RetrievedHistoriesError(
            f"{ids_path}: {sample_ids.dtype} {sample_ids.shape}, expected int64 [{meta['n_samples']}]"
        )
    rows = {}
    for k, info in meta["outputs"].items():
        path = folder / info["file"]
        if not path.is_file():
            raise RetrievedHistoriesError(f"{path}: missing (listed by {SIDECAR_FILE})")
        arr = np.load(path, mmap_mode="r")
        if arr.dtype != np.int32 or arr.shape != (len(sample_ids), int(k)):
            raise RetrievedHistoriesError(
                f"{path}: {arr.dtype} {arr.shape}, expected int32 {[len(sample_ids), int(k)]}"
            )
        rows[int(k)] = arr
    return RetrievedHistories(sample_ids=sample_ids, rows=rows, meta=meta, path=folder)
