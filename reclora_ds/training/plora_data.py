"""Stage-2 batches: the prompt tokens (text view) and the CRM's ID-view tensors of the same samples.

Shape legend: B batch, T tokens (left-padded prompt + answer), L the CRM's history length, K the prompt's
short history (10).

A batch is a :class:`~reclora_ds.data.loader.CRMBatchLoader` batch (``sample_id``, ``label``, every
categorical field, ``hist_*`` [B, L]: the CRM's long history, recent or retrieved) plus::

    input_ids        int64 [B, T]   chat-wrapped prompt (+ answer when training), padded on the LEFT
    attention_mask   int64 [B, T]   0 on the padding
    labels           int64 [B, T]   answer token ids, -100 elsewhere (training batches only)
    answer_position  int64 [B]      the position whose logits give p(yes) (right before the answer)
    user_index       int64 [B]      dense user index (GAUC groups)

Length grouping (``length_group_size`` G > 1): the rows of the epoch are cut, in the order the CRMBatchLoader
gives them, into windows of G x B rows; inside a window the rows are sorted by prompt length (tokens) and cut
into G micro-batches, whose order is then shuffled with the seed, the epoch and the window's index. A window
holds exactly the rows it held without grouping, so an epoch visits the same samples on every rank (and
with ``G x B x accumulation`` aligned to an optimizer step, each step sees the same samples). Resuming after
``n`` micro-batches recomputes the window of micro-batch ``n`` and skips what was already yielded.

Both views are built in :meth:`PLoRABatchLoader.assemble` from the same sample rows, and the text view is
looked up by ``sample_id``: the short retrieved history in the retrieval folder (its ``rows_k<K>``), the profile
by user, the target and history titles by item. Everything about ranks, epochs and resuming is the
CRMBatchLoader's: per-rank disjoint shard files, a seeded shuffle per epoch, even batches across ranks,
``state_dict()`` / ``load_state_dict()`` for an exact resume position.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reclora_ds.data.histories import NO_ROW, RetrievedHistories, load_retrieved
from reclora_ds.data.loader import CRMBatchLoader, split_sample_ids
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.data.prompts import PromptEncoder, TextView
from reclora_ds.data.text import ml1m_profile
from reclora_ds.training.checkpoint import CRMCheckpointInfo
from reclora_ds.training.plora_config import PLoRATrainConfig

log = logging.getLogger(__name__)

SHORT_HISTORY_MODES = ("recent", "retrieved")
DEFAULT_SHORT_HISTORY = 10  # K_short of the paper (prompt history)
NO_CRM_HISTORY = 1  # CRM history length when there is no CRM (modes lora / zero_shot): assembled but unused
LENGTH_GROUP_STREAM = 0x1E6  # third seed word of the micro-batch order inside a length group


def nested_sample_ids(dataset: ProcessedDataset, split: str, n: int, seed: int) -> np.ndarray:
    """The first ``n`` ids of a seeded permutation of ``split``'s ids, ascending: a NESTED uniform subset.

    For one ``seed`` the subset of size ``n`` lies inside every larger one (a prefix of one permutation), and
    it depends on the split's ids, ``n`` and ``seed`` only (not on ranks or batch sizes). Each subset is
    itself uniform over the split. (``reclora_ds.data.loader.uniform_sample_ids``, which draws the
    evaluation subsets, is uniform too but not nested: numpy's ``choice`` draws differently per size.)
    ``n`` >= the split's size gives the whole split.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = split_sample_ids(dataset, split)  # ascending
    if n >= len(ids):
        return ids
    return np.sort(ids[np.random.default_rng(seed).permutation(len(ids))[:n]])


def retrieval_folder(cfg: PLoRATrainConfig) -> Path:
    """Stage 2's retrieval folder: ``retrieval_dir``, or ``<data_dir>/retrieved/similarity``."""
    return Path(cfg.retrieval_dir) if cfg.retrieval_dir else Path(cfg.data_dir) / "retrieved" / "similarity"


def history_settings(cfg: PLoRATrainConfig, crm_info: CRMCheckpointInfo | None) -> dict[str, Any]:
    """The history arguments of :class:`PLoRABatchLoader` for stage 2 (training, evaluation and scoring).

    Prompt: ``short_history`` (``retrieved``: ``rows_k<short_history_length>`` of the retrieval folder;
    ``recent``: the most recent K). CRM: with ``long_history=auto`` and no ``long_history_length``, exactly
    the histories the CRM was trained on (:meth:`CRMCheckpointInfo.history_loader_kwargs`: its own
    retrieval folder, checked by checksum), so the gate's state comes from the CRM as it was trained;
    ``recent`` / ``retrieved`` / a length are ablations (logged when they differ from the training's).
    Without a CRM (modes lora and zero_shot) the ID view is a 1-long recent history, assembled but unused.
    """
    folder = retrieval_folder(cfg)
    opened: dict[str, RetrievedHistories] = {}

    def retrieval() -> RetrievedHistories:
        if "r" not in opened:
            opened["r"] = load_retrieved(folder, cfg.data_dir)
        return opened["r"]

    out: dict[str, Any] = {
        "short_history": cfg.short_history,
        "short_history_length": cfg.short_history_length,
        "short_retrieved": retrieval() if cfg.short_history == "retrieved" else None,
    }
    if crm_info is None:
        return out | {"history_length": NO_CRM_HISTORY, "history_mode": "recent"}
    if cfg.long_history == "auto" and not cfg.long_history_length:
        return out | crm_info.history_loader_kwargs(cfg.data_dir)
    mode = crm_info.history_mode if cfg.long_history == "auto" else cfg.long_history
    length = cfg.long_history_length or crm_info.history_length
    if (mode, length) != (crm_info.history_mode, crm_info.history_length):
        log.warning(
            "the CRM was trained on %s histories of length %d; it gets %s histories of length %d here",
            crm_info.history_mode,
            crm_info.history_length,
            mode,
            length,
        )
    if mode == "recent":
        return out | {"history_length": length, "history_mode": "recent"}
    return out | {"history_length": length, "history_mode": "retrieved", "retrieved": retrieval()}


class PLoRABatchLoader(CRMBatchLoader):
    """Batches of the prompt tokens and the CRM's ID view of the same samples (see the module docstring).

    Args:
        dataset: the processed dataset.
        split: ``fewshot`` (training), ``valid`` or ``test``.
        batch_size: B, samples per batch on this rank.
        encoder: the prompt template + tokenizer.
        with_answer: append the answer and its labels (training); False gives prompt-only batches whose
            last position is the answer position (evaluation).
        short_history: the prompt's history, ``"recent"`` (the last K) or ``"retrieved"`` (``short_retrieved``).
        short_history_length: K (10 in the paper).
        short_retrieved: the retrieval folder's histories (:func:`reclora_ds.data.histories.load_retrieved`,
            holding K); required for ``"retrieved"``.
        length_group_size: G, micro-batches sorted by prompt length together (see the module docstring);
            0 or 1 = the CRMBatchLoader's order.
        **crm_loader_kwargs: the CRMBatchLoader's (``history_length``, ``history_mode``, ``retrieved``,
            ``rank``, ``world_size``, ``shuffle``, ``seed``, ``drop_last``, ``even_batches``...).

    Example::

        loader = PLoRABatchLoader(ProcessedDataset(path), "fewshot", 8, PromptEncoder(tok, "ml-1m"),
                                  history_length=60, rank=info.rank, world_size=info.world_size,
                                  shuffle=True, seed=42, drop_last=True)
    """

    def __init__(
        self,
        dataset: ProcessedDataset,
        split: str,
        batch_size: int,
        encoder: PromptEncoder,
        *,
        with_answer: bool = True,
        short_history: str = "recent",
        short_history_length: int = DEFAULT_SHORT_HISTORY,
        short_retrieved: RetrievedHistories | None = None,
        length_group_size: int = 0,
        **crm_loader_kwargs: Any,
    ) -> None:
        if length_group_size < 0:
            raise ValueError(f"length_group_size must be >= 0, got {length_group_size}")
        if short_history not in SHORT_HISTORY_MODES:
            raise ValueError(f"short_history must be one of {SHORT_HISTORY_MODES}, got {short_history!r}")
        if short_history_length < 1:
            raise ValueError(f"short_history_length must be >= 1, got {short_history_length}")
        if short_history == "retrieved" and short_retrieved is None:
            raise ValueError(
                "short_history='retrieved' needs short_retrieved (data.histories.load_retrieved)"
            )
        if short_retrieved is not None:
            short_retrieved.require_k(short_history_length)
        if encoder.dataset != dataset.metadata["dataset"]:
            raise ValueError(
                f"the prompt encoder is for {encoder.dataset!r}, the dataset is {dataset.metadata['dataset']!r}"
            )
        super().__init__(dataset, split, batch_size, **crm_loader_kwargs)
        self.encoder = encoder
        self.with_answer = with_answer
        self.short_history = short_history
        self.short_history_length = short_history_length
        self.length_group_size = length_group_size
        self._short = short_retrieved if short_history == "retrieved" else None
        if "item_index" not in self._columns:
            self._columns.append("item_index")  # the target's title
        self._build_text_lookups()
        if self._short is not None:
            self.check_covered(self._short, short_history_length)

    def _build_text_lookups(self) -> None:
        """Titles by item, profile sentence and gender by user (ML-1M), timeline item and rating by row."""
        ds = self.dataset
        self._titles = np.asarray(ds.items.column("title").to_pylist(), dtype=object)  # [n_items]
        n_users = ds.users.num_rows
        self._profiles = np.full(n_users, "", dtype=object)
        self._genders = np.full(n_users, "", dtype=object)
        if ds.metadata["dataset"] == "ml-1m":
            users = ds.users.select(["gender", "age", "occupation"]).to_pydict()
            self._profiles[:] = [
                ml1m_profile(g, a, o) for g, a, o in zip(users["gender"], users["age"], users["occupation"])
            ]
            self._genders[:] = users["gender"]
        timelines = ds.timelines
        self._row_item = timelines.item_index
        self._row_rating = timelines.rating
        self._row_offsets = timelines.offsets

    def short_history_rows(self, cols: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The prompt's history as timeline rows [B, K] (oldest first) and their validity mask [B, K]."""
        user, hist_len, k = cols["user_index"], cols["hist_len"], self.short_history_length
        if self._short is None:
            return self.dataset.timelines.recent(user, hist_len, k)
        rows = self._short.lookup(cols["sample_id"], k)  # [B, K], joined by sample_id
        valid = rows != NO_ROW
        start = self._row_offsets[user][:, None]
        outside = valid & ((rows < start) | (rows >= start + hist_len[:, None]))
        if outside.any():
            bad = cols["sample_id"][np.flatnonzero(outside.any(axis=1))[:5]].tolist()
            raise ValueError(
                f"retrieved prompt history rows outside the sample's history for sample ids {bad}"
            )
        return np.where(valid, rows, 0), valid

    def build_text_views(self, cols: dict[str, np.ndarray]) -> list[TextView]:
        """The text view of each sample of ``cols`` (no ID field: titles, ratings, profile words)."""
        rows, valid = self.short_history_rows(cols)
        titles = self._titles[self._row_item[rows]]  # [B, K] object
        ratings = self._row_rating[rows]  # [B, K]
        user = cols["user_index"]
        views = []
        for j, item in enumerate(cols["item_index"]):
            history = tuple((str(t), float(r)) for t, r, ok in zip(titles[j], ratings[j], valid[j]) if ok)
            views.append(
                TextView(
                    target=str(self._titles[item]),
                    history=history,
                    profile=self._profiles[user[j]],
                    gender=self._genders[user[j]],
                )
            )
        return views

    def assemble(self, cols: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The CRM batch of ``cols`` plus the tokenized prompts of the same samples."""
        batch = super().assemble(cols)
        views = self.build_text_views(cols)
        labels = cols["label"] if self.with_answer else None
        batch.update(self.encoder.encode(views, labels))
        batch["user_index"] = torch.from_numpy(cols["user_index"].astype(np.int64))
        return batch

    # ------------------------------------------------------------------------------------------------------
    # length grouping
    # ------------------------------------------------------------------------------------------------------

    def prompt_lengths(self, cols: dict[str, np.ndarray]) -> np.ndarray:
        """Tokens of each sample's prompt (without special tokens; the sort key of length grouping) [B]."""
        texts = self.encoder.prompts(self.build_text_views(cols))
        ids = self.encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.length_group_size <= 1:
            yield from super().__iter__()
            return
        start = self._resume_from if self._resume_from is not None else 0
        self._resume_from = None
        self._batches_yielded = start
        epoch, b, g = self.epoch, self.batch_size, self.length_group_size
        first_window = start // g
        index = first_window * g  # the epoch's micro-batch index of the window's first batch
        window = first_window
        pending: list[dict[str, np.ndarray]] = []
        n_pending = 0

        def flush(cols: dict[str, np.ndarray], window: int, index: int) -> Iterator[dict[str, torch.Tensor]]:
            order = np.argsort(self.prompt_lengths(cols), kind="stable")
            n = len(order)
            full = n // b
            batches = [order[i * b : (i + 1) * b] for i in range(full)]
            perm = np.random.default_rng([self.seed, epoch, window, LENGTH_GROUP_STREAM]).permutation(full)
            batches = [batches[i] for i in perm]
            if n % b:  # an incomplete last batch (end of the epoch without drop_last) stays last
                batches.append(order[full * b :])
            for j, rows in enumerate(batches):
                if index + j < start:
                    continue  # yielded before the resume
                self._batches_yielded += 1
                yield self.assemble({c: v[rows] for c, v in cols.items()})

        for chunk in self._row_chunks(epoch, first_window * g * b):
            n, lo = len(chunk["sample_id"]), 0
            while lo < n:
                take = min(g * b - n_pending, n - lo)
                pending.append({c: v[lo : lo + take] for c, v in chunk.items()})
                n_pending += take
                lo += take
                if n_pending == g * b:
                    cols = {c: np.concatenate([p[c] for p in pending]) for c in pending[0]}
                    yield from flush(cols, window, index)
                    pending, n_pending = [], 0
                    window += 1
                    index += g
        if n_pending:
            cols = {c: np.concatenate([p[c] for p in pending]) for c in pending[0]}
            yield from flush(cols, window, index)
