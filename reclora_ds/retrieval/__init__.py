"""Item embeddings -> PCA -> FAISS index (``index``), and the Long-Short Modality Retriever (``retriever``)."""

from reclora_ds.data.histories import RetrievedHistories, load_retrieved
from reclora_ds.retrieval.index import (
    PCA,
    ItemEmbeddings,
    LoadedIndex,
    RetrievalInputError,
    build_index,
    fit_pca,
    load_index,
    load_item_embeddings,
    raw_item_ids,
    recall_at_k,
    save_index,
    to_index_space,
)
from reclora_ds.retrieval.retriever import (
    K_LONG,
    K_SHORT,
    retrieve_histories,
    retrieve_rows,
)

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
