"""The retrieval engine (paper §3.4) on arrays: per sample, the top-K earlier timeline rows by cosine.

For a sample of user ``u`` with ``hist_len = h`` (its own timeline row is ``offsets[u] + h``), the candidates
are the user's timeline rows ``offsets[u] + j`` for ``j < h`` (strictly earlier). Mode ``similarity`` keeps
the ``K`` candidates whose items have the largest cosine with the target item (index-space vectors), ties
broken towards the more recent row; mode ``recent`` keeps the last ``K`` (the ablation). Either way the kept
rows are re-sorted into chronological order, padded with -1 when the history is shorter than K.
``K_long = 60`` feeds the CRM, ``K_short = 10`` the prompt. No I/O: :mod:`reclora_ds.retrieval.retriever`
runs it over a processed dataset and writes the retrieval folder.

The work per user grows with the square of the history length. The engine scores a user's samples at once
as one causal block of the Gram matrix ``S[p, j] = <e(row p), e(row j)>`` for target positions ``p`` and
earlier positions ``j < p`` (row-chunked for long timelines, many short users batched into one padded
``bmm``), then takes ``torch.topk`` per row and re-sorts the winners by position. Scores are exact (the index
vectors sit on a grid, see :mod:`reclora_ds.retrieval.index_space`), so a boundary tie is a real tie: such
rows (rare) are redone with an explicit "more recent wins" rule. The top-``K_short`` is the first
``K_short`` of the top-``K_long`` in (score, recency) order, so one pass serves every K.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from reclora_ds.data.histories import NO_ROW, RETRIEVAL_MODES

K_LONG = 60  # CRM history (paper §3.4 / reclora-facts §5)
K_SHORT = 10  # prompt history
DEFAULT_KS = (K_LONG, K_SHORT)
DEFAULT_BLOCK_ELEMENTS = 1 << 23  # scores per block: 32 MiB of float32
DEFAULT_GATHER_ELEMENTS = 1 << 25  # gathered vector floats per block: 128 MiB
DEFAULT_ROW_CHUNK = 512  # most target rows of one user in one block
_RECENT_CHUNK = 1 << 20  # samples per vectorised chunk in recent/take-all filling
_INVALID_KEY = np.iinfo(np.int64).min + 1
_PAD_LAST = np.iinfo(np.int32).max  # sorts padding after every real position
_NUMPY_GEMM_MIN_ELEMENTS = 1 << 20  # score blocks from this size (and row count) use numpy's matmul
_NUMPY_GEMM_MIN_ROWS = 256
_TOPK_MIN_COLUMNS = 2048  # from this row length torch.topk beats a numpy sort (measured)


@dataclass
class EngineStats:
    """What the engine did: counts and seconds per phase (for benchmarks and logs)."""

    samples: int = 0
    scored_samples: int = 0  # samples whose history was ranked (h > min K)
    tie_rows: int = 0  # rows whose K_long-th place was shared (resolved by recency, explicitly)
    pairs: int = 0  # (target, earlier row) pairs that were needed
    computed: int = 0  # score-matrix elements computed, padding included
    groups: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: {"plan": 0.0, "gather": 0.0, "score": 0.0, "select": 0.0, "write": 0.0}
    )

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """The K values as a tuple of ints; ``ValueError`` unless they are distinct and positive."""
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct positive integers, got {ks}")
    return ks


def _fill_recent(
    out: np.ndarray, dest: np.ndarray | None, base: np.ndarray, hist_len: np.ndarray, k: int
) -> None:
    """``out[dest] = `` the last ``min(h, k)`` rows before each sample, oldest first, -1 padded (chunked)."""
    j = np.arange(k, dtype=np.int64)
    for s in range(0, len(base), _RECENT_CHUNK):
        h = hist_len[s : s + _RECENT_CHUNK].astype(np.int64)
        n_valid = np.minimum(h, k)
        first = base[s : s + _RECENT_CHUNK] + h - n_valid  # [B]
        rows = np.where(j < n_valid[:, None], first[:, None] + j, NO_ROW).astype(np.int32)
        if dest is None:
            out[s : s + len(rows)] = rows
        else:
            out[dest[s : s + len(rows)]] = rows


def _score_keys(scores: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """int64 keys ordering candidates by (score, position): larger = better, unique within a row."""
    # + 0 turns -0.0 into +0.0: equal scores must give equal keys
    key = (scores + np.float32(0)).view(np.int32).astype(np.int64)
    np.bitwise_xor(key, 0x7FFFFFFF, out=key, where=key < 0)  # monotone in the float value
    key <<= 32
    key |= np.maximum(pos, 0)
    key[pos < 0] = _INVALID_KEY
    return key


@dataclass
class _Plan:
    """Scored samples sorted by (user, h), cut into chunks of one user and one kind.

    A chunk's rows are all "full" (h <= k_max: every earlier row is a candidate) or all "select"
    (h > k_max: the top k_max are needed). Chunks of a long user's select rows hold at most
    ``block_elements / cols`` rows each and are marked ``long`` (scored against one shared gather).
    """

    order: np.ndarray  # [n] sample indices in (user, h) order
    h: np.ndarray  # [n] hist_len in that order
    base: np.ndarray  # [n] first timeline row of the sample's user
    starts: np.ndarray  # [C] first position of each chunk in ``order``
    rows: np.ndarray  # [C] rows per chunk
    cols: np.ndarray  # [C] largest h in the chunk = candidate columns needed
    segment: np.ndarray  # [C] segment id (one user, one kind)
    long: np.ndarray  # [C] bool: the segment needed several chunks


def _plan(
    user: np.ndarray, hist_len: np.ndarray, base: np.ndarray, k_max: int, row_chunk: int, block_elements: int
) -> _Plan:
    order = np.lexsort((hist_len, user))
    u, h = user[order], hist_len[order]
    n = len(order)
    kind = h > k_max
    new_seg = np.ones(n, dtype=bool)
    new_seg[1:] = (u[1:] != u[:-1]) | (kind[1:] != kind[:-1])
    seg_starts = np.flatnonzero(new_seg)
    seg_len = np.diff(np.append(seg_starts, n))
    seg_cols = h[seg_starts + seg_len - 1]
    seg_limit = np.clip(block_elements // np.maximum(seg_cols, 1), 1, row_chunk)
    rank = np.arange(n) - np.repeat(seg_starts, seg_len)
    starts = np.flatnonzero(new_seg | (rank % np.repeat(seg_limit, seg_len) == 0))
    rows = np.diff(np.append(starts, n))
    segment = np.cumsum(new_seg)[starts] - 1
    return _Plan(
        order=order,
        h=h,
        base=base[order],
        starts=starts,
        rows=rows,
        cols=h[starts + rows - 1],
        segment=segment,
        long=(seg_len > seg_limit)[segment],
    )


def _groups(
    rows: np.ndarray, cols: np.ndarray, k_max: int, d: int, block_elements: int, gather_elements: int
) -> list[np.ndarray]:
    """Greedily batch chunks (sorted by columns, then rows) while the padded block fits the budgets.

    Full chunks (cols <= k_max) and select chunks never share a group.
    """
    corder = np.lexsort((rows, cols))
    r_sorted, c_sorted = rows[corder].tolist(), cols[corder].tolist()
    groups, i, n = [], 0, len(corder)
    while i < n:
        rmax, cmax, j = r_sorted[i], c_sorted[i], i + 1
        while j < n:
            r2, c2, g = max(rmax, r_sorted[j]), max(cmax, c_sorted[j]), j - i + 1
            if (
                g * r2 * c2 > block_elements
                or g * (r2 + c2) * d > gather_elements
                or (c_sorted[j] > k_max) != (cmax > k_max)
            ):
                break
            rmax, cmax, j = r2, c2, j + 1
        groups.append(corder[i:j])
        i = j
    return groups


def retrieve_rows(
    timeline_items: np.ndarray,
    offsets: np.ndarray,
    sample_user: np.ndarray,
    sample_hist_len: np.ndarray,
    vectors: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    mode: str = "similarity",
    *,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    gather_elements: int = DEFAULT_GATHER_ELEMENTS,
    row_chunk: int = DEFAULT_ROW_CHUNK,
    out: dict[int, np.ndarray] | None = None,
    stats: EngineStats | None = None,
) -> dict[int, np.ndarray]:
    """Retrieved timeline rows for every sample: ``{k: int32 [S, k]}`` (array-level core, no I/O).

    Args:
        timeline_items: int [N] item_index of every timeline row (user-major CSR).
        offsets: int [U + 1] first row of each user.
        sample_user, sample_hist_len: int [S] per sample; its history is rows
            ``offsets[u] .. offsets[u] + h - 1`` and its target item is ``timeline_items[offsets[u] + h]``.
        vectors: float32 [n_items, d] index-space vectors (row = item_index); needed for ``similarity``.
        ks: the K values to produce (one pass serves all).
        block_elements: most score-matrix elements per block (memory bound: 4 bytes each, plus the mask).
        gather_elements: most gathered vector floats per batched block.
        row_chunk: most target rows of one user per block.
        out: optional preallocated ``{k: int32 [S, k]}`` arrays (e.g. memory maps) to fill.
    """
    ks = check_ks(ks)
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"mode must be one of {RETRIEVAL_MODES}, got {mode!r}")
    stats = stats if stats is not None else EngineStats()
    user = np.asarray(sample_user, dtype=np.int64)
    hist_len = np.asarray(sample_hist_len, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(user)
    if len(hist_len) != n:
        raise ValueError("sample_user and sample_hist_len differ in length")
    base = offsets[user]
    if n and (hist_len.min() < 0 or (base + hist_len >= offsets[user + 1]).any()):
        raise ValueError("a sample's hist_len points at or past the end of its user's timeline")
    out = out if out is not None else {k: np.empty((n, k), dtype=np.int32) for k in ks}
    for k in ks:
        if out[k].shape != (n, k) or out[k].dtype != np.int32:
            raise ValueError(f"out[{k}] must be int32 [{n}, {k}], got {out[k].dtype} {out[k].shape}")
    stats.samples += n

    t0 = time.perf_counter()
    if mode == "recent":
        for k in ks:
            _fill_recent(out[k], None, base, hist_len, k)
        stats.seconds["write"] += time.perf_counter() - t0
        return out
    if vectors is None:
        raise ValueError("mode 'similarity' needs the index vectors")

    k_min, k_max = min(ks), max(ks)
    take_all = np.flatnonzero(hist_len <= k_min)  # every earlier row is kept, for every K
    for k in ks:
        _fill_recent(out[k], take_all, base[take_all], hist_len[take_all], k)
    scored = np.flatnonzero(hist_len > k_min)
    stats.scored_samples += len(scored)
    stats.seconds["write"] += time.perf_counter() - t0
    if len(scored) == 0:
        return out

    t0 = time.perf_counter()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    timeline_items = np.asarray(timeline_items)
    plan = _plan(user[scored], hist_len[scored], base[scored], k_max, row_chunk, block_elements)
    plan.order = scored[plan.order]  # -> indices of all samples
    short = np.flatnonzero(~plan.long)
    groups = [
        short[g]
        for g in _groups(
            plan.rows[short], plan.cols[short], k_max, vectors.shape[1], block_elements, gather_elements
        )
    ]
    long_chunks = np.flatnonzero(plan.long)  # in (segment, h) order
    stats.groups += len(groups) + len(long_chunks)
    stats.pairs += int(plan.h.sum())
    stats.seconds["plan"] += time.perf_counter() - t0

    for grp in groups:  # many short users per padded bmm
        t0 = time.perf_counter()
        g_start, g_rows, g_cols = plan.starts[grp], plan.rows[grp], plan.cols[grp]
        rm, cm = int(g_rows.max()), int(g_cols.max())
        valid = np.arange(rm)[None, :] < g_rows[:, None]  # [G, Rm]
        sidx = np.where(valid, g_start[:, None] + np.arange(rm), g_start[:, None])  # into plan order
        p = np.where(valid, plan.h[sidx], 0)  # [G, Rm]; padding rows see no candidates
        base_g = plan.base[g_start]  # [G]
        # positions 0..Cm of each user (clipped to its own last target): candidates and targets at once
        pos = np.minimum(np.arange(cm + 1)[None, :], g_cols[:, None])
        timeline = np.take(vectors, np.take(timeline_items, base_g[:, None] + pos), axis=0)  # [G, Cm+1, D]
        a = p[0, 0]
        if (p[:, 0] == a).all() and np.array_equal(p, np.where(valid, a + np.arange(rm), p)):
            q = timeline[:, a : a + rm]  # the usual case, consecutive targets from one position: a view
        else:
            q = np.take(
                timeline.reshape(-1, timeline.shape[2]), (np.arange(len(grp)) * (cm + 1))[:, None] + p, axis=0
            )
        stats.seconds["gather"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = torch.bmm(torch.from_numpy(q), torch.from_numpy(timeline[:, :cm]).transpose(1, 2)).numpy()
        stats.seconds["score"] += time.perf_counter() - t0
        _select_and_write(scores, p, valid, sidx, base_g, g_rows, plan, ks, out, stats)

    long_segments = np.split(long_chunks, np.flatnonzero(np.diff(plan.segment[long_chunks])) + 1)
    for chunks in long_segments if len(long_chunks) else []:  # a long user: gather its timeline once
        t0 = time.perf_counter()
        b = int(plan.base[plan.starts[chunks[0]]])
        timeline = np.take(
            vectors, timeline_items[b : b + int(plan.cols[chunks].max()) + 1], axis=0
        )  # [L, D]
        stats.seconds["gather"] += time.perf_counter() - t0
        for c in chunks:
            t0 = time.perf_counter()
            r, cm = int(plan.rows[c]), int(plan.cols[c])
            sidx = plan.starts[c] + np.arange(r)[None, :]  # [1, R]
            p = plan.h[sidx]
            q = timeline[p[0]]  # [R, D]
            if (
                r * cm >= _NUMPY_GEMM_MIN_ELEMENTS and r >= _NUMPY_GEMM_MIN_ROWS
            ):  # numpy's BLAS wins on big products
                scores = (q @ timeline[:cm].T)[None]  # [1, R, Cm]
            else:  # and torch on small ones (measured)
                scores = torch.mm(torch.from_numpy(q), torch.from_numpy(timeline[:cm]).T).numpy()[None]
            stats.seconds["score"] += time.perf_counter() - t0
            _select_and_write(
                scores,
                p,
                np.ones_like(p, dtype=bool),
                sidx,
                np.array([b]),
                np.array([r]),
                plan,
                ks,
                out,
                stats,
            )
    return out


def _top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-``k`` of each row of ``scores`` [N, C] (C > k): positions int32 [N, k], their scores, tie count.

    Every row must hold more than ``k`` finite values (earlier rows); masked columns are ``-inf``.
    Exact tie rule: when the k-th place is shared, the columns with the larger position (more recent) win.
    """
    n, c = scores.shape
    if c >= _TOPK_MIN_COLUMNS:  # long rows: torch.topk is cheaper per element
        vals, idx = torch.topk(torch.from_numpy(scores), k + 1, dim=1)  # sorted, descending
        kth, next_best = vals[:, k - 1].numpy(), vals[:, k].numpy()
        cand_p = idx[:, :k].numpy().astype(np.int32)
        tie = kth == next_best  # a column outside the top k equals the k-th value
    else:  # short rows: numpy's vectorised sort gives the k-th value, a comparison gives the columns
        ordered = np.sort(scores, axis=1)
        kth, next_best = ordered[:, c - k], ordered[:, c - k - 1]
        tie = kth == next_best
        chosen = scores >= kth[:, None]  # exactly k per row without a tie
        chosen[tie] = False
        cand_p = np.empty((n, k), dtype=np.int32)
        cand_p[~tie] = (np.flatnonzero(chosen) % c).reshape(-1, k)
    if tie.any():
        s_tie = scores[tie]
        thresh = kth[tie][:, None]
        above, equal = s_tie > thresh, s_tie == thresh
        need = k - above.sum(axis=1, keepdims=True)
        from_right = np.cumsum(equal[:, ::-1], axis=1)[:, ::-1]  # ties at or after each column
        chosen = above | (equal & (from_right <= need))  # exactly k per row, the latest ties first
        cand_p[tie] = np.nonzero(chosen)[1].reshape(-1, k)
    return cand_p, np.take_along_axis(scores, cand_p, axis=1), int(tie.sum())


def _select_and_write(
    scores: np.ndarray,
    p: np.ndarray,
    valid: np.ndarray,
    sidx: np.ndarray,
    base: np.ndarray,
    g_rows: np.ndarray,
    plan: _Plan,
    ks: tuple[int, ...],
    out: dict[int, np.ndarray],
    stats: EngineStats,
) -> None:
    """Mask a score block [G, R, C] causally, keep the top k_max per row, write every K.

    ``p`` [G, R] target positions, ``valid`` [G, R] real rows, ``sidx`` [G, R] positions in plan order,
    ``base`` [G] first timeline row per block row-group, ``g_rows`` [G] real rows per row-group.
    """
    k_max = max(ks)
    t0 = time.perf_counter()
    g, rm, cm = scores.shape
    keep = valid.reshape(-1)
    first = int(p[valid].min())  # columns before the earliest target are earlier than every target
    if first < cm:  # causal mask: only columns j < p (numpy's copyto is ~10x faster than masked_fill_ here)
        later = np.arange(first, cm, dtype=np.int32)[None, None, :] >= p.astype(np.int32)[:, :, None]
        np.copyto(scores[:, :, first:], -np.inf, where=later)
    scores = scores.reshape(-1, cm)
    if not keep.all():
        scores = scores[keep]
    p_rows = p.reshape(-1)[keep]
    if cm > k_max:  # a select block: every row has h > k_max, so more than k_max finite candidates
        cand_p, cand_s, ties = _top_k_rows(scores, k_max)
        stats.tie_rows += ties
    else:  # a full block: every earlier row is a candidate
        cand_s = np.full((len(scores), k_max), -np.inf, dtype=np.float32)
        cand_s[:, :cm] = scores
        j = np.arange(k_max)
        cand_p = np.where(j[None, :] < p_rows[:, None], j[None, :], -1).astype(np.int32)
    t1 = time.perf_counter()

    dest = plan.order[sidx.reshape(-1)[keep]]
    row_base = np.repeat(base, g_rows)[:, None]  # rows are in [G, R] order, padding removed
    key = None
    for k in ks:
        if k < k_max:
            key = _score_keys(cand_s, cand_p) if key is None else key
            best = np.argpartition(key, k_max - k, axis=1)[:, k_max - k :]  # the k largest keys
            top = np.take_along_axis(cand_p, best, axis=1)
        else:
            top = cand_p
        top = np.sort(np.where(top < 0, _PAD_LAST, top), axis=1)  # chronological, padding last
        out[k][dest] = np.where(top == _PAD_LAST, NO_ROW, row_base + top).astype(np.int32)
    stats.computed += g * rm * cm
    stats.seconds["select"] += t1 - t0
    stats.seconds["write"] += time.perf_counter() - t1
