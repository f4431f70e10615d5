"""Stage-1 CRM training speed on this machine: samples/s on 1 and 2 ranks, and the data-loading share of a step.

    python benchmarks/bench_crm.py [--data DIR] [--config launch/configs/sim_quickstart.yaml] [--steps 200]
                                   [--profile] [key=value ...]
    python benchmarks/bench_crm.py --models all [--data DIR] [--steps 200] [key=value ...]

``--models all`` (or some registry names) times every CRM of the registry side by side instead: each
on 2 ranks x 1 thread (shm all-reduce), the config's settings with ``model=<name>``, SIM on the config's
history (the retrieved top-60) and every other model on the most recent ``history_length`` behaviours
(the paper's baselines read the plain history; only SIM shares the retrieval), round-robin over the
models ``--repeats`` times, one line per model (the median run). A model this checkout cannot build is
reported as failed and the others still run.

Without ``--data`` the bundled real MovieLens sample is prepared into a temporary folder first. The
settings are the config's (the defaults of the bundled data unless ``--config`` / overrides say otherwise),
run with the recipe's own pieces (``CRMBatchLoader`` on the train split, ``build_crm``, DDP, AdamW,
``train_step``) for ``--warmup`` + ``--steps`` steps in three layouts:

  * 1 rank, 1 thread      ``python`` (OMP_NUM_THREADS=1)
  * 1 rank, 2 threads     ``python`` (OMP_NUM_THREADS=2)
  * 2 ranks, 1 thread     ``torchrun --nproc_per_node 2`` (OMP_NUM_THREADS=1), gradients averaged through
                          shared memory (``cpu_allreduce=shm``, the default where it can be used)
  * 2 ranks, 1 thread     the same through gloo's TCP all-reduce (``cpu_allreduce=gloo``)

Each prints global samples/s (all ranks; wall time of the timed steps, the figure the target is about),
ms per step, the share of the step's wall time spent waiting for the next batch (data loading), and the
median and 90th percentile of rank 0's step times: this machine's host takes a core away now and then,
and with 2 ranks the other one waits, so the mean step sits above the median. ``--profile`` adds a
per-operator breakdown of one rank's step. ``--allocator`` adds a 1-rank run without
:func:`reclora_ds.cpu.allocator.keep_freed_memory` (glibc's default malloc thresholds), and ``--kernels``
a 2-rank shm run without the C++ kernels (``cpu_kernels=false``, :mod:`reclora_ds.cpu.kernels`), side by
side with the others.
The target of the issue is 20,000 samples/s on 2 CPU cores; it was set (and met, docs/CRM_RESULTS.md) for
SIM's own soft search over the last 256 behaviours: ``history_mode=recent history_length=256
crm.search=soft``. The default config reads the retrieved top-60 instead; without a retrieval of the data
the benchmark times a stand-in of the same shapes (``bundled_data.retrieval_overrides``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bundled_data import processed_data, retrieval_overrides

TARGET_SAMPLES_PER_S = 20_000
ROOT = Path(__file__).parents[1]
DEFAULT_CONFIG = ROOT / "launch" / "configs" / "sim_quickstart.yaml"
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def worker(args: argparse.Namespace) -> None:
    """One rank: timed training steps with the recipe's pieces; rank 0 prints one JSON line."""
    import torch

    from reclora_ds import distributed as D
    from reclora_ds.config import load_config
    from reclora_ds.cpu import enable_cpu_extras
    from reclora_ds.data.processed import ProcessedDataset
    from reclora_ds.models.crm import FeatureSpec
    from reclora_ds.models.registry import build_crm
    from reclora_ds.training.crm_config import CRMTrainConfig
    from reclora_ds.training.crm_recipe import build_loader, build_optimizer, crm_config, train_step, wrap_ddp

    cfg = load_config(CRMTrainConfig, args.config, [f"data_dir={args.data}", *args.overrides])
    info = D.init_distributed("gloo")
    # as the recipe does on the CPU (--default-malloc leaves glibc's thresholds as they are)
    enable_cpu_extras(kernels=cfg.cpu_kernels, allocator=args.keep_freed_memory)
    torch.manual_seed(cfg.seed)
    ds = ProcessedDataset(cfg.data_dir)
    model = build_crm(cfg.model, crm_config(cfg), FeatureSpec.from_metadata(ds.metadata))
    ddp = wrap_ddp(model, torch.device("cpu"), cfg.cpu_allreduce)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps=args.warmup + args.steps)
    loader = build_loader(cfg, ds, "train", info)
    batches = iter(loader)
    epoch = 0

    def next_batch():
        nonlocal batches, epoch
        try:
            return next(batches)
        except StopIteration:
            epoch += 1
            loader.set_epoch(epoch)
            batches = iter(loader)
            return next(batches)

    for _ in range(args.warmup):
        train_step(ddp, next_batch(), optimizer, scheduler, cfg.grad_clip)
    D.barrier()
    data_time = 0.0
    step_ms = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        batch = next_batch()
        data_time += time.perf_counter() - t
        train_step(ddp, batch, optimizer, scheduler, cfg.grad_clip)
        step_ms.append(1e3 * (time.perf_counter() - t))
    D.barrier()
    wall = time.perf_counter() - t0
    shares = D.all_gather_variable(torch.tensor([data_time / wall], dtype=torch.float64))
    if args.profile and info.is_main:
        profile(ddp, optimizer, next_batch)
    if info.is_main:
        result = {
            "world_size": info.world_size,
            "threads": torch.get_num_threads(),
            "per_rank_batch": loader.batch_size,
            "samples_per_s": args.steps * loader.batch_size * info.world_size / wall,
            "ms_per_step": 1e3 * wall / args.steps,
            "data_share": float(shares.max()),
            "step_ms_p50": statistics.median(step_ms),
            "step_ms_p90": statistics.quantiles(step_ms, n=10)[-1],
            "params": sum(p.numel() for p in model.parameters()),
            "model": cfg.model,
            "crm": {
                k: getattr(cfg.crm, k)
                for k in ("embedding_dim", "attention_hidden", "attention_layers", "short_term_length")
            },
            "tower": list(cfg.crm.tower),
            "history_length": cfg.history_length,
            "top_k": cfg.crm.top_k,
        }
        print("RESULT " + json.dumps(result), flush=True)
    D.destroy()


def profile(model, optimizer, next_batch, steps: int = 5) -> None:
    """Per-operator self time of a few training steps (forward, backward, AdamW), largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from reclora_ds.training.crm_recipe import train_step

    batches = [next_batch() for _ in range(steps)]
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for batch in batches:
            train_step(model, batch, optimizer)
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(
        f"profile of {steps} steps (self CPU time per step; total {total / steps / 1e3:.1f} ms):", flush=True
    )
    for e in events[:15]:
        shapes = str(e.input_shapes)[:70]
        print(
            f"  {e.key[:28]:<28} {e.self_cpu_time_total / steps / 1e3:7.1f} ms {100 * e.self_cpu_time_total / total:5.1f}%  {shapes}",
            flush=True,
        )


def run_layout(
    args: argparse.Namespace,
    data: Path,
    ranks: int,
    threads: int,
    profile_it: bool,
    extra: tuple[str, ...] = (),
) -> dict | None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = str(threads)
    script = [
        str(Path(__file__).resolve()),
        "--worker",
        "--data",
        str(data),
        "--config",
        str(args.config),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        *(["--profile"] if profile_it else []),
        *extra,
        *args.overrides,
    ]
    if ranks == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(ranks),
            *script,
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if not line.startswith("RESULT "):
            print(line)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        print(f"{ranks} rank(s) x {threads} thread(s) failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return results[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="processed dataset (default: prepare the bundled sample)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a CRMTrainConfig YAML file")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each layout (the median is reported)")
    parser.add_argument(
        "--warmup", type=int, default=20, help="untimed steps first (a rank's first ~10 steps are slower)"
    )
    parser.add_argument("--profile", action="store_true", help="per-operator breakdown (1 rank, 1 thread)")
    parser.add_argument("--allocator", action="store_true", help="also 1 rank with glibc's default malloc")
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="also 2 ranks without the C++ kernels (cpu_kernels=false)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=[],
        help="'all' or registry names: every model on 2 ranks side by side (instead of the layouts)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--default-malloc", dest="keep_freed_memory", action="store_false", help=argparse.SUPPRESS
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. crm.attention_hidden=64")
    args = parser.parse_args()
    if args.worker:
        from reclora_ds.distributed import run_and_exit

        run_and_exit(lambda: worker(args))  # not a plain return: see reclora_ds.distributed.run_and_exit

    with tempfile.TemporaryDirectory() as tmp:
        data = processed_data(args.data, tmp)
        args.overrides = [*args.overrides, *retrieval_overrides(args.config, args.overrides, data, tmp)]
        print(f"config {args.config} {' '.join(args.overrides)}; data {data}; {os.cpu_count()} CPU cores")
        if args.models:
            compare_models(args, data)
            return
        layouts = [
            (1, 1, (), ""),
            (1, 2, (), ""),
            (2, 1, ("cpu_allreduce=shm",), " shm"),
            (2, 1, ("cpu_allreduce=gloo",), " gloo"),
        ]
        if args.allocator:
            layouts.insert(1, (1, 1, ("--default-malloc",), " default malloc"))
        if args.kernels:
            layouts.append((2, 1, ("cpu_allreduce=shm", "cpu_kernels=false"), " shm, no C++ kernels"))
        # Round-robin over the layouts, --repeats times, so that a burst of load on the shared machine hits
        # every layout alike; each line reports the median run.
        runs: dict[int, list[dict]] = {i: [] for i in range(len(layouts))}
        for repeat in range(args.repeats):
            for i, (ranks, threads, extra, _) in enumerate(layouts):
                profile_it = args.profile and repeat == 0 and i == 0
                result = run_layout(args, data, ranks, threads, profile_it, extra)
                if result is not None:
                    runs[i].append(result)
        medians = []
        for i, (ranks, threads, _, label) in enumerate(layouts):
            if not runs[i]:
                continue
            result = sorted(runs[i], key=lambda r: r["samples_per_s"])[len(runs[i]) // 2]
            medians.append(result)
            if len(medians) == 1:
                print(
                    f"model {result['model']} {result['crm']} tower {result['tower']} L={result['history_length']} "
                    f"top_k={result['top_k']}, {result['params']:,} params; median of {len(runs[i])} runs"
                )
            spread = ", ".join(f"{r['samples_per_s']:,.0f}" for r in runs[i])
            print(
                f"{ranks} rank(s) x {threads} thread(s){label}: {result['samples_per_s']:>9,.0f} samples/s  "
                f"{result['ms_per_step']:7.1f} ms/step (batch {result['per_rank_batch']} per rank)  "
                f"data loading {100 * result['data_share']:.1f}% of step time  "
                f"(rank 0's steps: p50 {result['step_ms_p50']:.1f}, p90 {result['step_ms_p90']:.1f} ms)  (runs: {spread})",
                flush=True,
            )
        if medians:
            best = max(r["samples_per_s"] for r in medians)
            verdict = "meets" if best >= TARGET_SAMPLES_PER_S else "misses"
            print(f"target {TARGET_SAMPLES_PER_S:,} samples/s on 2 cores: best {best:,.0f} -> {verdict} it")


def model_overrides(name: str) -> tuple[str, ...]:
    """``model=<name>``; every model but SIM reads the most recent behaviours (module docstring)."""
    return (f"model={name}",) if name == "sim" else (f"model={name}", "history_mode=recent")


def compare_models(args: argparse.Namespace, data: Path) -> None:
    """Every requested registry CRM on 2 ranks x 1 thread (shm), round-robin, one line per model."""
    from reclora_ds.models.registry import CRM_MODELS

    names = list(CRM_MODELS) if args.models == ["all"] else args.models
    unknown = sorted(set(names) - set(CRM_MODELS))
    if unknown:
        raise SystemExit(f"error: --models: unknown {unknown}; the registry has {sorted(CRM_MODELS)}")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            result = run_layout(args, data, 2, 1, False, ("cpu_allreduce=shm", *model_overrides(name)))
            if result is not None:
                runs[name].append(result)
    print(
        f"2 ranks x 1 thread (shm), {args.steps} timed steps after {args.warmup}; median of {args.repeats} runs"
    )
    print(
        "| model | history | params | samples/s | ms/step | batch/rank | data share | p50 / p90 ms | runs (samples/s) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for name in names:
        if not runs[name]:
            print(f"| {name} | | | failed | | | | | |")
            continue
        r = sorted(runs[name], key=lambda r: r["samples_per_s"])[len(runs[name]) // 2]
        history = "retrieved" if name == "sim" else "recent"
        spread = ", ".join(f"{x['samples_per_s']:,.0f}" for x in runs[name])
        print(
            f"| {name} | {history} {r['history_length']} | {r['params']:,} | {r['samples_per_s']:,.0f} | "
            f"{r['ms_per_step']:.1f} | {r['per_rank_batch']} | {100 * r['data_share']:.1f}% | "
            f"{r['step_ms_p50']:.1f} / {r['step_ms_p90']:.1f} | {spread} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
