"""FAISS index over the index-space item vectors, saved with a checked sidecar; the item-embeddings reader.

Pipeline::

    emb = load_item_embeddings("runs/ml25m/emb")             # float32 [n_items, d], checksum-verified
    pca = fit_pca(emb.vectors, n_components=512)             # mean, components, explained variance
    vecs = to_index_space(pca, emb.vectors)                  # PCA -> L2-normalise -> snap to the 2^-12 grid
    index = build_index(vecs, kind="hnsw")                   # inner product = cosine
    save_index("runs/ml25m/index", index, pca, make_sidecar(index, pca, emb.meta))
    loaded = load_index("runs/ml25m/index", expected_embeddings_sha256=emb.sha256)

(``fit_pca`` and ``to_index_space``: :mod:`reclora_ds.retrieval.index_space`, which also says why the
scores are exact.)

Ids: FAISS id ``i`` is row ``i`` of ``embeddings.npy`` is the item with dense ``item_index == i`` in the
processed dataset's ``items.parquet`` (0-based). The raw item id (a MovieLens movieId) is
``items.parquet["item"][i]``: :func:`raw_item_ids` does that lookup, never ``i + 1``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from reclora_ds import __version__
from reclora_ds.files import link_or_copy, listing, sha256_file, write_json_atomic, write_text_atomic
from reclora_ds.retrieval.errors import RetrievalInputError
from reclora_ds.retrieval.index_space import PCA, SCORE_GRID_BITS
from reclora_ds.retrieval.outputs import check_listing, replace_output

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw", "ivf")
DEFAULT_INDEX_KIND = "hnsw"
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
HNSW_DEFAULTS = {"M": 32, "ef_search": 128, "ef_construction": 64}
IVF_DEFAULTS = {"nprobe": 32}  # nlist defaults to ~4 sqrt(n), see default_nlist
IVF_MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per centroid
INDEX_FORMAT_VERSION = 2  # 2: one folder written whole; files lists bytes and sha256
INDEX_SIDECAR = "index.json"
INDEX_FILES = ("index.faiss", "pca.npz")
EMBEDDINGS_REQUIRED_KEYS = ("n_items", "dim", "backbone", "sha256", "dataset")
EMBEDDINGS_FORMAT_VERSION = 2  # 2: one folder written whole; files lists every file with bytes and sha256
EMBEDDINGS_SIDECAR = "embeddings.json"
EMBEDDINGS_FILES = ("embeddings.npy", "item_ids.npy")
SHARDS_DIR = "shards"  # the per-rank shards, moved into the finished folder (a cache for reruns)


# ----------------------------------------------------------------------------------------------------------
# Item embeddings (the extractor's output)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ItemEmbeddings:
    """Validated ``embeddings.npy`` (memory-mapped) and its ``embeddings.json``."""

    vectors: np.ndarray  # float32 [n_items, dim]; row i = item_index i of items.parquet
    meta: dict[str, Any]
    path: Path

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]


def write_item_embeddings(
    directory: str | Path,
    vectors: np.ndarray,
    item_ids: np.ndarray,
    meta: dict[str, Any],
    shard_files: Sequence[Path] = (),
) -> dict[str, Any]:
    """Write an embeddings folder whole: ``embeddings.npy``, ``item_ids.npy``, ``shards/``, ``embeddings.json``.

    Args:
        directory: the folder; replaced as a whole (:func:`reclora_ds.retrieval.outputs.replace_output`), so
            a kill or a full disk leaves the previous folder as it was. A non-empty folder without
            ``embeddings.json`` is refused.
        vectors: float32 [n_items, dim], row i = item_index i.
        item_ids: int64 [n_items], the raw id of each row.
        meta: what the vectors were made from (must hold ``backbone`` and ``dataset``); ``n_items``, ``dim``,
            ``sha256``, ``item_ids_sha256``, ``format_version`` and ``files`` are set here.
        shard_files: files hard-linked (copied across file systems) into ``shards/`` of the new folder and
            listed; the originals are left where they are (the caller removes them once this returns).

    Returns:
        The ``embeddings.json`` written (last, inside the temporary folder, listing every file's size and
        sha256).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if vectors.ndim != 2 or item_ids.shape != (vectors.shape[0],):
        raise ValueError(
            f"vectors [n, d] and item_ids [n] expected, got {vectors.shape} and {item_ids.shape}"
        )
    missing = [k for k in ("backbone", "dataset") if k not in meta]
    if missing:
        raise ValueError(f"embeddings meta lacks {missing}")
    with replace_output(directory, EMBEDDINGS_SIDECAR) as tmp:
        np.save(tmp / "embeddings.npy", vectors)
        np.save(tmp / "item_ids.npy", item_ids)
        names = list(EMBEDDINGS_FILES)
        if shard_files:
            (tmp / SHARDS_DIR).mkdir()
            for f in shard_files:
                link_or_copy(Path(f), tmp / SHARDS_DIR / Path(f).name)
                names.append(f"{SHARDS_DIR}/{Path(f).name}")
        files = listing(tmp, names)
        full = {
            **meta,
            "format_version": EMBEDDINGS_FORMAT_VERSION,
            "n_items": int(vectors.shape[0]),
            "dim": int(vectors.shape[1]),
            "sha256": files["embeddings.npy"]["sha256"],
            "item_ids_sha256": files["item_ids.npy"]["sha256"],
            "files": files,
        }
        write_json_atomic(tmp / EMBEDDINGS_SIDECAR, full)
    return full


def load_item_embeddings(directory: str | Path, expected_n_items: int | None = None) -> ItemEmbeddings:
    """Read and validate an embeddings directory (``embeddings.npy`` + ``embeddings.json``).

    Checks: both files exist; the JSON has ``n_items, dim, backbone, sha256, dataset`` and a format version
    this reader knows; the folder holds exactly the files ``embeddings.json`` lists, with their sizes (format
    2: ``files``; the ``shards/`` cache may be deleted as a whole but not in part; format 1, written before the
    folder was written whole: ``embeddings.npy``, ``item_ids.npy`` when it has ``item_ids_sha256``, and the
    ``shards/`` cache); the sha256 of ``embeddings.npy`` (the whole file) and of ``item_ids.npy``; the array
    is float32, 2-D, ``[n_items, dim]`` and finite; and ``n_items == expected_n_items`` when given (the
    processed dataset's item count). Raises :class:`RetrievalInputError` naming the folder and the difference.
    """
    d = Path(directory)
    npy, meta_path = d / "embeddings.npy", d / EMBEDDINGS_SIDECAR
    for f in (npy, meta_path):
        if not f.is_file():
            raise RetrievalInputError(
                f"{f}: missing; an embeddings directory holds embeddings.npy and embeddings.json"
            )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise RetrievalInputError(f"{meta_path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise RetrievalInputError(f"{meta_path}: not a JSON object")
    missing = [k for k in EMBEDDINGS_REQUIRED_KEYS if k not in meta]
    if missing:
        raise RetrievalInputError(
            f"{meta_path}: missing keys {missing} (needs {list(EMBEDDINGS_REQUIRED_KEYS)})"
        )
    version = meta.get("format_version", 1)  # hand-made folders of format 1 carry no version
    if version == EMBEDDINGS_FORMAT_VERSION:
        files = meta.get("files")
        if isinstance(files, dict) and (files.get("embeddings.npy") or {}).get("sha256") != meta["sha256"]:
            raise RetrievalInputError(
                f"{meta_path}: its sha256 and its files list disagree on embeddings.npy"
            )
        check_listing(
            d, files, EMBEDDINGS_SIDECAR, verify_sha256=("item_ids.npy",), optional_dirs=(SHARDS_DIR,)
        )
    elif version == 1:
        legacy = {"embeddings.npy": {"bytes": npy.stat().st_size}}
        if "item_ids_sha256" in meta:
            legacy["item_ids.npy"] = {"bytes": _size(d / "item_ids.npy"), "sha256": meta["item_ids_sha256"]}
        shards = d / SHARDS_DIR
        for f in sorted(shards.rglob("*")) if shards.is_dir() else []:  # format 1 kept the cache here
            if f.is_file():
                legacy[f.relative_to(d).as_posix()] = {"bytes": f.stat().st_size}
        check_listing(d, legacy, EMBEDDINGS_SIDECAR, verify_sha256=("item_ids.npy",))
    else:
        raise RetrievalInputError(
            f"{meta_path}: format_version {version!r}, this reclora_ds reads 1 and {EMBEDDINGS_FORMAT_VERSION} "
            "(written by another version: extract the embeddings again)"
        )
    actual = sha256_file(npy)
    if actual != meta["sha256"]:
        raise RetrievalInputError(
            f"{npy}: sha256 {actual} does not match {meta_path.name}'s {meta['sha256']} "
            "(the file changed after extraction, or was truncated)"
        )
    try:
        vectors = np.load(npy, mmap_mode="r")
    except ValueError as exc:
        raise RetrievalInputError(f"{npy}: not a readable .npy array ({exc})") from exc
    if vectors.dtype != np.float32 or vectors.ndim != 2:
        raise RetrievalInputError(f"{npy}: expected a 2-D float32 array, got {vectors.dtype} {vectors.shape}")
    if vectors.shape != (meta["n_items"], meta["dim"]):
        raise RetrievalInputError(
            f"{npy}: shape {vectors.shape} but {meta_path.name} says n_items={meta['n_items']}, dim={meta['dim']}"
        )
    ids_path = d / "item_ids.npy"
    if ids_path.is_file():
        ids = np.load(ids_path, mmap_mode="r")
        if ids.shape != (vectors.shape[0],):
            raise RetrievalInputError(
                f"{ids_path}: shape {ids.shape}, embeddings.npy has {vectors.shape[0]} rows"
            )
    if expected_n_items is not None and vectors.shape[0] != expected_n_items:
        raise RetrievalInputError(
            f"{npy}: {vectors.shape[0]} rows but the processed dataset has {expected_n_items} items "
            "(row i must be item_index i of items.parquet: embeddings of another dataset or config?)"
        )
    for start in range(0, vectors.shape[0], 1 << 16):
        block = np.asarray(vectors[start : start + (1 << 16)])
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise RetrievalInputError(f"{npy}: row {bad} (item_index {bad}) has NaN or inf values")
    return ItemEmbeddings(vectors=vectors, meta=meta, path=d)


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


# ----------------------------------------------------------------------------------------------------------
# FAISS indexes
# ----------------------------------------------------------------------------------------------------------


def default_nlist(n: int) -> int:
    """About ``4 sqrt(n)`` inverted lists, but at least 39 training points per list."""
    return int(max(1, min(round(4 * np.sqrt(n)), n // IVF_MIN_POINTS_PER_LIST)))


def gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _is_gpu_index(index: faiss.Index) -> bool:
    return type(index).__name__.startswith("Gpu")


def build_index(
    vectors: np.ndarray, kind: str = DEFAULT_INDEX_KIND, metric: str = "ip", use_gpu: bool = False, **params
) -> faiss.Index:
    """A FAISS index over ``vectors`` (float32 [n, d]); FAISS id ``i`` = row ``i``.

    kind: ``flat`` (exact), ``hnsw`` (``M=32, ef_search=128, ef_construction=64``), ``ivf`` (IVF-Flat,
    ``nlist`` ~ 4 sqrt(n), ``nprobe=32``). metric: ``ip`` (cosine on unit vectors) or ``l2``.
    ``use_gpu`` builds flat/ivf on GPU 0 when FAISS sees a GPU (HNSW is CPU-only; a request without a GPU
    logs a warning and builds on CPU). Unknown ``params`` are errors.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"build_index needs a non-empty [n, d] array, got {x.shape}")
    n, d = x.shape
    allowed = {"flat": {}, "hnsw": HNSW_DEFAULTS, "ivf": {**IVF_DEFAULTS, "nlist": None}}[kind]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {kind} index parameters {unknown}; valid: {sorted(allowed)}")
    p = {**allowed, **params}
    m = METRICS[metric]
    gpu = use_gpu and kind in ("flat", "ivf") and gpu_available()
    if use_gpu and not gpu:
        log.warning(
            "GPU index requested but %s; building on CPU",
            "HNSW is CPU-only" if kind == "hnsw" else "FAISS sees no GPU",
        )

    if kind == "flat":
        index = faiss.IndexFlat(d, m)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(p["M"]), m)
        index.hnsw.efConstruction = int(p["ef_construction"])
        index.hnsw.efSearch = int(p["ef_search"])
    else:
        nlist = int(p["nlist"] or default_nlist(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlat(d, m), d, nlist, m)
        index.nprobe = min(int(p["nprobe"]), nlist)
    if gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index.referenced_objects = [res]  # keep the resources alive as long as the index
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return index


def index_params(index: faiss.Index) -> dict[str, Any]:
    """The search-time parameters of an index, for the sidecar."""
    if isinstance(index, faiss.IndexHNSW):
        return {
            "M": int(index.hnsw.nb_neighbors(1)),
            "ef_search": int(index.hnsw.efSearch),
            "ef_construction": int(index.hnsw.efConstruction),
        }
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return {"nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe)}
    return {}


def index_kind(index: faiss.Index) -> str:
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if faiss.try_extract_index_ivf(index) is not None:
        return "ivf"
    return "flat"


def index_vectors(index: faiss.Index) -> np.ndarray:
    """All stored vectors, float32 [ntotal, d], row i = FAISS id i (flat, HNSW-Flat or IVF-Flat storage)."""
    if _is_gpu_index(index):
        index = faiss.index_gpu_to_cpu(index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.direct_map.no():
        ivf.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def recall_at_k(approx_index: faiss.Index, flat_index: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-``k`` (from ``flat_index``) that ``approx_index`` also returns."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    _, approx = approx_index.search(q, k)
    _, exact = flat_index.search(q, k)
    hits = 0
    for s in range(0, len(q), 1024):  # [B, k, k] comparison, bounded
        a, e = approx[s : s + 1024], exact[s : s + 1024]
        hits += int(((a[:, :, None] == e[:, None, :]) & (e[:, None, :] >= 0)).any(axis=2).sum())
    valid = int((exact >= 0).sum())
    return hits / valid if valid else 1.0


def raw_item_ids(items_table, ids: np.ndarray) -> np.ndarray:
    """FAISS ids (= item_index) -> raw item ids through ``items.parquet`` (never ``id + 1``); -1 stays -1."""
    item_index = items_table.column("item_index").to_numpy()
    if not np.array_equal(item_index, np.arange(len(item_index))):
        raise RetrievalInputError("items.parquet rows are not in item_index order 0..n-1")
    raw = items_table.column("item").to_numpy()
    ids = np.asarray(ids)
    if ids.size and ids.max() >= len(raw):
        raise RetrievalInputError(f"id {int(ids.max())} out of range for {len(raw)} items")
    return np.where(ids >= 0, raw[np.maximum(ids, 0)], -1)


# ----------------------------------------------------------------------------------------------------------
# Save / load with a sidecar
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LoadedIndex:
    index: faiss.Index
    pca: PCA
    sidecar: dict[str, Any]
    path: Path

    @property
    def sha256(self) -> str:
        """Checksum of ``index.faiss`` (what a retrieval run records)."""
        return self.sidecar["files"]["index.faiss"]["sha256"]

    @property
    def embeddings_sha256(self) -> str:
        return self.sidecar["embeddings"]["sha256"]

    def vectors(self) -> np.ndarray:
        """The index-space vectors the index holds, float32 [count, dimension]."""
        return index_vectors(self.index)


def make_sidecar(
    index: faiss.Index,
    pca: PCA,
    embeddings_meta: dict[str, Any],
    metric: str = "ip",
    item_map: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``index.json`` content (``save_index`` adds the file checksums)."""
    return {
        "format_version": INDEX_FORMAT_VERSION,
        "reclora_ds_version": __version__,
        "kind": index_kind(index),
        "metric": metric,
        "dimension": int(index.d),
        "count": int(index.ntotal),
        "params": index_params(index),
        "score_grid_bits": SCORE_GRID_BITS,
        "pca": {
            "n_components": pca.n_components,
            "input_dim": pca.input_dim,
            "explained_variance_ratio_sum": float(pca.explained_variance_ratio.sum()),
        },
        "embeddings": {
            k: embeddings_meta.get(k) for k in ("sha256", "backbone", "dataset", "n_items", "dim")
        },
        "item_map": item_map
        or {
            "rule": "FAISS id i = embeddings row i = item_index i of items.parquet; raw id = items.parquet 'item' at row i",
            "dataset": embeddings_meta.get("dataset"),
        },
        **(extra or {}),
    }


def save_index(directory: str | Path, index: faiss.Index, pca: PCA, sidecar: dict[str, Any]) -> Path:
    """Write ``index.faiss``, ``pca.npz`` and ``index.json`` as one folder that replaces ``directory`` whole.

    The three files are written into a temporary sibling folder, ``index.json`` last with the size and
    sha256 of the other two (``files``), and the folder is renamed into place
    (:func:`reclora_ds.retrieval.outputs.replace_output`): a kill or a full disk leaves the previous index
    as it was. An existing folder without ``index.json`` is refused (not this stage's output).
    """
    d = Path(directory)
    cpu = faiss.index_gpu_to_cpu(index) if _is_gpu_index(index) else index
    if sidecar["count"] != cpu.ntotal or sidecar["dimension"] != cpu.d:
        raise ValueError(
            f"sidecar says {sidecar['count']} x {sidecar['dimension']}, index has {cpu.ntotal} x {cpu.d}"
        )
    with replace_output(d, INDEX_SIDECAR) as tmp:
        faiss.write_index(cpu, str(tmp / "index.faiss"))
        pca.save(tmp / "pca.npz")
        files = listing(tmp, INDEX_FILES)
        write_text_atomic(
            tmp / INDEX_SIDECAR,
            json.dumps({**sidecar, "format_version": INDEX_FORMAT_VERSION, "files": files}, indent=2),
        )
    return d


def load_index(directory: str | Path, expected_embeddings_sha256: str | None = None) -> LoadedIndex:
    """Read an index directory and check it against its sidecar (and the embeddings it must come from)."""
    d = Path(directory)
    side_path = d / "index.json"
    if not side_path.is_file():
        raise RetrievalInputError(f"{side_path}: missing; build the index with tools/build_faiss_index.py")
    try:
        sidecar = json.loads(side_path.read_text())
    except json.JSONDecodeError as exc:
        raise RetrievalInputError(f"{side_path}: not valid JSON ({exc})") from exc
    if not isinstance(sidecar, dict) or sidecar.get("format_version") != INDEX_FORMAT_VERSION:
        raise RetrievalInputError(
            f"{side_path}: format_version {sidecar.get('format_version') if isinstance(sidecar, dict) else None}, "
            f"this reclora_ds reads {INDEX_FORMAT_VERSION} (written by another version: build the index again)"
        )
    if (
        expected_embeddings_sha256 is not None
        and sidecar["embeddings"]["sha256"] != expected_embeddings_sha256
    ):
        raise RetrievalInputError(
            f"{d}: index built from embeddings sha256 {sidecar['embeddings']['sha256']}, "
            f"but the expected embeddings have sha256 {expected_embeddings_sha256}; rebuild the index"
        )
    check_listing(d, sidecar.get("files"), INDEX_SIDECAR, verify_sha256=INDEX_FILES)
    index = faiss.read_index(str(d / "index.faiss"))
    pca = PCA.load(d / "pca.npz")
    problems = []
    if index.ntotal != sidecar["count"]:
        problems.append(f"index holds {index.ntotal} vectors, sidecar count {sidecar['count']}")
    if index.d != sidecar["dimension"]:
        problems.append(f"index dimension {index.d}, sidecar {sidecar['dimension']}")
    if pca.n_components != index.d:
        problems.append(f"pca.npz has {pca.n_components} components, index dimension {index.d}")
    if pca.input_dim != sidecar["pca"]["input_dim"]:
        problems.append(f"pca.npz input dim {pca.input_dim}, sidecar {sidecar['pca']['input_dim']}")
    if problems:
        raise RetrievalInputError(f"{d}: " + "; ".join(problems))
    if index_kind(index) == "hnsw" and "ef_search" in sidecar["params"]:
        index.hnsw.efSearch = int(sidecar["params"]["ef_search"])
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and "nprobe" in sidecar["params"]:
        ivf.nprobe = int(sidecar["params"]["nprobe"])
    return LoadedIndex(index=index, pca=pca, sidecar=sidecar, path=d)
