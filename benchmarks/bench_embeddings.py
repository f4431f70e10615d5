"""Items/s of item-embedding extraction with the default backbone, by batch size and length bucketing.

    python benchmarks/bench_embeddings.py [--items 192] [--batch-sizes 16 64] [--backbone default] [--dtype auto]

Embeds a fixed random sample of the bundled ml-latest-small item descriptions (prepared into a temporary
folder) with ``embed_texts``, the function each extraction rank runs, for every batch size with and without
length bucketing, after one warm-up batch. On a CPU shared with other processes, use ``--threads 1`` (or
``OMP_NUM_THREADS=1``): oversubscribed OpenMP threads spin and made a forward pass about 4x slower here. Prints items/s, the share of padded token positions, and the time
all 9,724 items of ml-latest-small would take on one process at that rate (model loading excluded). The
first run converts the default backbone (about 30 s, cached afterwards).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from reclora_ds.backbone import resolve_backbone
from reclora_ds.data.config import PrepareConfig
from reclora_ds.data.prepare import bundled_dataset, prepare_dataset
from reclora_ds.llm_loader import rank_device
from reclora_ds.retrieval.embeddings import (
    ItemEmbeddingConfig,
    batch_order,
    embed_texts,
    load_backbone,
    tokenize_texts,
)

ML_SMALL_ITEMS = 9_724  # items of the bundled ml-latest-small after preparation


def bundled_descriptions() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PrepareConfig(
            dataset="ml-25m",
            raw_dir=str(bundled_dataset("ml-latest-small")),
            output_dir=tmp,
            few_shot_size=100,
        )
        prepare_dataset(cfg)
        return (
            pq.read_table(f"{tmp}/items.parquet", columns=["description"]).column("description").to_pylist()
        )


def padding_share(lengths: list[int], batch_size: int, bucket: bool) -> float:
    """Padded positions / all positions of the batches ``embed_texts`` would build."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batch_order(lengths, batch_size, bucket))
    return 1.0 - sum(lengths) / padded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=192, help="descriptions embedded per setting")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--backbone", default="default")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's, i.e. OMP_NUM_THREADS or all cores)"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    descriptions = bundled_descriptions()
    rng = np.random.default_rng(args.seed)
    sample = [descriptions[i] for i in sorted(rng.choice(len(descriptions), args.items, replace=False))]
    t0 = time.perf_counter()
    backbone = resolve_backbone(args.backbone)
    config = ItemEmbeddingConfig(backbone=args.backbone, dtype=args.dtype, max_length=args.max_length)
    device = rank_device()
    model, tokenizer = load_backbone(backbone, config, device)
    load_s = time.perf_counter() - t0
    lengths = [len(ids) for ids in tokenize_texts(tokenizer, sample, args.max_length)[0]]
    print(
        f"backbone {backbone} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
        f"{next(model.parameters()).dtype}) on {device}, torch threads {torch.get_num_threads()}; "
        f"resolve + load {load_s:.1f} s"
    )
    print(
        f"{len(sample)} of {len(descriptions):,} item descriptions, tokens/item mean {np.mean(lengths):.1f} "
        f"min {min(lengths)} max {max(lengths)}"
    )
    embed_texts(
        model, tokenizer, sample[: max(args.batch_sizes)], batch_size=max(args.batch_sizes)
    )  # warm-up
    print(
        f"{'batch':>5} {'bucketing':>9} {'items/s':>8} {'padding':>8} {'all ' + format(ML_SMALL_ITEMS, ',') + ' items':>16}"
    )
    for batch_size in args.batch_sizes:
        for bucket in (True, False):
            start = time.perf_counter()
            embed_texts(
                model,
                tokenizer,
                sample,
                batch_size=batch_size,
                max_length=args.max_length,
                bucket_by_length=bucket,
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = len(sample) / (time.perf_counter() - start)
            print(
                f"{batch_size:>5} {'on' if bucket else 'off':>9} {rate:>8.1f} "
                f"{padding_share(lengths, batch_size, bucket):>8.1%} {ML_SMALL_ITEMS / rate / 60:>12.1f} min"
            )


if __name__ == "__main__":
    main()
