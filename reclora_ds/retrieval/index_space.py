"""The index space: item embeddings -> PCA -> unit vectors on an exact grid (paper §3.4: PCA "for dimension
reduction and denoising", then cosine similarity).

Exact scores: the unit vectors are rounded onto multiples of ``2**-SCORE_GRID_BITS`` with every norm
``<= 1``. Each product of two coordinates is then a multiple of ``2**-24`` and every partial sum of a dot
product has magnitude ``<= 1`` (Cauchy-Schwarz), so float32 represents it exactly: a dot product computed in
any order, blocking, thread count or device (BLAS, FAISS, torch, a Python loop) gives the same bits. Ties
are therefore real ties (identical items), which the retriever breaks by recency. The rounding moves a
cosine by about 1e-4. (TF32 matmuls would break exactness: they keep 10 mantissa bits, the grid needs 13.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reclora_ds.files import atomic_file
from reclora_ds.retrieval.errors import RetrievalInputError

log = logging.getLogger(__name__)

DEFAULT_PCA_COMPONENTS = 512  # the authors' code
SCORE_GRID_BITS = 12


@dataclass
class PCA:
    """A fitted PCA: ``transform(x) = (x - mean) @ components.T``.

    Fitted from the float64 covariance by a symmetric eigendecomposition; each component's sign is fixed
    so that its largest-magnitude coordinate is positive, so refits give the same basis.
    """

    mean: np.ndarray  # float64 [d_in]
    components: np.ndarray  # float64 [k, d_in], rows = principal axes, by decreasing variance
    explained_variance: np.ndarray  # float64 [k]
    total_variance: float

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return (
            self.explained_variance / self.total_variance
            if self.total_variance > 0
            else self.explained_variance * 0
        )

    def transform(self, x: np.ndarray, block_rows: int = 1 << 15) -> np.ndarray:
        """Project rows of ``x`` [n, d_in] -> float64 [n, k] (blocked to bound memory)."""
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise RetrievalInputError(f"PCA expects [n, {self.input_dim}] inputs, got {x.shape}")
        out = np.empty((x.shape[0], self.n_components), dtype=np.float64)
        for s in range(0, x.shape[0], block_rows):
            out[s : s + block_rows] = (
                np.asarray(x[s : s + block_rows], dtype=np.float64) - self.mean
            ) @ self.components.T
        return out

    def save(self, path: Path) -> None:
        with atomic_file(path) as tmp, open(tmp, "wb") as stream:
            np.savez(
                stream,
                mean=self.mean,
                components=self.components,
                explained_variance=self.explained_variance,
                total_variance=np.float64(self.total_variance),
            )

    @classmethod
    def load(cls, path: Path) -> PCA:
        with np.load(path) as z:
            return cls(
                mean=z["mean"],
                components=z["components"],
                explained_variance=z["explained_variance"],
                total_variance=float(z["total_variance"]),
            )


def fit_pca(x: np.ndarray, n_components: int = DEFAULT_PCA_COMPONENTS, block_rows: int = 1 << 15) -> PCA:
    """PCA of the rows of ``x`` [n, d] with ``min(n_components, d, n)`` components (deterministic).

    The covariance is accumulated in float64 over row blocks (memory O(d^2), fine for LLM widths), then
    ``numpy.linalg.eigh``; explained variance uses the ``n - 1`` denominator like scikit-learn.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise RetrievalInputError(f"fit_pca needs a non-empty 2-D array, got shape {x.shape}")
    n, d = x.shape
    k = min(n_components, d, n)
    mean = np.zeros(d, dtype=np.float64)
    for s in range(0, n, block_rows):
        mean += np.asarray(x[s : s + block_rows], dtype=np.float64).sum(axis=0)
    mean /= n
    cov = np.zeros((d, d), dtype=np.float64)
    for s in range(0, n, block_rows):
        xc = np.asarray(x[s : s + block_rows], dtype=np.float64) - mean
        cov += xc.T @ xc
    evals, evecs = np.linalg.eigh(cov)  # ascending
    top = np.argsort(evals, kind="stable")[::-1][:k]
    components = evecs[:, top].T.copy()  # [k, d]
    flip = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    components *= np.where(flip == 0, 1.0, flip)[:, None]
    denom = max(n - 1, 1)
    return PCA(
        mean=mean,
        components=components,
        explained_variance=np.clip(evals[top], 0, None) / denom,
        total_variance=float(np.trace(cov)) / denom,
    )


def snap_unit_rows(y: np.ndarray, bits: int = SCORE_GRID_BITS) -> np.ndarray:
    """L2-normalise rows, then round them onto the ``2**-bits`` grid with norm <= 1 (float32 result).

    Rows that round to a norm above 1 are shrunk by ``2**-bits`` steps until they fit (a few rows, once or
    twice). Zero rows stay zero. See the module docstring for why this makes every score exact.
    """
    y = np.asarray(y, dtype=np.float64)
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        log.warning(
            "%d vectors are zero after PCA (identical to the mean); they score 0 with everything", zero.sum()
        )
    unit = y / np.where(norms == 0, 1.0, norms)
    scale = float(1 << bits)
    q = np.rint(unit * scale)
    shrink = np.ones(len(q))
    for _ in range(64):
        over = (q * q).sum(axis=1) > scale * scale  # integer-valued float64 sums: exact
        if not over.any():
            break
        shrink[over] -= 1.0 / scale
        q[over] = np.rint(unit[over] * scale * shrink[over, None])
    else:  # pragma: no cover - needs a pathological input
        raise RuntimeError("could not fit vectors inside the unit ball on the score grid")
    return (q / scale).astype(np.float32)


def on_score_grid(vectors: np.ndarray, bits: int = SCORE_GRID_BITS) -> bool:
    """Whether ``vectors`` are grid-snapped unit vectors (their dot products are exact in float32)."""
    scaled = np.asarray(vectors, dtype=np.float64) * (1 << bits)
    return bool(
        np.array_equal(scaled, np.rint(scaled)) and ((scaled * scaled).sum(axis=1) <= (1 << bits) ** 2).all()
    )


def to_index_space(pca: PCA, x: np.ndarray) -> np.ndarray:
    """Embeddings [n, d_in] -> the vectors the index holds: PCA, L2-normalise, snap (float32 [n, k])."""
    return snap_unit_rows(pca.transform(x))
