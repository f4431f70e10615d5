"""A FAISS item index for retrieval tests, built from genre-clustered embeddings of a processed dataset.

Real retrieval needs LLM embeddings; tests use vectors with the same structure (items of one genre close
together, optionally some exact duplicates, which put real ties on the top-K boundary) written through the
real embeddings-folder format, so the index and retrieval code paths are the production ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.retrieval.index import (
    build_index,
    load_item_embeddings,
    make_sidecar,
    save_index,
    write_item_embeddings,
)
from reclora_ds.retrieval.index_space import fit_pca, to_index_space


def build_item_index(
    data: Path, root: Path, *, dim: int, components: int, noise: float, duplicates: float = 0.0, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``root/emb`` (embeddings folder) and ``root/index`` (flat index, ``components`` PCA dims).

    Item i's vector is its genre's centre plus ``noise`` x N(0, 1); a ``duplicates`` fraction of the items
    get their genre's centre exactly. Returns ``(emb_dir, index_dir)``.
    """
    genre = ProcessedDataset(data).items.column("genre_id").to_numpy()
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((genre.max() + 1, dim))
    x = centers[genre] + noise * rng.standard_normal((len(genre), dim))
    same_text = rng.random(len(genre)) < duplicates  # items whose description is their genre's: ties
    x[same_text] = centers[genre[same_text]]
    emb_dir = root / "emb"
    write_item_embeddings(
        emb_dir, x.astype(np.float32), np.arange(len(x)), {"backbone": "test", "dataset": str(data)}
    )
    emb = load_item_embeddings(emb_dir, expected_n_items=len(x))
    pca = fit_pca(emb.vectors, components)
    index = build_index(to_index_space(pca, emb.vectors), "flat")
    save_index(root / "index", index, pca, make_sidecar(index, pca, emb.meta))
    return emb_dir, root / "index"
