"""Long-Short Modality Retriever (paper §3.4) over a processed dataset: every sample's histories, on disk.

The rows come from the array-level engine (:func:`reclora_ds.retrieval.engine.retrieve_rows`, which says how
they are chosen). Output: **timeline row indices** (rows of ``timelines.parquet``, so both the item and the
rating of each behaviour can be looked up), int32 ``[n_samples, K]``, valid rows first and oldest first,
padded with -1 when the history is shorter than K, in the retrieval folder format of
:mod:`reclora_ds.data.histories` (``sample_ids.npy``, ``rows_k<K>.npy`` per K, ``retrieval.json`` written
last, listing every file's size and sha256), by default ``<processed>/retrieved/<mode>/``, written whole
(temporary sibling folder + rename: old or new, never a mix). Every reader opens it with
:func:`reclora_ds.data.histories.load_retrieved`; :func:`check_retrieval_folder` checks the file list.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reclora_ds import __version__
from reclora_ds.data.histories import (
    FORMAT,
    FORMAT_VERSION,
    SAMPLE_IDS_FILE,
    SIDECAR_FILE,
    read_retrieval_sidecar,
    rows_file,
)
from reclora_ds.data.processed import metadata_sha256
from reclora_ds.files import listing, write_sidecar
from reclora_ds.retrieval.engine import DEFAULT_KS, EngineStats, check_ks, retrieve_rows
from reclora_ds.retrieval.errors import RetrievalInputError
from reclora_ds.retrieval.index import LoadedIndex, load_index
from reclora_ds.retrieval.index_space import on_score_grid
from reclora_ds.retrieval.outputs import check_listing, refuse_foreign, replace_output

log = logging.getLogger(__name__)

SAMPLE_SPLITS = ("train", "valid", "test")  # fewshot is a subset of train
_COUNT_CHUNK = 1 << 20  # rows per chunk when counting the kept rows of a written array


@dataclass
class SampleIndex:
    """Every sample of train/valid/test, sorted by ``sample_id``."""

    sample_id: np.ndarray  # int64 [S]
    user_index: np.ndarray  # int32 [S]
    item_index: np.ndarray  # int32 [S]
    hist_len: np.ndarray  # int32 [S]


def read_samples(ds) -> SampleIndex:
    """All samples of a :class:`~reclora_ds.data.processed.ProcessedDataset`, checked against its timelines."""
    cols = ["sample_id", "user_index", "item_index", "hist_len"]
    parts = [ds.read_split(s, columns=cols) for s in SAMPLE_SPLITS]
    arrays = {c: np.concatenate([t.column(c).to_numpy() for t in parts]) for c in cols}
    order = np.argsort(arrays["sample_id"], kind="stable")
    s = SampleIndex(**{c: arrays[c][order] for c in cols})
    tl = ds.timelines
    own_row = tl.offsets[s.user_index] + s.hist_len
    if (s.hist_len >= np.diff(tl.offsets)[s.user_index]).any() or not np.array_equal(
        tl.item_index[own_row], s.item_index
    ):
        raise RetrievalInputError(
            f"{ds.path}: samples and timelines disagree (a sample's own timeline row holds another item); "
            "re-run prepare"
        )
    return s


@dataclass
class RetrievalResult:
    out_dir: Path
    meta: dict[str, Any]

    def summary(self) -> str:
        m = self.meta
        lines = [
            f"retrieved histories ({m['mode']}) for {m['n_samples']:,} samples -> {self.out_dir}",
        ]
        for k, info in m["outputs"].items():
            lines.append(
                f"  K={k:>3}: {info['file']}  mean kept {info['mean_valid']:.2f}  full {info['full_fraction']:.4f}"
            )
        st = m["engine"]
        lines.append(
            f"  scored samples {st['scored_samples']:,}  pairs {st['pairs']:,}  computed {st['computed']:,}  "
            f"tie rows {st['tie_rows']:,}  groups {st['groups']:,}"
        )
        lines.append(
            "  time: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in st["seconds"].items())
            + f"; total {m['timings_s']['total']:.1f}s; peak RSS {m['timings_s']['peak_rss_mib']:.0f} MiB"
        )
        return "\n".join(lines)


def check_retrieval_folder(folder: str | Path, verify_sha256: bool = False) -> dict[str, Any]:
    """The sidecar of a retrieval folder, after checking the folder against its ``files`` list.

    Every listed file present with its size (and, with ``verify_sha256``, its checksum), nothing else in the
    folder; the sidecar's format, version and keys (:func:`reclora_ds.data.histories.read_retrieval_sidecar`).
    Raises :class:`RetrievalInputError` naming the folder and each difference.
    """
    folder = Path(folder)
    try:
        meta = read_retrieval_sidecar(folder)
    except ValueError as exc:
        raise RetrievalInputError(str(exc)) from exc
    listed = meta.get("files")
    check_listing(
        folder,
        listed,
        SIDECAR_FILE,
        verify_sha256=list(listed) if verify_sha256 and isinstance(listed, dict) else (),
    )
    expected = {SAMPLE_IDS_FILE, *(info["file"] for info in meta["outputs"].values())}
    if set(listed) != expected:
        raise RetrievalInputError(
            f"{folder / SIDECAR_FILE}: lists {sorted(listed)} but its outputs need {sorted(expected)}"
        )
    return meta


def _allocated_memmap(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """An int32 ``.npy`` memory map whose blocks are allocated up front (``posix_fallocate``).

    A store into a sparse memory-mapped page that the file system cannot back kills the process with
    SIGBUS (no exception, no message); allocating first turns a full disk into an ``ENOSPC`` ``OSError``
    here, which :func:`reclora_ds.files.atomic_dir` reports as ``DiskFullError``.
    """
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=shape)
    with open(path, "r+b") as stream:
        try:
            os.posix_fallocate(stream.fileno(), 0, os.fstat(stream.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate
                del array
                raise
    return array


def default_out_dir(processed: str | Path, mode: str) -> Path:
    return Path(processed) / "retrieved" / mode


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def retrieve_histories(
    processed: str | Path,
    index: str | Path | LoadedIndex | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    mode: str = "similarity",
    out_dir: str | Path | None = None,
    **engine,
) -> RetrievalResult:
    """Retrieve histories for every sample of a processed dataset and write them beside it.

    ``index`` (a directory or a :class:`LoadedIndex`) supplies the vectors in ``similarity`` mode; its
    count must equal the dataset's item count. The folder is written whole: into a temporary sibling,
    ``retrieval.json`` last (with ``files``: every file's size and sha256), then renamed over ``out_dir``
    (:func:`reclora_ds.retrieval.outputs.replace_output`), so a kill or a full disk leaves the previous
    retrieval as it was. A non-empty ``out_dir`` without ``retrieval.json`` is refused before any work.
    """
    from reclora_ds.data.processed import ProcessedDataset

    ks = check_ks(ks)
    t_start = time.perf_counter()
    ds = ProcessedDataset(processed)
    out = Path(out_dir) if out_dir else default_out_dir(ds.path, mode)
    vectors, index_info = None, None
    if mode == "similarity":
        if index is None:
            raise RetrievalInputError("mode 'similarity' needs --index (a FAISS index directory)")
        loaded = index if isinstance(index, LoadedIndex) else load_index(index)
        n_items = ds.items.num_rows
        if loaded.sidecar["count"] != n_items:
            raise RetrievalInputError(
                f"index {loaded.path} holds {loaded.sidecar['count']} items but {ds.path} has {n_items}: "
                "it was built from another dataset's embeddings"
            )
        vectors = loaded.vectors()
        if not on_score_grid(vectors):
            log.warning(
                "index vectors are not on the score grid: scores are not exact, ties may be broken unevenly"
            )
        index_info = {
            "path": str(loaded.path),
            "sha256": loaded.sha256,
            "embeddings_sha256": loaded.embeddings_sha256,
            "kind": loaded.sidecar["kind"],
        }
    refuse_foreign(out, SIDECAR_FILE)  # before the heavy work: the folder is replaced whole
    samples = read_samples(ds)
    tl = ds.timelines
    n = len(samples.sample_id)

    files = {k: rows_file(k) for k in ks}
    stats = EngineStats()
    with replace_output(out, SIDECAR_FILE) as tmp:  # the old folder stays as it was until the final rename
        arrays = {k: _allocated_memmap(tmp / name, (n, k)) for k, name in files.items()}
        retrieve_rows(
            tl.item_index, tl.offsets, samples.user_index, samples.hist_len, vectors, ks, mode,
            out=arrays, stats=stats, **engine,
        )  # fmt: skip
        outputs = {}
        for k, arr in arrays.items():
            arr.flush()
            n_valid = np.zeros(n, dtype=np.int64)
            for s in range(0, n, _COUNT_CHUNK):
                n_valid[s : s + _COUNT_CHUNK] = (arr[s : s + _COUNT_CHUNK] >= 0).sum(axis=1)
            outputs[str(k)] = {
                "file": files[k],
                "shape": [n, k],
                "mean_valid": float(n_valid.mean()) if n else 0.0,
                "full_fraction": float((n_valid == k).mean()) if n else 0.0,
            }
            del arr
        arrays.clear()
        np.save(tmp / SAMPLE_IDS_FILE, samples.sample_id)
        meta = {
            "reclora_ds_version": __version__,
            "mode": mode,
            "ks": list(ks),
            "n_samples": n,
            "row_space": "rows of timelines.parquet (user-major); valid rows first, oldest first, -1 padding",
            "ties": "equal cosine: the more recent row wins",
            "outputs": outputs,
            "index": index_info,
            "dataset": {
                "path": str(ds.path),
                "metadata_sha256": metadata_sha256(ds.path),
                "config": ds.metadata.get("config"),
                "counts": ds.metadata.get("counts"),
            },
            "engine": stats.as_dict(),
            "files": listing(tmp, [SAMPLE_IDS_FILE, *files.values()]),
            "timings_s": {"total": time.perf_counter() - t_start, "peak_rss_mib": _peak_rss_mib()},
        }
        write_sidecar(tmp / SIDECAR_FILE, FORMAT, FORMAT_VERSION, meta)  # last
    check_retrieval_folder(out)
    return RetrievalResult(out, read_retrieval_sidecar(out))
