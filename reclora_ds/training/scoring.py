"""Per-sample p(yes) of a processed split, scored by a trained stage-2 run or by the zero-shot backbone.

::

    scoring = load_scoring_model(run_dir="runs/quickstart/plora")        # its adapter/ and config.yaml
    scoring = load_scoring_model(config=cfg)                             # cfg.mode == "zero_shot"
    path = score_split(scoring, "test", "scores.parquet", max_samples=2000, batch_size=32)

(``tools/score.py`` is the command line.) The output holds one row per sample, in the split's order (the
processed splits are in ascending ``sample_id``)::

    sample_id  int64     the processed dataset's sample id
    user       raw user id (users.parquet ``user``)
    item       raw item id (items.parquet ``item``)
    label      int8      1 = the user liked the item
    p          float64   p(yes) = softmax([s_yes, s_no])[0] at the answer position (the model's float32)

The model is the one the run trained: :func:`load_rec_llm` rebuilds the RecLLM from the exported adapter
folder alone (its ``rec_llm.json``: mode, RecLLM settings, CRM description, answer tokens), loads the PLoRA
adapter strictly (:func:`reclora_ds.training.adapter_io.load_plora_adapter`) or peft's LoRA (every LoRA tensor
must be in the file), and checks the CRM and the answer tokens against what the run recorded. The batches
are the recipe's evaluation batches (:class:`~reclora_ds.training.plora_data.PLoRABatchLoader`, prompt only,
split order, the run's prompt and CRM-history settings from its ``config.yaml``), scored with
:meth:`~reclora_ds.models.rec_llm.RecLLM.score`: with the run's ``eval_batch_size`` the rows and p equal
the ones behind the run's final metrics.

``max_samples`` scores a seeded uniform sample of N sample ids of the split (``eval_subset_seed``: the ids a
stage-2 run with ``eval_max_samples=N`` evaluated, whatever the number of ranks). Under ``torchrun`` every rank scores its shard (the
loader's per-rank files or rows) and rank 0 writes the gathered rows
(:func:`reclora_ds.distributed.all_gather_variable`), checked to be each wanted sample exactly once.
Files are written atomically (:func:`reclora_ds.files.atomic_file`): ``.parquet`` or ``.csv``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from reclora_ds import distributed as dist_utils
from reclora_ds.config import load_config
from reclora_ds.cpu import enable_cpu_extras
from reclora_ds.data.loader import uniform_sample_ids
from reclora_ds.data.processed import ALL_SPLITS, ProcessedDataset
from reclora_ds.data.prompts import PromptEncoder
from reclora_ds.files import atomic_file
from reclora_ds.llm_loader import rank_device
from reclora_ds.models.rec_llm import RecLLM
from reclora_ds.training.plora_config import PLoRATrainConfig
from reclora_ds.training.plora_data import PLoRABatchLoader, history_settings
from reclora_ds.training.plora_recipe import (
    ADAPTER_DIR,
    enable_backbone_kernels,
    find_ds_config,
    stage2_dtype,
    to_device,
)
from reclora_ds.training.rec_llm_io import RecLLMFileError, build_rec_llm, load_rec_llm

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("sample_id", "user", "item", "label", "p")
OUTPUT_FORMATS = (".parquet", ".csv")
RUN_CONFIG_FILE = "config.yaml"
DEFAULT_BATCH_SIZE = 0
"""0: the run's ``eval_batch_size``."""


class ScoringError(ValueError):
    """The inputs do not allow scoring (missing run folder or adapter, bad output path); a mismatched CRM or
    adapter raises :class:`reclora_ds.training.rec_llm_io.RecLLMFileError`."""


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ScoringModel:
    """A RecLLM ready to score, with the stage-2 settings that build its batches."""

    model: RecLLM
    tokenizer: Any
    crm_info: Any
    """The CRM checkpoint's CRMCheckpointInfo (``None`` without a CRM)."""
    cfg: PLoRATrainConfig
    """Data, prompt and CRM-history settings (``data_dir``, ``short_history``, ``max_length``...)."""
    source: str
    """The adapter folder, or ``zero_shot:<backbone>``."""


def _strip_section(overrides: Sequence[str], section: str = "plora") -> list[str]:
    return [o.removeprefix(f"{section}.") for o in overrides]


def read_run_config(run_dir: str | os.PathLike[str], overrides: Sequence[str] = ()) -> PLoRATrainConfig:
    """The resolved PLoRATrainConfig a stage-2 run saved (``<run>/config.yaml``), with dotted overrides."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ScoringError(f"{run}: no such run folder (the output_dir of launch/train_plora.py)")
    path = run / RUN_CONFIG_FILE
    if not path.is_file():
        raise ScoringError(f"{path}: missing; {run} is not a stage-2 run folder")
    return load_config(PLoRATrainConfig, path, _strip_section(overrides))


def load_scoring_model(
    run_dir: str | os.PathLike[str] | None = None,
    config: PLoRATrainConfig | None = None,
    *,
    mode: str | None = None,
    overrides: Sequence[str] = (),
) -> ScoringModel:
    """The model and settings to score with: a trained run, or the zero-shot backbone of a config.

    Args:
        run_dir: a stage-2 run folder (its ``config.yaml`` and ``adapter/``); its mode decides the model.
        config: the settings without a run (mode ``zero_shot`` only); ignored when ``run_dir`` is given.
        mode: ``zero_shot`` scores the bare backbone with the run's or config's data settings; another
            value must be the run's mode.
        overrides: dotted overrides of the run's config (``data_dir=...``, ``backbone=...``).

    Raises:
        ScoringError: no run folder / config, no exported adapter, a mode that does not fit.
    """
    if run_dir is not None:
        cfg = read_run_config(run_dir, overrides)
    elif config is not None:
        cfg = config
    else:
        raise ScoringError("give a run folder (--run) or a config with mode zero_shot")
    if mode is not None and mode != cfg.mode:
        if mode != "zero_shot":
            where = f"the run {run_dir}" if run_dir is not None else "the config"
            raise ScoringError(f"mode {mode!r} but {where} has mode {cfg.mode!r}")
        cfg = dataclasses.replace(cfg, mode="zero_shot")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.mode == "zero_shot":
        ds_config = json.loads(find_ds_config(cfg.deepspeed_config).read_text())
        dtype = stage2_dtype(cfg, ds_config, rank_device())  # what training would have used
        model, tokenizer, crm_info = build_rec_llm(cfg, dtype)
        model.eval()
        return ScoringModel(model, tokenizer, crm_info, cfg, f"zero_shot:{cfg.backbone}")
    if run_dir is None:
        raise ScoringError(f"mode {cfg.mode!r} needs the trained run folder (--run)")
    adapter = Path(run_dir) / ADAPTER_DIR
    if not adapter.is_dir():
        raise ScoringError(
            f"{adapter}: missing; the run has no exported adapter (it exports one when training ends)"
        )
    try:
        model, tokenizer, crm_info = load_rec_llm(adapter, backbone=cfg.backbone, crm_path=cfg.crm_path)
    except RecLLMFileError as exc:
        raise ScoringError(str(exc)) from exc
    return ScoringModel(model, tokenizer, crm_info, cfg, str(adapter))


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------


def eval_loader(
    scoring: ScoringModel,
    dataset: ProcessedDataset,
    split: str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    sample_ids: np.ndarray | None = None,
) -> PLoRABatchLoader:
    """Prompt-only batches of ``split`` (or of its ``sample_ids``) in split order, built as the recipe's
    evaluation loaders are (each rank its part; no padding to even batches: scoring has no collective per
    batch)."""
    cfg = scoring.cfg
    encoder = PromptEncoder(scoring.tokenizer, dataset.metadata["dataset"], cfg.max_length)
    return PLoRABatchLoader(
        dataset,
        split,
        batch_size,
        encoder,
        with_answer=False,
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
        shuffle=False,
        drop_last=False,
        even_batches=False,
        sample_ids=sample_ids,
        **history_settings(cfg, scoring.crm_info),
    )


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------


def _place(model: RecLLM, device: torch.device, load_in_8bit: bool) -> None:
    if not load_in_8bit:
        model.to(device)
    elif model.crm is not None:  # an 8-bit LLM sits on its GPU since loading
        model.crm.to(device)


@torch.no_grad()
def score_table(
    scoring: ScoringModel,
    split: str,
    *,
    max_samples: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> pa.Table | None:
    """p(yes) of ``split`` (or its uniform ``max_samples`` subset; 0: all) as a table of :data:`OUTPUT_COLUMNS`.

    Collective under a process group: every rank scores its shard; rank 0 gets the table, the others
    ``None``. ``batch_size`` 0 takes the config's ``eval_batch_size``.

    Raises:
        ScoringError: an unknown split, a negative ``max_samples`` / ``batch_size``, another dataset than the
            run's; RuntimeError when the gathered rows are not each wanted sample exactly once.
    """
    cfg = scoring.cfg
    if max_samples < 0 or batch_size < 0:
        raise ScoringError(f"need max_samples >= 0 and batch_size >= 0, got {max_samples}, {batch_size}")
    dataset = ProcessedDataset(cfg.data_dir)
    if split not in dataset.metadata["shards"]:
        raise ScoringError(
            f"unknown split {split!r}; {cfg.data_dir} has {sorted(dataset.metadata['shards'])}"
        )
    info = dist_utils.dist_info()
    device = torch.device(device) if device is not None else rank_device()
    samples = dataset.read_split(split, ["sample_id", "user_index", "item_index", "label"])
    subset = None
    if max_samples and max_samples < samples.num_rows:
        subset = uniform_sample_ids(dataset, split, max_samples, cfg.eval_subset_seed)
        samples = samples.filter(pa.array(np.isin(samples.column("sample_id").to_numpy(), subset)))
    split_ids = samples.column("sample_id").to_numpy()
    by_id = np.argsort(split_ids, kind="stable")

    def positions(ids: np.ndarray) -> np.ndarray:
        """Positions in the output (split order) of scored sample ids."""
        return by_id[np.searchsorted(split_ids, ids, sorter=by_id)]

    loader = eval_loader(
        scoring, dataset, split, batch_size or cfg.eval_batch_size, info.rank, info.world_size, subset
    )
    model = scoring.model
    # a run's config is scored as it trained: its cpu_attention_form is not judged again (it was when it
    # trained), it only says how the CPU kernel runs where the scoring attention is eager_fused
    form = None
    if device.type == "cpu":  # else each batch page-faults its temporaries back in (docs/PLORA_BENCH.md)
        enable_cpu_extras(allocator=True)
        form = enable_backbone_kernels(scoring.cfg, (scoring.cfg.attn_implementation,))
    if info.is_main:
        log.info(
            "attention %s on %s, CPU attention kernel %s (plora.cpu_attention_form=%s)",
            scoring.cfg.attn_implementation,
            device.type,
            form or "none",
            scoring.cfg.cpu_attention_form,
        )
    _place(model, device, scoring.cfg.load_in_8bit)
    model.eval()
    ids, labels, probs = [], [], []
    bar = tqdm(
        total=loader.num_samples,
        desc=f"score {split}",
        unit=" samples",
        disable=not (progress and info.is_main),
        dynamic_ncols=True,
    )
    for batch in loader:
        probs.append(model.score(to_device(batch, device)).double().cpu())
        ids.append(batch["sample_id"])
        labels.append(batch["label"])
        bar.update(len(batch["sample_id"]))
    bar.close()

    got_ids = dist_utils.all_gather_variable(_cat(ids, torch.int64))
    got_labels = dist_utils.all_gather_variable(_cat(labels, torch.float32))
    got_p = dist_utils.all_gather_variable(_cat(probs, torch.float64))
    if not info.is_main:
        return None
    return _assemble(dataset, samples, got_ids.numpy(), got_labels.numpy(), got_p.numpy(), positions)


def _cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)


def _assemble(
    dataset: ProcessedDataset,
    samples: pa.Table,
    ids: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    positions: Any,
) -> pa.Table:
    """The output table in split order; checks that every wanted sample was scored exactly once."""
    wanted = samples.column("sample_id").to_numpy()
    unique, counts = np.unique(ids, return_counts=True)
    if len(ids) != len(wanted) or len(unique) != len(ids) or not np.array_equal(unique, np.sort(wanted)):
        raise RuntimeError(
            f"scored {len(ids)} rows ({len(unique)} distinct sample ids, {int((counts > 1).sum())} repeated) "
            f"for {len(wanted)} wanted samples"
        )
    pos = positions(ids)
    p = np.empty(len(wanted), dtype=np.float64)
    p[pos] = probs
    label = samples.column("label").to_numpy()
    batch_label = np.empty(len(wanted), dtype=np.float64)
    batch_label[pos] = labels
    if not np.array_equal(batch_label, label.astype(np.float64)):
        raise RuntimeError("the batches' labels differ from the split's")
    users = dataset.users.column("user").take(samples.column("user_index"))
    items = dataset.items.column("item").take(samples.column("item_index"))
    return pa.table(
        {
            "sample_id": samples.column("sample_id"),
            "user": users,
            "item": items,
            "label": samples.column("label"),
            "p": pa.array(p, pa.float64()),
        }
    )


def check_output_path(out: str | os.PathLike[str]) -> Path:
    """``out`` if it ends in .parquet or .csv and its folder can be created; ScoringError otherwise."""
    path = Path(out)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise ScoringError(f"{path}: the output must end in {' or '.join(OUTPUT_FORMATS)}")
    if path.is_dir():
        raise ScoringError(f"{path}: is a folder; give a file name")
    return path


def write_scores(
    table: pa.Table, out: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the table atomically as Parquet (with ``metadata`` in its schema) or CSV, by the suffix."""
    path = check_output_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet" and metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_file(path) as tmp:
        if path.suffix.lower() == ".parquet":
            pq.write_table(table, tmp)
        else:
            pacsv.write_csv(table, tmp)
    return path


def score_split(
    scoring: ScoringModel,
    split: str,
    out: str | os.PathLike[str],
    *,
    max_samples: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path | None:
    """Score ``split`` (:func:`score_table`) and write the rows to ``out`` on rank 0; returns the path there
    (``None`` on the other ranks). Collective under a process group."""
    if split not in ALL_SPLITS:
        raise ScoringError(f"unknown split {split!r}; one of {list(ALL_SPLITS)}")
    path = check_output_path(out)
    table = score_table(
        scoring, split, max_samples=max_samples, batch_size=batch_size, device=device, progress=progress
    )
    written = None
    if table is not None:
        metadata = {
            "reclora_ds.scores": json.dumps(
                {
                    "source": scoring.source,
                    "mode": scoring.cfg.mode,
                    "split": split,
                    "data_dir": scoring.cfg.data_dir,
                }
            )
        }
        written = write_scores(table, path, metadata)
        log.info("%d scores of %s -> %s", table.num_rows, split, written)
    dist_utils.barrier()
    return written
