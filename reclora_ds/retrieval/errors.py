"""The error of the retrieval layer's inputs."""

from __future__ import annotations


class RetrievalInputError(ValueError):
    """An embeddings, index or retrieval directory is missing, incomplete, or belongs to other inputs."""
