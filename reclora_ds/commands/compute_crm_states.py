"""CRM states for stage 2: the frozen CRM's hidden vector of every sample of a split (or of listed samples).

    python -m reclora_ds.commands.compute_crm_states --checkpoint runs/quickstart/sim/checkpoints/best \
        --data runs/quickstart/prepare --split fewshot --out runs/quickstart/crm_states/fewshot.safetensors
    python -m reclora_ds.commands.compute_crm_states --checkpoint RUN_DIR --data DATA --sample-ids ids.npy --out states.npz

Eval mode, no gradients, deterministic; the library call is
:func:`reclora_ds.training.crm_states.compute_crm_states`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

from reclora_ds.config import report_user_error, run_command
from reclora_ds.training.checkpoint import load_crm
from reclora_ds.training.crm_states import (
    DEFAULT_BATCH_SIZE,
    DatasetMismatchError,
    compute_crm_states,
    save_crm_states,
)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its best)")
    parser.add_argument("--data", required=True, help="the processed dataset the CRM was trained on")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--split", help="train, valid, test or fewshot")
    which.add_argument("--sample-ids", help=".npy file of int sample ids (any splits), kept in that order")
    parser.add_argument("--out", required=True, help="output .safetensors or .npz")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-dataset-check", action="store_true", help="accept another metadata.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model, info = load_crm(args.checkpoint, args.device)
    ids = np.load(args.sample_ids) if args.sample_ids else None
    t0 = time.perf_counter()
    try:
        sample_ids, hidden = compute_crm_states(
            (model, info),
            args.data,
            split=args.split,
            sample_ids=ids,
            batch_size=args.batch_size,
            device=args.device,
            check_dataset=not args.no_dataset_check,
        )
    except DatasetMismatchError as exc:
        report_user_error(exc)
        return 2
    seconds = time.perf_counter() - t0
    metadata = {
        "model": info.model,
        "checkpoint": str(args.checkpoint),
        "step": str(info.step),
        "dataset_sha256": info.dataset.get("metadata_sha256", ""),
        "split": args.split or "sample_ids",
    }
    save_crm_states(args.out, sample_ids, hidden, metadata)
    print(
        f"{len(sample_ids):,} CRM states of width {hidden.shape[1]} -> {args.out} "
        f"({seconds:.1f} s, {len(sample_ids) / max(seconds, 1e-9):,.0f} samples/s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user's mistake prints ``error: <file/key>: <reason>`` and returns 2 (no traceback)."""
    return run_command(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
