"""Build the item FAISS index: embeddings -> PCA -> unit vectors -> index directory with a checked sidecar.

    python -m reclora_ds.commands.build_faiss_index --embeddings runs/ml25m/emb --out runs/ml25m/index \
        [--processed runs/ml25m/data] [--kind hnsw|flat|ivf] [--pca-components 512] [--param M=48] [--gpu]

Writes ``index.faiss``, ``pca.npz`` and ``index.json`` (see ``reclora_ds/retrieval/index.py``). For an
approximate kind it also measures recall@60 against an exact index on a sample of the items and records it.
Exit status 2 with an ``error:`` line when an input is missing or does not match.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from reclora_ds.config import check_output_location, report_user_error, run_command
from reclora_ds.files import sha256_file
from reclora_ds.retrieval.errors import RetrievalInputError
from reclora_ds.retrieval.index import (
    DEFAULT_INDEX_KIND,
    INDEX_KINDS,
    build_index,
    load_item_embeddings,
    make_sidecar,
    recall_at_k,
    save_index,
)
from reclora_ds.retrieval.index_space import DEFAULT_PCA_COMPONENTS, fit_pca, to_index_space

RECALL_K = 60


def _param(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{key}: expected an integer, got {value!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embeddings", required=True, help="directory with embeddings.npy + embeddings.json")
    ap.add_argument("--out", required=True, help="index directory to write")
    ap.add_argument(
        "--processed", help="processed dataset the embeddings belong to (default: embeddings.json's)"
    )
    ap.add_argument("--kind", choices=INDEX_KINDS, default=DEFAULT_INDEX_KIND)
    ap.add_argument("--metric", choices=("ip", "l2"), default="ip")
    ap.add_argument("--pca-components", type=int, default=DEFAULT_PCA_COMPONENTS)
    ap.add_argument(
        "--param", type=_param, action="append", default=[], help="index parameter, e.g. M=48, nprobe=64"
    )
    ap.add_argument("--gpu", action="store_true", help="build flat/ivf on GPU when FAISS sees one")
    ap.add_argument("--recall-queries", type=int, default=1000, help="items used to measure recall (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def item_map_of(processed: str | Path, n_items: int) -> dict:
    """Check the embeddings' row count against the dataset's items; describe the id map for the sidecar."""
    from reclora_ds.data.processed import ProcessedDataset

    ds = ProcessedDataset(processed)
    if ds.items.num_rows != n_items:
        raise RetrievalInputError(
            f"embeddings have {n_items} rows but {ds.path} has {ds.items.num_rows} items "
            "(row i must be item_index i of items.parquet: embeddings of another dataset or config?)"
        )
    items = Path(ds.path) / "items.parquet"
    return {
        "rule": "FAISS id i = embeddings row i = item_index i of items.parquet; raw id = items.parquet 'item' at row i",
        "items_parquet": str(items),
        "items_sha256": sha256_file(items),
    }


def run(args: argparse.Namespace) -> str:
    t_start = time.perf_counter()
    emb = load_item_embeddings(args.embeddings)
    processed = args.processed
    if processed is None and (Path(str(emb.meta["dataset"])) / "metadata.json").is_file():
        processed = emb.meta["dataset"]  # the dataset the extractor read
    item_map = item_map_of(processed, emb.vectors.shape[0]) if processed else None
    t0 = time.perf_counter()
    pca = fit_pca(emb.vectors, args.pca_components)
    vectors = to_index_space(pca, emb.vectors)
    t_pca = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = build_index(vectors, kind=args.kind, metric=args.metric, use_gpu=args.gpu, **dict(args.param))
    t_build = time.perf_counter() - t0
    extra = {}
    if args.kind != "flat" and args.recall_queries > 0:
        flat = build_index(vectors, kind="flat", metric=args.metric)
        rng = np.random.default_rng(args.seed)
        queries = vectors[
            rng.choice(len(vectors), size=min(args.recall_queries, len(vectors)), replace=False)
        ]
        k = min(RECALL_K, len(vectors))
        extra["recall"] = {
            f"recall@{k}": recall_at_k(index, flat, queries, k),
            "queries": len(queries),
            "seed": args.seed,
        }
    sidecar = make_sidecar(index, pca, emb.meta, metric=args.metric, item_map=item_map, extra=extra)
    out = save_index(args.out, index, pca, sidecar)
    lines = [
        f"built {sidecar['kind']} index ({sidecar['metric']}) -> {out}",
        f"  items {sidecar['count']:,}  embeddings {emb.vectors.shape[1]}-d ({emb.meta['backbone']})  "
        f"PCA -> {pca.n_components} components, explained variance {sidecar['pca']['explained_variance_ratio_sum']:.4f}",
        f"  params {sidecar['params']}",
    ]
    if "recall" in extra:
        r = extra["recall"]
        name = next(k for k in r if k.startswith("recall@"))
        lines.append(f"  {name} vs exact: {r[name]:.4f} on {r['queries']} item queries")
    lines.append(
        f"  time: pca {t_pca:.1f}s, build {t_build:.1f}s, total {time.perf_counter() - t_start:.1f}s"
    )
    return "\n".join(lines)


# Files one of which every earlier output folder of this command holds (it may be reused or replaced).
OUTPUT_MARKERS = ("index.json", "index.faiss")


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_output_location(args.out, "--out", OUTPUT_MARKERS, source="--out")  # before any heavy work
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(run(args))
    except (RetrievalInputError, FileNotFoundError, ValueError) as exc:
        report_user_error(exc)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user's mistake prints ``error: <file/key>: <reason>`` and returns 2 (no traceback)."""
    return run_command(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
