"""Item embeddings -> PCA (``index_space``) -> FAISS index (``index``), and the Long-Short Modality Retriever
(``engine`` on arrays, ``retriever`` on a processed dataset)."""

from reclora_ds.data.histories import RetrievedHistories, load_retrieved
from reclora_ds.retrieval.engine import K_LONG, K_SHORT, retrieve_rows
from reclora_ds.retrieval.errors import RetrievalInputError
from reclora_ds.retrieval.index import (
    ItemEmbeddings,
    LoadedIndex,
    build_index,
    load_index,
    load_item_embeddings,
    raw_item_ids,
    recall_at_k,
    save_index,
)
from reclora_ds.retrieval.index_space import PCA, fit_pca, to_index_space
from reclora_ds.retrieval.retriever import retrieve_histories

__all__ = [
    "K_LONG",
    "K_SHORT",
    "PCA",
    "ItemEmbeddings",
    "LoadedIndex",
    "RetrievalInputError",
    "RetrievedHistories",
    "build_index",
    "fit_pca",
    "load_index",
    "load_item_embeddings",
    "load_retrieved",
    "raw_item_ids",
    "recall_at_k",
    "retrieve_histories",
    "retrieve_rows",
    "save_index",
    "to_index_space",
]
