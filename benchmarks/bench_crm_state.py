"""What computing the frozen CRM's state inside stage 2 costs: the CRM's share of a stage-2 step.

Stage 2 could read precomputed CRM states from a file instead of running the frozen CRM in every step. This
benchmark decides by measurement: on the same prompt batches of a finished pipeline run's ``plora`` stage
(its adapter, its CRM, its prompt and history settings), it times, side by side and interleaved,

* ``crm``: the frozen CRM's forward alone (``RecLLM.crm_state``: the gate input R_c);
* ``score``: the whole stage-2 inference step (``RecLLM.score``: CRM + gates + LLM), which contains it;
* ``train``: one stage-2 training micro-step (forward + backward through the adapter), which contains it too;

and prints the median milliseconds of each and the CRM's share of the two steps. One process, one thread
per rank as stage 2 runs (``--threads``).

    python benchmarks/bench_crm_state.py --run runs/quickstart [--batches 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.data.prompts import PromptEncoder
from reclora_ds.training.plora_data import PLoRABatchLoader, history_settings
from reclora_ds.training.scoring import load_scoring_model


def timed(fn, *args) -> float:
    """Milliseconds of one call."""
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quickstart", help="a finished pipeline run folder")
    parser.add_argument("--mode", default="plora", help="its stage-2 folder (a plora run)")
    parser.add_argument("--batches", type=int, default=20, help="micro-batches timed (after 3 warm-up ones)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (stage 2 runs 1 per rank here)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run) / args.mode
    scoring = load_scoring_model(run)
    cfg, model = scoring.cfg, scoring.model
    if model.crm is None:
        print(f"error: {run} is a {cfg.mode} run: no CRM", file=sys.stderr)
        return 2
    dataset = ProcessedDataset(cfg.data_dir)
    encoder = PromptEncoder(scoring.tokenizer, dataset.metadata["dataset"], cfg.max_length)
    loader = PLoRABatchLoader(
        dataset, cfg.train_split, cfg.micro_batch_size, encoder, with_answer=True, shuffle=True, seed=0,
        **history_settings(cfg, scoring.crm_info),
    )  # fmt: skip

    def crm(batch: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            model.crm_state(batch)

    def score(batch: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            model.score({k: v for k, v in batch.items() if k != "labels"})

    def train(batch: dict[str, torch.Tensor]) -> None:
        with model.routing(batch):
            model(batch).loss.backward()
        model.zero_grad(set_to_none=True)

    steps = {"crm": crm, "score": score, "train": train}
    times: dict[str, list[float]] = {name: [] for name in steps}
    model.train()
    for index, batch in enumerate(loader):
        if index >= args.batches + 3:
            break
        for name, step in steps.items():  # interleaved on the same batch
            ms = timed(step, batch)
            if index >= 3:  # warm-up excluded
                times[name].append(ms)
    med = {name: statistics.median(v) for name, v in times.items()}
    tokens = int(batch["attention_mask"].sum()) / len(batch["label"])
    print(
        f"{run}: {cfg.mode}, micro-batch {cfg.micro_batch_size}, about {tokens:.0f} tokens per prompt, "
        f"CRM history {loader.history_mode} L={loader.history_length}, {len(times['crm'])} batches, "
        f"{args.threads} thread(s)"
    )
    print("| part | median ms per micro-batch | ms per sample |")
    print("|---|---:|---:|")
    for name, label in (
        ("crm", "frozen CRM forward (R_c)"),
        ("score", "inference step"),
        ("train", "training micro-step"),
    ):
        print(f"| {label} | {med[name]:.2f} | {med[name] / cfg.micro_batch_size:.2f} |")
    print(
        f"CRM share: {100 * med['crm'] / med['score']:.2f}% of an inference step, "
        f"{100 * med['crm'] / med['train']:.2f}% of a training micro-step"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
