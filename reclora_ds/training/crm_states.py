"""CRM states for stage 2: the frozen CRM's hidden vector ``R_c`` [d_c] of any set of samples.

The PLoRA gates read the CRM state of each sample (reclora-facts section 1). This module computes it with
the best stage-1 checkpoint, batched, in eval mode (no dropout) under ``torch.no_grad``, with the same
history the CRM was trained on (``crm.json``: history mode and length, retrieval folder), for a whole
split (``split="fewshot"`` for the LLM's training subset, ``"test"``) or for given ``sample_ids``.
Two calls with the same arguments return identical arrays.

Files (:func:`save_crm_states` / :func:`load_crm_states`): ``.safetensors`` with tensors ``sample_id``
int64 [N] and ``hidden`` float32 [N, d_c] plus header metadata (model, checkpoint step, dataset sha256),
or ``.npz`` with the same two arrays.

Example::

    ids, hidden = compute_crm_states("runs/quickstart/sim/checkpoints/best", "runs/quickstart/prepare",
                                     split="fewshot")
    save_crm_states("runs/quickstart/crm_states/fewshot.safetensors", ids, hidden)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from reclora_ds.data.loader import SAMPLE_COLUMNS, CRMBatchLoader
from reclora_ds.data.preprocess import SPLITS
from reclora_ds.data.processed import ProcessedDataset, feature_columns, metadata_sha256
from reclora_ds.files import atomic_file
from reclora_ds.training.checkpoint import CRMCheckpointInfo, load_crm

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 2048


class DatasetMismatchError(ValueError):
    """The processed dataset is not the one the CRM checkpoint was trained on."""


def _check_dataset(info: CRMCheckpointInfo, dataset: ProcessedDataset, strict: bool) -> None:
    """The fields and vocab sizes must match; the metadata sha256 must too unless ``strict`` is False."""
    fields = {name: int(f["vocab_size"]) for name, f in dataset.metadata["fields"].items()}
    trained = {f.name: f.vocab_size for f in info.feature_spec.fields}
    if fields != trained:
        raise DatasetMismatchError(
            f"dataset fields/vocab sizes {fields} differ from the checkpoint's {trained}"
        )
    expected = info.dataset.get("metadata_sha256")
    actual = metadata_sha256(dataset.path)
    if expected and expected != actual:
        message = (
            f"{dataset.path}/metadata.json (sha256 {actual[:12]}) is not the dataset the CRM was trained on "
            f"({info.dataset.get('data_dir')}, sha256 {expected[:12]})"
        )
        if strict:
            raise DatasetMismatchError(message + "; pass check_dataset=False to use it anyway")
        log.warning(message)


def _sample_columns(dataset: ProcessedDataset, sample_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The sample columns (as the loader types them) of ``sample_ids``, in that order, from any split."""
    columns = list(dict.fromkeys([*SAMPLE_COLUMNS, *feature_columns(dataset.metadata)]))
    splits = dataset.metadata["splits"]
    wanted = [  # only the splits whose sample_id range can hold a requested id (splits are contiguous in time)
        s
        for s in SPLITS
        if len(sample_ids) == 0
        or "first_sample_id" not in splits[s]
        or np.any((sample_ids >= splits[s]["first_sample_id"]) & (sample_ids <= splits[s]["last_sample_id"]))
    ]
    table = pa.concat_tables(dataset.read_split(split, columns) for split in wanted or SPLITS)
    all_ids = table.column("sample_id").to_numpy()
    order = np.argsort(all_ids, kind="stable")
    pos = np.searchsorted(all_ids, sample_ids, sorter=order)
    pos = np.minimum(pos, len(all_ids) - 1)
    rows = order[pos]
    missing = all_ids[rows] != sample_ids
    if missing.any():
        raise KeyError(
            f"{int(missing.sum())} sample ids are in no split, e.g. {sample_ids[missing][:5].tolist()}"
        )
    cols = {c: table.column(c).to_numpy()[rows] for c in columns}
    cols["label"] = cols["label"].astype(np.float32)
    for c in columns:
        if c != "label":
            cols[c] = cols[c].astype(np.int64)
    return cols


def _batches(
    loader: CRMBatchLoader, cols: dict[str, np.ndarray] | None, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    if cols is None:
        yield from loader
        return
    for lo in range(0, len(cols["sample_id"]), batch_size):
        yield loader.assemble({c: v[lo : lo + batch_size] for c, v in cols.items()})


@torch.no_grad()
def compute_crm_outputs(
    checkpoint: str | Path | tuple[nn.Module, CRMCheckpointInfo],
    dataset: str | Path | ProcessedDataset,
    split: str | None = None,
    sample_ids: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    check_dataset: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CRM outputs of a split or of given samples: ``(sample_ids int64 [N], hidden float32 [N, d_c],
    logit float32 [N])``; ``sigmoid(logit)`` is the CRM's click probability.

    Args:
        checkpoint: a checkpoint folder (or run folder, for its best), or ``(model, info)`` from
            :func:`~reclora_ds.training.checkpoint.load_crm`.
        dataset: the processed dataset (folder or object) the CRM was trained on.
        split: ``train``, ``valid``, ``test`` or ``fewshot``: every sample of it, in file order.
        sample_ids: instead of ``split``, these samples (any splits), in the given order.
        batch_size: samples per forward pass.
        device: where the model runs.
        check_dataset: refuse a dataset whose metadata.json differs from the checkpoint's (fields and vocab
            sizes are always checked).
    """
    if (split is None) == (sample_ids is None):
        raise ValueError("give exactly one of split and sample_ids")
    model, info = load_crm(checkpoint, device) if not isinstance(checkpoint, tuple) else checkpoint
    if not isinstance(dataset, ProcessedDataset):
        dataset = ProcessedDataset(dataset)
    _check_dataset(info, dataset, strict=check_dataset)
    loader = CRMBatchLoader(
        dataset,
        split or "test",
        batch_size,
        **info.history_loader_kwargs(dataset.path),
        shuffle=False,
        drop_last=False,
        even_batches=False,
    )
    cols = None if sample_ids is None else _sample_columns(dataset, np.asarray(sample_ids, dtype=np.int64))
    was_training = model.training
    model.eval()
    ids, hidden, logits = [], [], []
    try:
        for batch in _batches(loader, cols, batch_size):
            out = model({k: v.to(device) for k, v in batch.items()})
            ids.append(batch["sample_id"].numpy())
            hidden.append(out.hidden.float().cpu().numpy())
            logits.append(out.logit.float().cpu().numpy())
    finally:
        model.train(was_training)
    width = info.hidden_dim
    return (
        np.concatenate(ids) if ids else np.zeros(0, np.int64),
        np.concatenate(hidden) if hidden else np.zeros((0, width), np.float32),
        np.concatenate(logits) if logits else np.zeros(0, np.float32),
    )


def compute_crm_states(
    checkpoint: str | Path | tuple[nn.Module, CRMCheckpointInfo],
    dataset: str | Path | ProcessedDataset,
    split: str | None = None,
    sample_ids: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    check_dataset: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """CRM states of a split or of given samples: ``(sample_ids int64 [N], hidden float32 [N, d_c])``.

    The first two outputs of :func:`compute_crm_outputs` (same arguments).
    """
    ids, hidden, _ = compute_crm_outputs(
        checkpoint, dataset, split, sample_ids, batch_size, device, check_dataset
    )
    return ids, hidden


def save_crm_states(
    path: str | Path, sample_ids: np.ndarray, hidden: np.ndarray, metadata: dict[str, str] | None = None
) -> Path:
    """Write states keyed by sample id: ``.safetensors`` (with ``metadata`` in its header) or ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
    states = np.ascontiguousarray(hidden, dtype=np.float32)
    if ids.ndim != 1 or states.ndim != 2 or len(ids) != len(states):
        raise ValueError(f"need sample_ids [N] and hidden [N, d_c], got {ids.shape} and {states.shape}")
    if path.suffix not in (".safetensors", ".npz"):
        raise ValueError(f"{path}: CRM states are written as .safetensors or .npz")
    with atomic_file(path) as tmp:
        if path.suffix == ".safetensors":
            tensors = {"sample_id": torch.from_numpy(ids), "hidden": torch.from_numpy(states)}
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        else:
            with open(tmp, "wb") as f:
                np.savez(f, sample_id=ids, hidden=states)
    return path


def load_crm_states(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(sample_ids int64 [N], hidden float32 [N, d_c])`` from :func:`save_crm_states`'s file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="np") as f:
            return f.get_tensor("sample_id"), f.get_tensor("hidden")
    with np.load(path) as z:
        return z["sample_id"], z["hidden"]
