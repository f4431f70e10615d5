"""Every registry CRM on the bundled datasets: valid and test AUC (n, 95% DeLong CI), log loss, paired tests.

    python benchmarks/crm_table.py --root runs/crm_table [--datasets quickstart ml1m goodreads]
                                   [--models all] [--seeds 42] [--nproc 1] [key=value ...]
                                   [--variant LABEL MODEL key=value ...]

For each dataset of :data:`DATASETS` (the bundled ml-latest-small as the quickstart prepares it, the ML-1M
slice and the GoodReads head of ``tests/fixtures``) the script

1. prepares it into ``<root>/<dataset>/prepare`` and runs the Long-Short Modality Retriever into
   ``<root>/<dataset>/retrieval`` (item embeddings with the default backbone, FAISS index, top-60 / top-10)
   unless those folders exist;
2. trains every model with the stage-1 command (``reclora_ds.commands.train_sim``) on the dataset's
   settings (:data:`COMMON`, the dataset's ``overrides``, then the command line's), SIM on the retrieved
   top-60 and every other model on the most recent 60 (the paper's baselines read the plain history;
   only SIM shares RecLoRA's retrieval, App. B), into ``<root>/<dataset>/<model>_s<seed>``;
   a run folder that already holds ``metrics.json`` with a test entry is reused;
3. scores every best checkpoint on every valid and test sample (``compute_crm_outputs``) and prints one
   Markdown table per dataset and split (:func:`reclora_ds.comparison.markdown_table`, reference ``sim``),
   and writes all rows to ``<root>/crm_table_<datasets>.json``.

``--no-train`` scores the finished runs and trains nothing; ``--summary`` prints each model's per-seed
best-validation and test AUC from the finished runs' metrics.json (no scoring). ``--variant LABEL MODEL key=value ...`` (repeatable) adds a row of ``MODEL`` with its own overrides under
its own name, e.g. ``--variant sim_long_only sim crm.short_term_length=0``. A model that cannot be trained
is reported and skipped. With several seeds each (model, seed) is a row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
BACKBONE_CACHE_ENV = "RECLORA_CACHE"

# raw data, prepare settings (the quickstart's for ml-latest-small; the per-dataset preset otherwise) and
# the stage-1 settings that differ from COMMON
DATASETS: dict[str, dict] = {
    "quickstart": {
        "prepare": ["--config", "launch/configs/quickstart.yaml"],
        "overrides": [],
    },
    "ml1m": {
        "prepare": [
            "--config",
            "launch/configs/prepare_ml1m.yaml",
            f"raw_dir={FIXTURES / 'ml-1m-sample'}",
            "few_shot_size=1024",
            "shards_per_split=8",
        ],
        "overrides": [],
    },
    "goodreads": {
        "prepare": [
            "--config",
            "launch/configs/prepare_goodreads.yaml",
            f"raw_dir={FIXTURES / 'goodreads'}",
            "few_shot_size=1024",
            "shards_per_split=8",
        ],
        "overrides": [],
    },
}
# One setting for every model, inside the paper's App. B.1 ranges: E=32, dropout 0, AdamW lr 5e-4,
# batch 256, tower 3 x 256 (d_c = 256), up to 10 epochs with early stopping on validation AUC (patience 2).
COMMON = [
    "crm.embedding_dim=32",
    "crm.attention_hidden=64",
    "crm.tower=[256,256,256]",
    "crm.dropout=0.0",
    "lr=0.0005",
    "batch_size=256",
    "epochs=10",
    "patience=2",
    "progress=false",
    "checkpoint_every=100000",
]
SIM_CONFIG = "launch/configs/sim_quickstart.yaml"
SPLITS = ("valid", "test")


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` (output into ``log``); return its wall time; raise on failure."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def prepare(name: str, folder: Path, nproc: int) -> None:
    """The processed dataset and its retrieval folder (skipped when they exist)."""
    data, retrieval = folder / "prepare", folder / "retrieval"
    log = folder / "prepare.log"
    folder.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    if not (data / "metadata.json").is_file():
        run([py, "-m", "reclora_ds", "prepare", *DATASETS[name]["prepare"], f"output_dir={data}"], log)
    if (retrieval / "retrieval.json").is_file():
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run([py, "tools/prepare_backbone.py"], log, env)
    run(
        [
            py,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "tools/extract_item_embeddings.py",
            "--dataset",
            str(data),
            "--out",
            str(folder / "embeddings"),
        ],
        log,
        env,
    )
    run(
        [
            py,
            "tools/build_faiss_index.py",
            "--embeddings",
            str(folder / "embeddings"),
            "--processed",
            str(data),
            "--out",
            str(folder / "index"),
        ],
        log,
        env,
    )
    run(
        [
            py,
            "tools/retrieve_histories.py",
            "--processed",
            str(data),
            "--index",
            str(folder / "index"),
            "--ks",
            "60",
            "10",
            "--out",
            str(retrieval),
        ],
        log,
        env,
    )


def recency_report(folder: Path, k: int = 60, short: int = 10) -> None:
    """How recent the retrieved top-``k`` is, per split, over the samples with more than ``k`` behaviours
    (the others get their whole history either way): the median age (behaviours back) of a retrieved
    behaviour, against ``(k + 1) / 2`` for the most recent ``k``; the share of the ``short`` most recent
    behaviours the retrieval keeps; the share of samples whose previous behaviour is not retrieved. Then
    the valid / test AUC of a single number per sample, the mean rating of its retrieved top-``k``, of its
    most recent ``k`` and of its most recent ``short`` behaviours (the label is a rating threshold)."""
    import numpy as np

    from reclora_ds.data.histories import NO_ROW, load_retrieved
    from reclora_ds.data.loader import CRMBatchLoader
    from reclora_ds.data.processed import ProcessedDataset
    from reclora_ds.metrics import auc

    ds = ProcessedDataset(folder / "prepare")
    retrieved = load_retrieved(folder / "retrieval", folder / "prepare")
    print(f"\n{folder.name}: recency of the retrieved top-{k} (samples with more than {k} behaviours)")
    print(
        f"| split | samples | with > {k} | median age retrieved (recent {k}: {(k + 1) / 2:.1f}) | "
        f"last {short} kept | previous one not kept |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for split in ("train", "valid", "test"):
        cols = ds.read_split(split, ["sample_id", "user_index", "hist_len"])
        ids = cols.column("sample_id").to_numpy()
        hist_len = cols.column("hist_len").to_numpy().astype(np.int64)
        own = ds.timelines.offsets[cols.column("user_index").to_numpy()].astype(np.int64) + hist_len
        long = hist_len > k
        rows = retrieved.lookup(ids[long], k).astype(np.int64)  # [n, k]
        age = np.where(rows != NO_ROW, own[long, None] - rows, 0)  # behaviours back, 0 = empty
        kept_recent = ((age >= 1) & (age <= short)).sum(1) / short
        print(
            f"| {split} | {len(ids):,} | {long.sum():,} ({long.mean():.0%}) | {np.median(age[age > 0]):.0f} | "
            f"{kept_recent.mean():.0%} | {(~(age == 1).any(1)).mean():.0%} |"
        )
    print(f"\n{folder.name}: AUC of one number per sample, the mean star rating of a set of its behaviours")
    print(f"| split | retrieved top-{k} | most recent {k} | most recent {short} |")
    print("|---|---:|---:|---:|")
    for split in ("valid", "test"):
        aucs = []
        for mode, length in (("retrieved", k), ("recent", k), ("recent", short)):
            loader = CRMBatchLoader(ds, split, 4096, length, mode, retrieved if mode == "retrieved" else None)
            labels, means = [], []
            for batch in loader:
                mask = batch["hist_mask"].float()
                means.append(((batch["hist_rating"] * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy())
                labels.append(batch["label"].numpy())
            aucs.append(auc(np.concatenate(labels), np.concatenate(means)))
        print(f"| {split} | " + " | ".join(f"{a:.4f}" for a in aucs) + " |")


def history_overrides(model: str, retrieval: Path) -> list[str]:
    """SIM reads the retrieved top-60 (search=precomputed); every other CRM the most recent 60."""
    if model == "sim":
        return [
            "history_mode=retrieved",
            "history_length=60",
            f"retrieval_dir={retrieval}",
            "crm.search=precomputed",
        ]
    return ["history_mode=recent", "history_length=60"]


def train(
    label: str, model: str, seed: int, folder: Path, args: argparse.Namespace, extra: list[str]
) -> Path | None:
    """One stage-1 run (reused when finished); its folder, or None when the model cannot be trained."""
    out = folder / f"{label}_s{seed}"
    metrics = out / "metrics.json"
    if metrics.is_file() and "test" in json.loads(metrics.read_text()):
        return out
    if args.no_train:
        print(f"  {label} seed {seed}: no finished run in {out}, left out (--no-train)", flush=True)
        return None
    overrides = [
        f"data_dir={folder / 'prepare'}",
        f"output_dir={out}",
        f"model={model}",
        f"seed={seed}",
        *COMMON,
        *history_overrides(model, folder / "retrieval"),
        *extra,
        *args.overrides,
    ]
    launcher = (
        [sys.executable]
        if args.nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(args.nproc),
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        wall = run(
            [*launcher, "-m", "reclora_ds.commands.train_sim", "--config", SIM_CONFIG, *overrides],
            folder / f"{label}_s{seed}.log",
            env,
        )
    except RuntimeError as exc:
        print(f"  {label} seed {seed}: {exc}", flush=True)
        return None
    print(f"  {label} seed {seed}: trained in {wall:.0f} s", flush=True)
    return out


def score(folder: Path, runs: dict[str, Path]) -> list[dict]:
    """Every run on every sample of valid and test: comparison rows, printed as Markdown tables."""
    import numpy as np

    from reclora_ds.comparison import compare_on_same_samples, markdown_table
    from reclora_ds.data.loader import split_sample_ids
    from reclora_ds.data.processed import ProcessedDataset
    from reclora_ds.training.crm_states import compute_crm_outputs

    ds = ProcessedDataset(folder / "prepare")
    rows = []
    for split in SPLITS:
        ids = split_sample_ids(ds, split)
        table = ds.read_split(split, ["sample_id", "label"])
        order = np.argsort(table.column("sample_id").to_numpy())
        labels = table.column("label").to_numpy()[order].astype(np.float64)  # ids are sorted the same way
        probs = {}
        for name, path in runs.items():
            got, _, logits = compute_crm_outputs(path, ds, sample_ids=ids)
            assert np.array_equal(got, ids)
            probs[name] = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        reference = next((n for n in probs if n.startswith("sim")), next(iter(probs)))
        split_rows = compare_on_same_samples(labels, probs, reference)
        for row in split_rows:
            metrics = json.loads((runs[row["model"]] / "metrics.json").read_text())
            row |= {
                "dataset": folder.name,
                "split": split,
                "best_epoch": metrics["best"]["epoch"],
                "epochs_run": metrics["epochs_run"],
            }
        print(f"\n{folder.name}, {split}: {len(ids):,} samples, the same for every model")
        print(markdown_table(split_rows))
        rows += split_rows
    return rows


def seed_summary(folder: Path, labels: list[str], seeds: list[int]) -> None:
    """Per model, each seed's best-validation AUC and its test AUC (from the runs' metrics.json), their
    mean and sample standard deviation: a Markdown table of the finished runs (nothing is trained)."""
    import statistics

    print(f"\n{folder.name}: best-validation epoch of each seed ({', '.join(map(str, seeds))})")
    print("| model | valid AUC per seed | valid mean (sd) | test AUC per seed | test mean |")
    print("|---|---|---|---|---|")
    for label in labels:
        valid, test = [], []
        for seed in seeds:
            metrics = folder / f"{label}_s{seed}" / "metrics.json"
            if metrics.is_file() and "test" in (m := json.loads(metrics.read_text())):
                valid.append(m["best"]["valid_auc"])
                test.append(m["test"]["auc"])
        if not valid:
            continue
        sd = f"{statistics.stdev(valid):.4f}" if len(valid) > 1 else "-"
        print(
            f"| {label} | {' / '.join(f'{v:.4f}' for v in valid)} | {statistics.mean(valid):.4f} ({sd}) | "
            f"{' / '.join(f'{t:.4f}' for t in test)} | {statistics.mean(test):.4f} |"
        )


def main() -> None:
    from reclora_ds.models.registry import CRM_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/crm_table", help="datasets, runs and the table go here")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument(
        "--models", nargs="+", default=["all"], help=f"'all', 'none' or some of {sorted(CRM_MODELS)}"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--nproc", type=int, default=1, help="ranks per training run (1: one process)")
    parser.add_argument(
        "--recency", action="store_true", help="only print how recent the retrieved top-60 is"
    )
    parser.add_argument("--no-train", action="store_true", help="score the finished runs only; train none")
    parser.add_argument(
        "--summary", action="store_true", help="only print each model's per-seed AUCs from finished runs"
    )
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="LABEL MODEL [key=value]",
        help="one more row: MODEL trained with these overrides, named LABEL (repeatable)",
    )
    parser.add_argument("overrides", nargs="*", help="CRMTrainConfig overrides for every run")
    args = parser.parse_intermixed_args()
    models = [] if args.models == ["none"] else list(CRM_MODELS) if args.models == ["all"] else args.models
    rows_to_run = [(name, name, []) for name in models]
    for variant in args.variant:
        if len(variant) < 2 or any("=" not in kv for kv in variant[2:]):
            parser.error(f"--variant {' '.join(variant)}: expected LABEL MODEL key=value ...")
        rows_to_run.append((variant[0], variant[1], variant[2:]))
    unknown = sorted({model for _, model, _ in rows_to_run} - set(CRM_MODELS))
    if unknown:
        parser.error(f"--models / --variant: unknown {unknown}; registry: {sorted(CRM_MODELS)}")
    root = Path(args.root).resolve()
    rows = []
    for name in args.datasets:
        folder = root / name
        print(f"{name}: preparing / retrieving into {folder}", flush=True)
        if args.summary:
            seed_summary(folder, [label for label, _, _ in rows_to_run], args.seeds)
            continue
        prepare(name, folder, max(2, args.nproc))
        if args.recency:
            recency_report(folder)
            continue
        runs = {}
        for label, model, extra in rows_to_run:
            for seed in args.seeds:
                out = train(label, model, seed, folder, args, [*DATASETS[name]["overrides"], *extra])
                if out is not None:
                    runs[label if len(args.seeds) == 1 else f"{label}_s{seed}"] = out
        if runs:
            rows += score(folder, runs)
    if args.recency or args.summary:
        return
    out = root / f"crm_table_{'_'.join(args.datasets)}.json"
    out.write_text(json.dumps({"args": vars(args), "common": COMMON, "rows": rows}, indent=1, default=float))
    print(f"\nrows written to {out}")


if __name__ == "__main__":
    main()
