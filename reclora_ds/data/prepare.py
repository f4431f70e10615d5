"""Stage 0 as a library call: :func:`prepare_dataset` reads raw files and writes a processed dataset.

Safety of the output (``docs/DATA_SAFETY.md``): :func:`check_prepare_paths` runs before anything is read
and refuses (all problems together, as a :class:`~reclora_ds.config.ConfigError`) an ``output_dir`` that
is the current folder, lies under a file, cannot be created, holds the raw data or the config file, or
exists with anything but an earlier ``prepare`` output in it (:func:`own_output_problem`). The dataset is
then built in a temporary sibling folder and renamed into place (:func:`reclora_ds.files.atomic_dir`): a
rerun leaves the old output or the new one, never a mix, and no user file is overwritten or deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reclora_ds import __version__
from reclora_ds.batch import OOV_ID, PAD_ID
from reclora_ds.config import STAGE_CONFIG_FILE, ConfigError, config_to_dict, output_dir_problems, save_config
from reclora_ds.data.config import PrepareConfig, bundled_dataset
from reclora_ds.data.errors import DropLog
from reclora_ds.data.preprocess import SPLITS, Prepared, prepare
from reclora_ds.data.processed import SCHEMA_VERSION, write_processed
from reclora_ds.data.raw import read_raw
from reclora_ds.data.report import plot_summary
from reclora_ds.data.specs import DATASET_SPECS, DatasetSpec
from reclora_ds.files import atomic_dir, sha256_file, write_text_atomic

log = logging.getLogger(__name__)

HISTORY_COPY_LENGTH = 60  # what a per-sample copy of the long history would hold (ids + ratings)


__all__ = ["PrepareResult", "bundled_dataset", "check_prepare_paths", "own_output_problem", "prepare_dataset"]

# What a prepare output folder holds (processed.py's layout); anything else in it is not ours.
OUTPUT_ENTRIES = frozenset(
    {
        "metadata.json",
        "config.yaml",
        "run_info.json",
        "summary.png",
        "samples",
        "timelines.parquet",
        "users.parquet",
        "items.parquet",
        "vocabs.json",
        STAGE_CONFIG_FILE,  # the pipeline's copy of the stage config, carried over to the new folder
    }
)


def own_output_problem(folder: Path) -> str | None:
    """None when ``folder`` is an earlier ``prepare`` output (a ``metadata.json`` with its schema and
    dataset, and nothing but the files prepare writes); else what makes it not one."""
    meta = folder / "metadata.json"
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return "no readable metadata.json of a processed dataset"
    if not isinstance(data, dict) or "schema_version" not in data or "dataset" not in data:
        return "its metadata.json is not a processed dataset's"
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in OUTPUT_ENTRIES)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        return f"it also holds {', '.join(foreign[:5])}{more}, which prepare did not write"
    return None


def check_prepare_paths(cfg: PrepareConfig, config_path: str | Path | None = None) -> None:
    """Refuse, before any heavy work, an output location that is unsafe (see the module docstring).

    Raises:
        ConfigError: every problem, with the key it concerns.
    """
    problems = []
    raw = cfg.raw_path  # a missing raw folder is reported by the reader first thing, naming its layout
    protected: list[str | Path] = [raw]
    if config_path is not None:
        protected.append(config_path)
    problems += output_dir_problems(
        cfg.output_dir, "output_dir", is_own_output=own_output_problem, protected=protected
    )
    if problems:
        raise ConfigError(problems, str(config_path) if config_path else "<command line>")


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class PrepareResult:
    output_dir: Path
    metadata: dict[str, Any]
    timings: dict[str, float]

    def summary(self) -> str:
        """Human-readable table of the run: counts, splits, label rates, drops, storage, time."""
        m = self.metadata
        c = m["counts"]
        lines = [
            f"processed {m['dataset']} -> {self.output_dir}",
            f"  raw rows {c['raw_rows']:,}  kept interactions {c['interactions']:,}  samples {c['samples']:,}  "
            f"users {c['users']:,}  items {c['items']:,}",
        ]
        for split, s in m["splits"].items():
            lines.append(f"  {split:<8} {s['rows']:>11,} rows  label rate {s['label_rate']:.4f}")
        if m["drops"]:
            lines.append("  dropped rows by reason:")
            lines += [f"    {r:<24} {d['count']:>11,}  ({d['why']})" for r, d in m["drops"].items()]
        h = m["history_storage"]
        lines.append(
            f"  histories: timelines {h['timeline_bytes'] / 2**20:.1f} MiB vs {h['copied_bytes'] / 2**20:.1f} MiB "
            f"for {HISTORY_COPY_LENGTH} copied ids+ratings per sample ({h['ratio']:.1f}x smaller)"
        )
        lines.append(
            "  vocab sizes: " + ", ".join(f"{k}={v['vocab_size']:,}" for k, v in m["fields"].items())
        )
        lines.append(
            "  time: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items() if k != "peak_rss_mib")
            + f"; peak RSS {self.timings['peak_rss_mib']:.0f} MiB"
        )
        return "\n".join(lines)


def _split_stats(p: Prepared, ids: np.ndarray) -> dict[str, Any]:
    labels = p.label_g[ids]
    return {
        "rows": int(len(ids)),
        "positives": int(labels.sum()),
        "label_rate": float(labels.mean()) if len(ids) else 0.0,
        "first_sample_id": int(ids[0]) if len(ids) else None,
        "last_sample_id": int(ids[-1]) if len(ids) else None,
        "first_timestamp": int(p.timestamp_g[ids[0]]) if len(ids) else None,
        "last_timestamp": int(p.timestamp_g[ids[-1]]) if len(ids) else None,
    }


def history_storage(p: Prepared) -> dict[str, Any]:
    """Bytes of the per-user timelines vs a per-sample copy of the last 60 ids and ratings."""
    timeline = p.item_index_g.nbytes + p.rating_g.nbytes + p.timestamp_g.nbytes + p.label_g.nbytes
    timeline += p.timeline_offsets.nbytes + len(p.sample_ids) * 4  # + hist_len per sample
    copied = len(p.sample_ids) * HISTORY_COPY_LENGTH * (4 + 4)  # int32 id + float32 rating
    return {"timeline_bytes": int(timeline), "copied_bytes": int(copied), "ratio": copied / max(timeline, 1)}


def build_metadata(
    cfg: PrepareConfig,
    spec: DatasetSpec,
    p: Prepared,
    raw_rows: int,
    drops: DropLog,
    meta_drops: DropLog,
    raw_files: list[Path],
    raw_dir: Path,
) -> dict[str, Any]:
    fields = {}
    for field, (table, column) in spec.feature_columns().items():
        fields[field] = {"source": table[:-1], "column": column, "vocab_size": p.vocabs[field].size}
    accounted = len(p.sample_ids) + drops.total
    if accounted != raw_rows:
        raise RuntimeError(
            f"row accounting broken: raw {raw_rows} != samples {len(p.sample_ids)} + drops {drops.total}"
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "reclora_ds_version": __version__,
        "dataset": spec.name,
        "item_noun": spec.item_noun,
        "label_rule": spec.label_rule,
        "category_field": spec.category_field,
        "fields": fields,
        "vocab": {
            "pad_id": PAD_ID,
            "oov_id": OOV_ID,
            "built_from": "train era: every kept interaction up to and including the last training sample "
            "(histories included); later users, items and values map to oov_id",
        },
        "counts": {
            "raw_rows": raw_rows,
            "interactions": len(p.user_index_g),
            "samples": len(p.sample_ids),
            "users": p.users.num_rows,
            "items": p.items.num_rows,
        },
        "accounting": {"raw_rows": raw_rows, "samples": len(p.sample_ids), "dropped": drops.total},
        "splits": {s: _split_stats(p, p.split_ids(s)) for s in SPLITS}
        | {"fewshot": _split_stats(p, p.fewshot_ids) | {"seed": cfg.seed}},
        "drops": drops.to_json(),
        "metadata_drops": meta_drops.to_json(),
        "history_storage": history_storage(p),
        "raw_files": [
            {"name": str(f.relative_to(raw_dir)), "bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in raw_files
        ],
        "raw_dir": str(raw_dir),
        "config": config_to_dict(cfg),
    }


def prepare_dataset(cfg: PrepareConfig, config_path: str | Path | None = None) -> PrepareResult:
    """Read ``cfg.raw_dir``, run the recipe, write ``cfg.output_dir`` (built beside it, renamed into place).

    Args:
        config_path: the config file ``cfg`` came from, which the output may not replace.
    Raises:
        ConfigError: unsafe paths (:func:`check_prepare_paths`), before anything is read.
        RawDataError: a raw file cannot be used, or the settings leave no sample (names the file or key).
    """
    check_prepare_paths(cfg, config_path)
    spec = DATASET_SPECS[cfg.dataset]
    raw_dir = cfg.raw_path
    out = Path(cfg.output_dir).expanduser()
    timings: dict[str, float] = {}
    drops, meta_drops = DropLog(strict=cfg.strict), DropLog(strict=cfg.strict)

    t0 = time.perf_counter()
    raw = read_raw(
        cfg.dataset, raw_dir, drops, meta_drops, batch_rows=cfg.batch_rows, goodreads=cfg.goodreads
    )
    timings["read"] = time.perf_counter() - t0
    log.info("read %d raw rows from %s", raw.raw_rows, raw_dir)

    log.info("ordering, filtering, splitting and encoding %d interactions", len(raw.interactions))
    t0 = time.perf_counter()
    p = prepare(
        raw,
        spec,
        min_history=cfg.min_history,
        kcore=cfg.kcore,
        split=cfg.split,
        few_shot_size=cfg.few_shot_size,
        seed=cfg.seed,
    )
    timings["process"] = time.perf_counter() - t0

    log.info("writing %s", out)
    t0 = time.perf_counter()
    metadata = build_metadata(cfg, spec, p, raw.raw_rows, drops, meta_drops, raw.files, raw_dir)
    check_prepare_paths(cfg, config_path)  # again: the folder may have changed while the data was read
    with atomic_dir(out) as tmp:
        if (out / STAGE_CONFIG_FILE).is_file():
            shutil.copy2(out / STAGE_CONFIG_FILE, tmp / STAGE_CONFIG_FILE)
        metadata["shards"] = write_processed(p, spec, tmp, cfg.shards_per_split, metadata)
        save_config(cfg, tmp / "config.yaml")
        plot_summary(p, f"{spec.name}: {len(p.sample_ids):,} samples from {raw_dir}", tmp / "summary.png")
        timings["write"] = time.perf_counter() - t0
        timings["total"] = sum(timings.values())
        timings["peak_rss_mib"] = peak_rss_mib()
        write_text_atomic(
            tmp / "run_info.json",
            json.dumps({"timings_s": timings, "reclora_ds_version": __version__}, indent=2),
        )
    return PrepareResult(out, metadata, timings)
