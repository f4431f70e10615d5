"""Run an experiment's plan with the pipeline's executor, then aggregate.

Every stage folder of the plan (:mod:`reclora_ds.experiments.plan`) runs once, shared stages first, each
with its records and launcher exactly as in a pipeline run
(:class:`reclora_ds.pipeline.runner.StageExecutor`: ``python -m``, torchrun, the DeepSpeed launcher or
Slurm job steps, per the base config's ``pipeline`` section). A finished folder is skipped, so a rerun
after an interruption (or after adding a variant or a seed) runs only what is missing; the results are
aggregated again from every run's files each time.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from reclora_ds.experiments.aggregate import (
    collect_runs,
    comparison_rows,
    markdown,
    per_seed_rows,
    results_rows,
    write_csv,
)
from reclora_ds.experiments.hparams import write_hparams
from reclora_ds.experiments.plan import ExperimentPlan, plan_experiment, plan_summary
from reclora_ds.experiments.plots import write_plots
from reclora_ds.experiments.spec import ExperimentSpec
from reclora_ds.files import write_text_atomic
from reclora_ds.pipeline.runner import StageExecutor


@dataclasses.dataclass
class ExperimentResult:
    plan: ExperimentPlan
    rows: list[dict]
    markdown: Path
    plots: list[Path]
    hparams: Path


def execute_plan(plan: ExperimentPlan) -> dict[str, dict]:
    """Run every unit that is not finished; returns ``{unit key: record}`` of those that ran."""
    executors: dict[Path, StageExecutor] = {}
    todo = [u for u in plan.units.values() if u.planned.action != "skip"]
    records = {}
    for number, unit in enumerate(todo, 1):
        executor = executors.setdefault(unit.records, StageExecutor(unit.records))
        title = f"[{number}/{len(todo)}] {unit.key} for {len(unit.users)} run(s):"
        records[unit.key] = executor.execute(
            unit.planned, unit.pipeline, unit.key, title, port_offset=number - 1
        )
    return records


def aggregate(plan: ExperimentPlan, command: str) -> ExperimentResult:
    """Write results.csv, per_seed.csv, results.md, the figure and the HParams events into the root."""
    root = plan.root
    root.mkdir(parents=True, exist_ok=True)
    runs = collect_runs(plan)
    rows = results_rows(plan.spec, runs)
    write_csv(root / "results.csv", rows)
    write_csv(root / "per_seed.csv", per_seed_rows(runs))
    comparisons = comparison_rows(plan.spec, runs)
    if comparisons:
        write_csv(root / "comparisons.csv", comparisons)
    plots = write_plots(plan.spec, rows, root)
    hparams = write_hparams(plan, rows)
    text = markdown(plan.spec, rows, command, [str(p) for p in plots], comparisons)
    write_text_atomic(root / "results.md", text)
    return ExperimentResult(plan, rows, root / "results.md", plots, hparams)


def run_experiment(
    spec: ExperimentSpec, overrides: Sequence[str] = (), dry_run: bool = False, command: str = ""
) -> ExperimentPlan | ExperimentResult:
    """Plan (print it), and unless ``dry_run`` run what is missing and aggregate.

    Raises:
        ConfigError: a spec or variant problem (before anything runs).
        PipelineError: a stage failed (rerun to resume).
    """
    plan = plan_experiment(spec, overrides)
    print(plan.describe())
    sys.stdout.flush()
    if dry_run:
        return plan
    start = time.perf_counter()
    plan.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan.root / "plan.json", json.dumps(plan_summary(plan), indent=2) + "\n")
    execute_plan(plan)
    result = aggregate(plan, command or f"reclora-ds experiment --config {spec.source}")
    print(
        f"\nexperiment {spec.run_name} finished in {time.perf_counter() - start:.0f} s; results: {result.markdown}"
    )
    return result
