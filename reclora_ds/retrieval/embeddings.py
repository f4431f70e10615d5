"""Item semantic embeddings (paper §3.4): each item's description through the LLM, mean-pooled, sharded over ranks.

What one item's vector is::

    text  = items.parquet["description"][i]     # "Here is a movie. Its title is ... The movie's genre is ..."
    ids   = tokenizer(text, truncation=True, max_length=max_length)   # the tokenizer's own special tokens
    h     = base_model(ids).last_hidden_state   # [T, D], ONE forward pass, no generate, no lm_head
    e_i   = h.mean(over the T text tokens)       # float32 [D]

``h`` is the output of the final norm: for Llama, ``LlamaModel.forward`` ends with
``hidden_states = self.norm(hidden_states)`` and returns that as ``last_hidden_state`` (checked by a test
against a hook on the last decoder layer followed by ``model.norm``). We call the *base* model
(``model.base_model``, the ``LlamaModel`` inside ``LlamaForCausalLM``) so the ``[T, vocab]`` logits are never
computed. ``output_hidden_states=True`` on the causal LM would give the same tensor as its last entry (checked
with transformers 5.23 for Llama) but also keeps every layer's states and computes the logits; other
architectures are not guaranteed to put the post-norm state there, ``last_hidden_state`` is the contract.

Padding: texts are tokenized once without padding, then padded per batch on the right by this module (the
tokenizer's ``padding_side`` and ``pad_token`` do not matter) with explicit ``position_ids`` ``0..len-1``, so
under causal attention a text's real tokens see exactly what they see alone; :func:`mean_pool` ignores the
padded positions (even NaN ones). Length bucketing (sort by token count, batch neighbours, restore the input
order) cuts padding; it changes results only by float rounding.

Sharding over ranks (``torchrun``/``deepspeed``/``srun``, see ``reclora_ds.distributed``): rank ``r`` of ``W``
embeds the CONTIGUOUS item range ``[r*n//W, (r+1)*n//W)`` (item_index order, sizes differ by at most one) and
writes ``rank{r:03d}-of-{W:03d}.npy`` plus a ``.json`` beside it (range, shape, sha256, and a fingerprint of the
inputs: backbone checksum, dataset metadata checksum, max_length, dtype, ...) into the shard folder: by default
``<parent>/.<out name>.shards``, a hidden sibling of the output that every rank derives from ``out_dir`` alone
(``shard_dir=`` names another one). Both files go through a temporary file and ``os.replace``; the JSON is
written last and is the commit point. A rerun keeps a shard whose JSON matches the current inputs, range and
the ``.npy`` checksum, takes one from the previous output's ``shards/`` (a hard link: that output is only
read), and recomputes any other. Once every rank reports success (a collective that doubles as the barrier; a
failed rank makes all of them raise), rank 0 checks every shard again, concatenates them (contiguous ranges:
concatenation in rank order is item_index order) and writes the output folder WHOLE
(:func:`reclora_ds.retrieval.index.write_item_embeddings`: a temporary sibling folder, ``embeddings.json``
last, one rename over the old folder), moving the default shard folder's shards into it::

    embeddings.npy    float32 [n_items, D]; row i = the item with item_index i (0-based, never a raw id)
    item_ids.npy      int64 [n_items]; raw item id (e.g. MovieLens movieId) of each row
    shards/           this run's shards (a cache for the next rerun; delete the folder as a whole if unwanted)
    embeddings.json   counts, backbone + checksum, pooling, max_length, dtype, sha256 of embeddings.npy,
                      dataset path + metadata.json sha256, world_size, shard list, ``files`` (every file's
                      size and sha256, checked by the reader, :func:`reclora_ds.retrieval.index.load_item_embeddings`)

So a finished folder is the old output or the new one, never new arrays beside an old ``embeddings.json``,
whatever moment a kill or a full disk hits: before the rename the old folder is untouched (the ranks wrote
only into the shard folder), after it the new one is complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from reclora_ds import __version__
from reclora_ds.distributed import all_gather_variable, broadcast_object, dist_info
from reclora_ds.files import link_or_copy, save_npy_atomic, sha256_file, write_json_atomic
from reclora_ds.llm_loader import load_causal_lm, rank_device, resolve_dtype
from reclora_ds.retrieval.index import EMBEDDINGS_SIDECAR, SHARDS_DIR, write_item_embeddings
from reclora_ds.retrieval.outputs import refuse_foreign

log = logging.getLogger(__name__)

SHARD_FORMAT_VERSION = 1
DTYPES = ("auto", "float32", "bfloat16")
POOLING = "mean of the base model's last_hidden_state (post final norm) over the non-padding tokens"
SHARDING = "contiguous: rank r embeds item_index [r*n//W, (r+1)*n//W)"
TEXT_COLUMN = "description"
BACKBONE_CHECKSUM_FILES = ("reclora_backbone.json", "config.json")  # the first one present is hashed
_HASH_CHUNK_BYTES = 4 << 20


@dataclass
class ItemEmbeddingConfig:
    """Settings of an item-embedding extraction (``key=value`` overrides of ``tools/extract_item_embeddings.py``)."""

    backbone: str = "default"
    """``"default"`` (the embedded SmolLM2-135M-Instruct) or a local Hugging Face causal-LM folder."""
    batch_size: int = 32
    """Texts per forward pass."""
    max_length: int = 128
    """Tokens kept per description (longer ones are truncated and counted in ``embeddings.json``)."""
    dtype: str = "auto"
    """Weights/activations dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32`` or ``bfloat16``.
    Pooling always accumulates in float32 and the output is float32."""
    load_in_8bit: bool = False
    """Load the backbone in 8-bit with bitsandbytes (CUDA only; an error on CPU)."""
    shard_dir: str | None = None
    """Where the per-rank shards go; ``None`` means ``<parent>/.<out name>.shards``, moved into ``<out_dir>/shards``
    when the output is written. Another folder is kept as it is and must lie outside ``out_dir``."""
    bucket_by_length: bool = True
    """Sort texts by token count before batching (less padding); the output order is unchanged."""
    add_special_tokens: bool = True
    """Let the tokenizer add its special tokens (e.g. Llama's BOS) as it does for prompts; they are pooled."""
    limit_items: int | None = None
    """Debugging only: embed the first ``limit_items`` items (item_index order). The output then does not
    cover the dataset and the index builder rejects it when given the dataset's item count."""
    show_progress: bool = True
    """A tqdm bar per rank (``position=rank``)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.limit_items is not None and self.limit_items < 1:
            raise ValueError(f"limit_items must be >= 1 or None, got {self.limit_items}")
        if self.load_in_8bit and self.dtype == "float32":
            raise ValueError("load_in_8bit computes in 16-bit; use dtype=auto or bfloat16 with it")


# ----------------------------------------------------------------------------------------------------------
# Pooling and batched forward passes
# ----------------------------------------------------------------------------------------------------------


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` over the positions where ``attention_mask`` is 1, in float32.

    Args:
        hidden: [B, T, D] hidden states (any float dtype).
        attention_mask: [B, T], 1 for a real token, 0 for padding (left or right).

    Returns:
        [B, D] float32. Padded positions are excluded exactly (``where``, not a multiplication, so even
        NaN/inf in padding cannot leak); a row without any real token raises ``ValueError``.
    """
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"mean_pool needs hidden [B, T, D] and mask [B, T], got {hidden.shape}, {attention_mask.shape}"
        )
    keep = attention_mask.bool().unsqueeze(-1)  # [B, T, 1]
    counts = keep.sum(dim=1)  # [B, 1]
    if bool((counts == 0).any()):
        raise ValueError("mean_pool: a row has no real token (attention_mask all zero)")
    summed = torch.where(keep, hidden.float(), 0.0).sum(dim=1)  # [B, D]
    return summed / counts.float()


def _encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without the LM head (``LlamaModel`` inside ``LlamaForCausalLM``); itself otherwise."""
    return getattr(model, "base_model", model)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int, add_special_tokens: bool = True
) -> tuple[list[list[int]], int]:
    """Token ids of every text (no padding, at most ``max_length``) and how many were truncated.

    Truncation is the tokenizer's own (``truncation=True``), so special tokens it adds (BOS, or an EOS some
    tokenizers append) are kept and the text is cut instead.
    """
    kwargs = {"add_special_tokens": add_special_tokens, "padding": False}
    encoded = tokenizer(list(texts), truncation=False, **kwargs)["input_ids"]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
    if too_long:
        cut = tokenizer([texts[i] for i in too_long], truncation=True, max_length=max_length, **kwargs)[
            "input_ids"
        ]
        for i, ids in zip(too_long, cut):
            encoded[i] = ids
    n_truncated = len(too_long)
    token_ids = [list(ids) for ids in encoded]
    empty = [i for i, ids in enumerate(token_ids) if not ids]
    if empty:
        raise ValueError(
            f"{len(empty)} texts have no token at all (first at position {empty[0]}): {texts[empty[0]]!r}"
        )
    return token_ids, n_truncated


def batch_order(lengths: Sequence[int], batch_size: int, bucket_by_length: bool) -> list[np.ndarray]:
    """Positions of the texts, grouped into batches.

    With bucketing, the longest texts come first (an out-of-memory error shows up on the first batch) and each
    batch holds texts of similar length; the sort is stable so ties keep their input order. Without, batches
    are consecutive input positions.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable") if bucket_by_length else np.arange(len(lengths))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _pad_right(
    token_ids: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids [B, T_max] of right-padded sequences."""
    longest = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    # Real tokens get positions 0..len-1 as when alone; padding (after them, never attended under the
    # causal mask) gets any position.
    position_ids = torch.arange(longest, dtype=torch.long).expand(len(token_ids), longest)
    return input_ids, attention_mask, position_ids


@torch.inference_mode()
def embed_token_ids(
    model: torch.nn.Module,
    token_ids: Sequence[Sequence[int]],
    batch_size: int = 32,
    bucket_by_length: bool = True,
    pad_id: int = 0,
    progress: tqdm | None = None,
) -> np.ndarray:
    """Pooled last hidden states of pre-tokenized texts, float32 [N, D], row k = ``token_ids[k]``."""
    encoder = _encoder(model)
    device = _model_device(encoder)
    out: np.ndarray | None = None
    for positions in batch_order([len(ids) for ids in token_ids], batch_size, bucket_by_length):
        input_ids, attention_mask, position_ids = _pad_right([token_ids[p] for p in positions], pad_id)
        hidden = encoder(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=False,
        ).last_hidden_state  # [B, T, D], post final norm
        pooled = mean_pool(hidden, attention_mask.to(device)).cpu().numpy()  # [B, D] float32
        if out is None:
            out = np.empty((len(token_ids), pooled.shape[1]), dtype=np.float32)
        out[positions] = pooled  # back to input order
        if progress is not None:
            progress.update(len(positions))
    if out is None:
        hidden_size = getattr(getattr(encoder, "config", None), "hidden_size", 0)
        return np.empty((0, hidden_size), dtype=np.float32)
    return out


def embed_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    bucket_by_length: bool = True,
    add_special_tokens: bool = True,
    progress: tqdm | None = None,
) -> np.ndarray:
    """Embed ``texts``: one forward pass per batch, mean-pooled post-norm last hidden states.

    Args:
        model: a causal LM (its ``base_model`` is run, no LM head) or a base model, on its device.
        tokenizer: the model's tokenizer; its padding side and pad token are not used.
        texts: N strings.
        batch_size: texts per forward pass.
        max_length: tokens kept per text.
        bucket_by_length: batch texts of similar token length together (see :func:`batch_order`).
        add_special_tokens: passed to the tokenizer.
        progress: a tqdm bar advanced by the number of texts of each batch.

    Returns:
        float32 [N, D], row k = ``texts[k]``.
    """
    token_ids, n_truncated = tokenize_texts(tokenizer, texts, max_length, add_special_tokens)
    if n_truncated:
        log.warning(
            "%d of %d texts are longer than max_length=%d tokens and were truncated",
            n_truncated,
            len(texts),
            max_length,
        )
    return embed_token_ids(model, token_ids, batch_size, bucket_by_length, _pad_id(tokenizer), progress)


def _pad_id(tokenizer: Any) -> int:
    """Any valid token id for padding positions (their outputs are never used)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# ----------------------------------------------------------------------------------------------------------
# Loading the backbone
# ----------------------------------------------------------------------------------------------------------


def load_backbone(
    backbone_dir: str | os.PathLike[str], config: ItemEmbeddingConfig, device: torch.device | None = None
) -> tuple[torch.nn.Module, Any]:
    """The causal LM (eval mode, on ``device``) and tokenizer of a Hugging Face folder, with the config's dtype
    and 8-bit setting (:func:`reclora_ds.llm_loader.load_causal_lm`)."""
    return load_causal_lm(
        str(backbone_dir),
        dtype=config.dtype,
        device=device or rank_device(),
        load_in_8bit=config.load_in_8bit,
    )


# ----------------------------------------------------------------------------------------------------------
# Files: checksums, atomic writes
# ----------------------------------------------------------------------------------------------------------


def backbone_checksum(backbone_dir: Path) -> dict[str, str]:
    """sha256 of the backbone's manifest (``reclora_backbone.json``, which lists every file's sha256) or,
    for a folder without one, of its ``config.json``."""
    for name in BACKBONE_CHECKSUM_FILES:
        if (backbone_dir / name).is_file():
            return {"file": name, "sha256": sha256_file(backbone_dir / name)}
    raise FileNotFoundError(f"backbone folder {backbone_dir} has neither of {BACKBONE_CHECKSUM_FILES}")


# ----------------------------------------------------------------------------------------------------------
# Sharded extraction
# ----------------------------------------------------------------------------------------------------------


def shard_range(n_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous item_index range ``[start, stop)`` of ``rank``; sizes differ by at most one."""
    return rank * n_items // world_size, (rank + 1) * n_items // world_size


def shard_paths(shard_dir: Path, rank: int, world_size: int) -> tuple[Path, Path]:
    stem = f"rank{rank:03d}-of-{world_size:03d}"
    return shard_dir / f"{stem}.npy", shard_dir / f"{stem}.json"


@dataclass(frozen=True)
class ExtractionInputs:
    """What the items' vectors depend on, resolved once per rank."""

    dataset_dir: Path
    backbone_dir: Path
    descriptions: list[str]  # in item_index order (limited by limit_items)
    item_ids: np.ndarray  # int64, raw id of each row
    fingerprint: dict[str, Any]  # recorded in every shard and in embeddings.json


def read_inputs(
    dataset_dir: str | os.PathLike[str], config: ItemEmbeddingConfig, device: torch.device | None = None
) -> ExtractionInputs:
    """Check the dataset and backbone paths, read the items in item_index order, build the fingerprint."""
    from reclora_ds.backbone import resolve_backbone
    from reclora_ds.data.processed import ProcessedDataset

    dataset_dir = Path(dataset_dir).expanduser()
    if not dataset_dir.is_dir():
        raise FileNotFoundError(
            f"processed dataset directory {dataset_dir} does not exist (run `reclora-ds prepare`)"
        )
    dataset = ProcessedDataset(dataset_dir)  # FileNotFoundError naming metadata.json if it is not one
    items = dataset.items
    item_index = items.column("item_index").to_numpy().astype(np.int64)
    order = np.argsort(item_index, kind="stable")
    if not np.array_equal(item_index[order], np.arange(len(item_index))):
        raise ValueError(
            f"{dataset_dir}/items.parquet: item_index is not a permutation of 0..{len(item_index) - 1}"
        )
    if TEXT_COLUMN not in items.column_names:
        raise ValueError(f"{dataset_dir}/items.parquet has no {TEXT_COLUMN!r} column")
    descriptions = items.column(TEXT_COLUMN).to_pylist()
    raw_ids = items.column("item").to_numpy()
    try:
        item_ids = raw_ids.astype(np.int64)[order]
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{dataset_dir}/items.parquet: raw item ids are not integers ({raw_ids[:3]!r})"
        ) from exc
    descriptions = [descriptions[i] for i in order]
    if config.limit_items is not None:
        descriptions, item_ids = descriptions[: config.limit_items], item_ids[: config.limit_items]
    backbone_dir = resolve_backbone(config.backbone)
    fingerprint = {
        "backbone": str(backbone_dir),
        "backbone_checksum": backbone_checksum(backbone_dir),
        "dataset": str(dataset_dir),
        "dataset_metadata_sha256": sha256_file(dataset_dir / "metadata.json"),
        "text_column": TEXT_COLUMN,
        "n_items": len(descriptions),
        "limit_items": config.limit_items,
        "pooling": POOLING,
        "max_length": config.max_length,
        "add_special_tokens": config.add_special_tokens,
        "dtype": str(resolve_dtype(config.dtype, device or rank_device())).removeprefix("torch."),
        "load_in_8bit": config.load_in_8bit,
    }
    return ExtractionInputs(dataset_dir, backbone_dir, descriptions, item_ids, fingerprint)


def check_shard(shard_dir: Path, rank: int, world_size: int, fingerprint: dict[str, Any]) -> str | None:
    """Why the shard of ``rank`` cannot be reused, or ``None`` when it is complete and matches the inputs."""
    npy_path, json_path = shard_paths(shard_dir, rank, world_size)
    if not json_path.is_file():
        return f"{json_path.name} is missing"
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        return f"{json_path.name} cannot be read ({exc})"
    start, stop = shard_range(fingerprint["n_items"], rank, world_size)
    if meta.get("format_version") != SHARD_FORMAT_VERSION:
        return f"{json_path.name} has format_version {meta.get('format_version')}"
    if (meta.get("start"), meta.get("stop")) != (start, stop):
        return f"{json_path.name} covers items [{meta.get('start')}, {meta.get('stop')}), expected [{start}, {stop})"
    if meta.get("fingerprint") != fingerprint:
        changed = sorted(k for k in fingerprint if (meta.get("fingerprint") or {}).get(k) != fingerprint[k])
        return f"{json_path.name} was made from other inputs (differs in {changed})"
    if not npy_path.is_file():
        return f"{npy_path.name} is missing"
    actual = sha256_file(npy_path)
    if actual != meta.get("sha256"):
        return f"{npy_path.name} has sha256 {actual}, its JSON says {meta.get('sha256')}"
    return None


def extract_shard(
    inputs: ExtractionInputs,
    shard_dir: Path,
    config: ItemEmbeddingConfig,
    rank: int,
    world_size: int,
    device: torch.device | None = None,
    reuse_from: Sequence[Path] = (),
) -> bool:
    """Embed this rank's item range into its shard unless a valid shard is already there.

    ``reuse_from``: further folders (the ``shards/`` of the finished output being replaced) whose valid
    shard is hard-linked (or copied) into ``shard_dir`` instead of being computed again; the files there are
    only read, so that output stays loadable whatever happens to this run.

    Returns:
        True when the shard was (re)computed, False when an existing one was kept.
    """
    start, stop = shard_range(len(inputs.descriptions), rank, world_size)
    npy_path, json_path = shard_paths(shard_dir, rank, world_size)
    problem = check_shard(shard_dir, rank, world_size, inputs.fingerprint)
    for folder in reuse_from if problem is not None else ():
        if check_shard(folder, rank, world_size, inputs.fingerprint) is None:
            shard_dir.mkdir(parents=True, exist_ok=True)
            for source, target in zip(shard_paths(folder, rank, world_size), (npy_path, json_path)):
                link_or_copy(source, target)
            problem = check_shard(shard_dir, rank, world_size, inputs.fingerprint)
            break
    if problem is None:
        log.info(
            "rank %d: shard %s is complete (items [%d, %d), sha256 verified): skipped",
            rank,
            npy_path.name,
            start,
            stop,
        )
        return False
    log.info("rank %d: computing shard %s for items [%d, %d): %s", rank, npy_path.name, start, stop, problem)
    t0 = time.perf_counter()
    model, tokenizer = load_backbone(inputs.backbone_dir, config, device)
    t_load = time.perf_counter() - t0
    token_ids, n_truncated = tokenize_texts(
        tokenizer, inputs.descriptions[start:stop], config.max_length, config.add_special_tokens
    )
    with tqdm(
        total=stop - start,
        desc=f"rank {rank} embed",
        unit="item",
        position=rank,
        disable=not config.show_progress,
        leave=rank == 0,
    ) as bar:
        t1 = time.perf_counter()
        vectors = embed_token_ids(
            model, token_ids, config.batch_size, config.bucket_by_length, _pad_id(tokenizer), bar
        )
        t_embed = time.perf_counter() - t1
    if not np.isfinite(vectors).all():
        bad = start + int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise FloatingPointError(f"rank {rank}: the embedding of item_index {bad} has NaN or inf values")
    shard_dir.mkdir(parents=True, exist_ok=True)
    sha256 = save_npy_atomic(npy_path, vectors)
    write_json_atomic(
        json_path,
        {
            "format_version": SHARD_FORMAT_VERSION,
            "rank": rank,
            "world_size": world_size,
            "start": start,
            "stop": stop,
            "shape": list(vectors.shape),
            "sha256": sha256,
            "n_truncated": n_truncated,
            "fingerprint": inputs.fingerprint,
            "timings_s": {"load_model": t_load, "embed": t_embed},
            "items_per_s": (stop - start) / t_embed if t_embed > 0 else None,
        },
    )
    if n_truncated:
        log.warning(
            "rank %d: %d descriptions longer than max_length=%d were truncated",
            rank,
            n_truncated,
            config.max_length,
        )
    log.info("rank %d: wrote %s (%d x %d) in %.1f s", rank, npy_path.name, *vectors.shape, t_embed)
    return True


def work_shard_dir(out_dir: Path) -> Path:
    """Where the ranks write their shards by default: ``<parent>/.<name>.shards``, a hidden sibling of the
    output that every rank derives from ``out_dir`` alone (no communication), outside the finished output."""
    return out_dir.with_name(f".{out_dir.name}.shards")


def merge_shards(
    inputs: ExtractionInputs,
    shard_dir: Path,
    out_dir: Path,
    world_size: int,
    config: ItemEmbeddingConfig | None = None,
    move_shards: bool = False,
) -> Path:
    """Check every shard, concatenate them in rank order and write ``out_dir`` whole. Rank 0 only.

    The folder is written by :func:`reclora_ds.retrieval.index.write_item_embeddings` (temporary sibling,
    ``embeddings.json`` last with every file's size and sha256, one rename): the previous output stays
    as it was until the rename. ``move_shards``: the shard files of this run go into the new folder's
    ``shards/`` (hard links), and ``shard_dir`` is removed once the new folder is in place (a failed
    write leaves it for the next try).
    """
    parts, shards, n_truncated = [], [], 0
    for rank in range(world_size):
        problem = check_shard(shard_dir, rank, world_size, inputs.fingerprint)
        if problem is not None:
            raise RuntimeError(f"cannot merge: shard of rank {rank} in {shard_dir} is not valid: {problem}")
        npy_path, json_path = shard_paths(shard_dir, rank, world_size)
        meta = json.loads(json_path.read_text())
        parts.append(np.load(npy_path))
        n_truncated += meta["n_truncated"]
        shards.append(
            {"file": npy_path.name, "start": meta["start"], "stop": meta["stop"], "sha256": meta["sha256"]}
        )
    embeddings = np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32)  # [n_items, D]
    if embeddings.shape[0] != len(inputs.item_ids):
        raise RuntimeError(f"merged shards hold {embeddings.shape[0]} rows, expected {len(inputs.item_ids)}")
    meta = {
        "reclora_ds_version": __version__,
        **inputs.fingerprint,
        "row_rule": "row i = item_index i of items.parquet (0-based); item_ids.npy[i] = its raw id",
        "n_truncated": n_truncated,
        "world_size": world_size,
        "sharding": SHARDING,
        "shard_dir": SHARDS_DIR if move_shards else str(shard_dir),
        "shards": shards,
        "config": dataclasses.asdict(config) if config is not None else None,
    }
    moved = (
        [p for r in range(world_size) for p in shard_paths(shard_dir, r, world_size)] if move_shards else []
    )
    write_item_embeddings(out_dir, embeddings, inputs.item_ids, meta, shard_files=moved)
    if move_shards:
        shutil.rmtree(
            shard_dir, ignore_errors=True
        )  # linked into the output; also shards of other world sizes
    log.info("wrote %s: %d items x %d dims", out_dir / "embeddings.npy", *embeddings.shape)
    return out_dir


def extract_item_embeddings(
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: ItemEmbeddingConfig | None = None,
    device: torch.device | None = None,
) -> Path:
    """Embed every item of a processed dataset; every rank of the job calls this.

    Each rank embeds its contiguous shard (skipping a valid existing one); the ranks then exchange a
    success flag (a collective, so a rank that failed makes every rank raise instead of waiting at a
    barrier until the timeout); rank 0 merges into ``out_dir`` (see the module docstring) and broadcasts
    the outcome, so every rank returns once the output exists. Without a process group this is rank 0 of 1.

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: ``dataset_dir`` is missing or not a processed dataset.
        reclora_ds.backbone.BackboneError: the backbone folder is missing or incomplete.
        ValueError: ``load_in_8bit`` without CUDA, unusable items table.
        RuntimeError: another rank failed, or the merge failed.
    """
    config = config or ItemEmbeddingConfig()
    info = dist_info()
    out_dir = Path(out_dir).expanduser()
    own_shards = not config.shard_dir  # the default: a work folder beside out_dir, moved into it at the end
    shard_dir = work_shard_dir(out_dir) if own_shards else Path(config.shard_dir).expanduser()
    absolute_out, absolute_shards = Path(os.path.abspath(out_dir)), Path(os.path.abspath(shard_dir))
    if absolute_shards == absolute_out or absolute_out in absolute_shards.parents:
        raise ValueError(
            f"shard_dir={config.shard_dir!r}: lies inside the output folder {out_dir}, which is replaced whole "
            "when the embeddings are written; leave shard_dir unset (null) or give a folder outside it"
        )
    reuse = (out_dir / SHARDS_DIR,) if own_shards else ()
    device = device or rank_device()
    error: Exception | None = None
    try:
        if info.is_main:
            refuse_foreign(out_dir, EMBEDDINGS_SIDECAR)  # before any work: it would be replaced whole
        inputs = read_inputs(dataset_dir, config, device)
        extract_shard(inputs, shard_dir, config, info.rank, info.world_size, device, reuse)
    except Exception as exc:  # reported to the other ranks first, then re-raised
        error = exc
    failed = all_gather_variable(torch.tensor([error is not None], dtype=torch.int64))  # [W] (the barrier)
    if error is not None:
        raise error
    if bool(failed.any()):
        ranks = torch.nonzero(failed).flatten().tolist()
        raise RuntimeError(f"rank(s) {ranks} failed to embed their shards (see their logs); nothing merged")
    merge_error = None
    if info.is_main:
        try:
            merge_shards(inputs, shard_dir, out_dir, info.world_size, config, move_shards=own_shards)
        except Exception as exc:
            merge_error = exc
    message = broadcast_object(
        None if merge_error is None else f"{type(merge_error).__name__}: {merge_error}"
    )
    if merge_error is not None:
        raise merge_error
    if message is not None:
        raise RuntimeError(f"rank 0 failed to merge the shards: {message}")
    return out_dir
