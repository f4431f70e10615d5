"""Compare trained CRMs on the same samples of a split: AUC with 95% CI, log loss, paired DeLong tests.

    python -m reclora_ds.commands.compare_crms --data runs/quickstart/prepare --split test \
        sim_top60=runs/quickstart/sim sim_soft=runs/crm/sim_soft din_recent60=runs/crm/din_recent60

Each ``name=run`` is a stage-1 run folder (its best checkpoint) or checkpoint folder; every CRM scores every
sample of the split (or a seeded uniform subset, ``--max-samples``) on the histories it was trained on, and
each is tested against the first (``--reference`` picks another). Library: :mod:`reclora_ds.comparison`.
Exit status 2 with an ``error:`` line for a missing run, another dataset, or a bad argument.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from reclora_ds.comparison import compare_on_same_samples, markdown_table
from reclora_ds.data.loader import split_sample_ids, uniform_sample_ids
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.training.checkpoint import CheckpointError
from reclora_ds.training.crm_states import DatasetMismatchError, compute_crm_outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the processed dataset the CRMs were trained on")
    parser.add_argument("--split", default="test", help="train, valid, test or fewshot (default test)")
    parser.add_argument("--max-samples", type=int, default=0, help="a seeded uniform subset; 0 = the split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the uniform subset")
    parser.add_argument("--reference", help="the model the others are tested against (default the first)")
    parser.add_argument("--alpha", type=float, default=0.05, help="level of the verdict column")
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN", help="named stage-1 runs or checkpoints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    named = [r.partition("=") for r in args.runs]
    if any(not sep or not name or not path for name, sep, path in named):
        parser.error("each run is NAME=PATH")
    names = [name for name, _, _ in named]
    if len(set(names)) != len(names):
        parser.error(f"model names must differ, got {names}")
    try:
        ds = ProcessedDataset(args.data)
        if args.max_samples:
            ids = uniform_sample_ids(ds, args.split, args.max_samples, args.seed)
        else:
            ids = split_sample_ids(ds, args.split)
        table = ds.read_split(args.split, ["sample_id", "label"])
        order = np.argsort(table.column("sample_id").to_numpy())
        position = order[np.searchsorted(table.column("sample_id").to_numpy(), ids, sorter=order)]
        labels = table.column("label").to_numpy()[position].astype(np.float64)
        probs = {}
        for name, _, path in named:
            got_ids, _, logits = compute_crm_outputs(path, ds, sample_ids=ids)
            if not np.array_equal(got_ids, ids):
                raise RuntimeError(f"{name} scored other samples than asked")
            probs[name] = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        rows = compare_on_same_samples(labels, probs, args.reference or names[0])
    except (FileNotFoundError, ValueError, KeyError, CheckpointError, DatasetMismatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.split} of {args.data}: {len(ids):,} samples, the same for every model")
    print(markdown_table(rows, args.alpha))
    return 0


if __name__ == "__main__":
    sys.exit(main())
