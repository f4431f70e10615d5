"""Embed every item description of a processed dataset with the LLM (sharded over ranks).

    python -m reclora_ds.commands.extract_item_embeddings --dataset runs/ml25m/data --out runs/ml25m/emb \
        [--backbone default|PATH] [batch_size=64 max_length=128 dtype=bfloat16 ...]
    torchrun --nproc_per_node 8 -m reclora_ds.commands.extract_item_embeddings --dataset ... --out ...
    deepspeed --num_gpus 8 --module reclora_ds.commands.extract_item_embeddings --dataset ... --out ...

``key=value`` arguments set fields of ``ItemEmbeddingConfig`` (``reclora_ds/retrieval/embeddings.py``, where the
output files, the pooling and the sharding are described). A rerun reuses the finished shards. Exit status 2
with an ``error:`` line when the dataset or backbone is missing or a setting is invalid.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence

from reclora_ds.backbone import BackboneError
from reclora_ds.config import ConfigError, check_output_location, load_config, report_user_error, run_command
from reclora_ds.distributed import destroy, dist_info, init_distributed, run_and_exit
from reclora_ds.retrieval.embeddings import ItemEmbeddingConfig, extract_item_embeddings

# A rank that finishes its shard early waits at a barrier for the slowest one (torch's default is 30 min).
DEFAULT_TIMEOUT_S = 6 * 3600.0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="processed dataset directory (with items.parquet)")
    ap.add_argument(
        "--out", required=True, help="output directory (embeddings.npy, item_ids.npy, embeddings.json)"
    )
    ap.add_argument("--backbone", help="'default' or a Hugging Face causal-LM folder (same as backbone=...)")
    ap.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="collective timeout")
    ap.add_argument(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # set by deepspeed; unused
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="ItemEmbeddingConfig fields")
    return ap


# Files one of which every earlier output folder of this command holds (it may be reused or replaced).
OUTPUT_MARKERS = ("embeddings.json", "shards")


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_output_location(args.out, "--out", OUTPUT_MARKERS, source="--out")  # before any heavy work
    info = dist_info()
    logging.basicConfig(level=logging.INFO, format=f"[rank {info.rank}] %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"backbone={args.backbone}"] if args.backbone else [])
    try:
        config = load_config(ItemEmbeddingConfig, None, overrides)
    except ConfigError as exc:
        report_user_error(exc)
        return 2
    info = init_distributed(timeout_s=args.timeout_s)
    start = time.perf_counter()
    try:
        out_dir = extract_item_embeddings(args.dataset, args.out, config)
    except BaseException as exc:
        # extract_item_embeddings raises its errors on every rank together; anything else (an interrupt)
        # may be this rank's alone, and a barrier would wait for the others until the timeout.
        destroy(synchronize=isinstance(exc, Exception))
        if isinstance(exc, (FileNotFoundError, BackboneError, ValueError)):
            report_user_error(exc)
            return 2
        raise
    destroy()
    elapsed = time.perf_counter() - start
    if info.is_main:
        meta = json.loads((out_dir / "embeddings.json").read_text())
        print(
            f"embedded {meta['n_items']:,} items x {meta['dim']} dims on {info.world_size} rank(s) "
            f"in {elapsed:.1f} s ({meta['n_items'] / elapsed:,.1f} items/s, model loading included)\n"
            f"  backbone {meta['backbone']}  dtype {meta['dtype']}  max_length {meta['max_length']}  "
            f"truncated {meta['n_truncated']}\n"
            f"  -> {out_dir / 'embeddings.npy'} (sha256 {meta['sha256'][:16]}...)"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command; a user's mistake prints ``error: <file/key>: <reason>`` and returns 2 (no traceback)."""
    return run_command(lambda: _main(argv))


if __name__ == "__main__":
    run_and_exit(main)  # not sys.exit: see reclora_ds.distributed.run_and_exit
