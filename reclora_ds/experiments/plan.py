"""Which stages each variant x seed needs, and which of them variants share (by hash).

Folders of an experiment (``<runs_dir>`` is the base config's ``pipeline.runs_dir``)::

    <store>/<stage>-<hash12>/                 prepare, backbone, embeddings, index, retrieval, sim: one folder
    <store>/_records/<stage>-<hash12>.json    per distinct hash, shared by every variant (and experiment)
                                              that resolves to the same settings; <store> = <runs_dir>/_stages
    <runs_dir>/<experiment>/runs/<variant>/seed<seed>/<mode>/   the stage-2 run of one variant x seed
    <runs_dir>/<experiment>/_records/<variant>/seed<seed>/<mode>.json
    <runs_dir>/<experiment>/results.{csv,md}, per_seed.csv, *.png, tb/   (reclora_ds.experiments.aggregate)

A stage's hash is the pipeline's (:func:`reclora_ds.pipeline.runner.stage_hash`: its settings without the
connecting paths, its inputs' hashes, a fingerprint of outside inputs), so two variants that differ only in
stage 2 resolve to the same prepare ... sim hashes and share those folders, and a variant that changes the
CRM (``sim.history_length``) shares everything before it. The retrieval stage writes the union of the K
values that the variants over one item index read (one retrieval instead of one per K set). Records and
actions are the pipeline's (:class:`reclora_ds.pipeline.runner.StageExecutor`): a finished stage is skipped,
an interrupted one resumed, a changed one redone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reclora_ds.config import ConfigError, parse_overrides
from reclora_ds.experiments.spec import ExperimentSpec, VariantSpec
from reclora_ds.package_data import resolve_launch_config
from reclora_ds.pipeline.config import PipelineConfig, PipelineSettings, load_pipeline_settings
from reclora_ds.pipeline.runner import PlannedStage, StageExecutor, plan_hashes
from reclora_ds.pipeline.stages import UPSTREAM, Stage, build_stages, override_arg, retrieval_ks

RECORDS = "_records"
HASH_CHARS = 12


@dataclasses.dataclass
class Unit:
    """One stage folder of the experiment: a shared upstream stage or one variant x seed's stage 2."""

    key: str  # record key (under records)
    planned: PlannedStage
    records: Path
    pipeline: PipelineConfig  # launch settings (those of the first run using it)
    users: list[str] = dataclasses.field(default_factory=list)  # "<variant>/seed<seed>"

    @property
    def folder(self) -> Path:
        return self.planned.stage.folder

    @property
    def shared(self) -> bool:
        return self.planned.stage.name in UPSTREAM


@dataclasses.dataclass
class Cell:
    """One variant x seed: its settings, the units it needs in order, and the one holding its result."""

    variant: VariantSpec
    seed: int
    settings: PipelineSettings
    units: list[str]  # unit keys, in stage order
    result: str  # the unit whose output is this row (stage 2, or sim for a CRM row)

    @property
    def label(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"


@dataclasses.dataclass
class ExperimentPlan:
    spec: ExperimentSpec
    root: Path  # <runs_dir>/<experiment>
    store: Path
    units: dict[str, Unit]  # in an order that runs every stage after its inputs
    cells: list[Cell]

    def unit(self, cell: Cell) -> Unit:
        return self.units[cell.result]

    def describe(self) -> str:
        """The plan as text: each stage folder, what a run does with it, and who uses it."""
        lines = [
            f"experiment {self.spec.run_name} ({self.spec.source}): {len(self.spec.variants)} variants, "
            f"seeds {list(self.spec.seeds)}, {len(self.cells)} runs; results under {self.root}",
            f"shared stages in {self.store}:",
        ]
        counts: dict[str, int] = {}
        header = False
        for unit in self.units.values():
            counts[unit.planned.action] = counts.get(unit.planned.action, 0) + 1
            if not unit.shared and not header:
                lines.append(f"runs (one stage-2 folder per variant x seed) in {self.root / 'runs'}:")
                header = True
            where = unit.folder.name if unit.shared else str(unit.folder.relative_to(self.root / "runs"))
            used = f"used by {len(unit.users)} run{'s' if len(unit.users) > 1 else ''}" if unit.shared else ""
            if unit.shared and len(unit.users) > 1:
                used += " (computed once)"
            lines.append(
                f"  {unit.planned.action:<7} {unit.planned.stage.name:<10} {where:<44} {used}".rstrip()
            )
        lines.append(
            "actions: "
            + ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
            + " (run: new; skip: done, reused; resume: interrupted; redo: settings changed)"
        )
        return "\n".join(lines)


def cell_overrides(
    spec: ExperimentSpec, variant: VariantSpec, seed: int, cli: Sequence[str] = ()
) -> list[str]:
    """The pipeline overrides of one variant x seed: the spec's, the command line's, the variant's, then the
    experiment's own (name, the one stage-2 mode, the seed key)."""
    seed_key = "sim.seed" if variant.mode == "crm" else "plora.seed"
    own = [
        override_arg("pipeline.name", f"{spec.run_name}.{variant.name}.seed{seed}"),
        override_arg(seed_key, seed),
    ]
    if variant.mode != "crm":
        own.append(override_arg("pipeline.modes", [variant.mode]))
    return [
        *(override_arg(k, v) for k, v in spec.overrides.items()),
        *cli,
        *(override_arg(k, v) for k, v in variant.overrides.items()),
        *own,
    ]


def _cli_problems(spec: ExperimentSpec, cli: Sequence[str]) -> list[str]:
    tree, problems = parse_overrides(cli)
    keys = [item.partition("=")[0].strip() for item in cli]
    for key in keys:
        if key in ("pipeline.name", "pipeline.modes", "plora.seed", "sim.seed", "plora.mode"):
            problems.append(f"override {key}: set by the experiment (variants, seeds)")
        for v in spec.variants:
            if key in v.overrides:
                problems.append(
                    f"override {key}: variant {v.name!r} sets it (the row would lose its meaning)"
                )
    return problems


def variant_settings(
    spec: ExperimentSpec, cli: Sequence[str] = ()
) -> dict[tuple[str, int], PipelineSettings]:
    """Every variant x seed's validated pipeline settings; all problems of all variants at once.

    Raises:
        ConfigError: naming the variant and the key of each problem.
    """
    problems = _cli_problems(spec, cli)
    base = resolve_launch_config(spec.base)
    if not Path(base).is_file():
        raise ConfigError([f"base: pipeline config {spec.base} not found"], spec.source)
    out: dict[tuple[str, int], PipelineSettings] = {}
    for variant in spec.variants:
        for seed in spec.seeds_of(variant):
            try:
                settings = load_pipeline_settings(base, cell_overrides(spec, variant, seed, cli))
            except ConfigError as exc:
                problems += [
                    f"variant {variant.name}: {p}"
                    for p in exc.problems
                    if f"variant {variant.name}: {p}" not in problems
                ]
                break
            except ValueError as exc:
                problems.append(f"variant {variant.name}: {exc}")
                break
            if variant.mode != "crm" and spec.split not in settings.plora.eval_splits:
                problems.append(
                    f"variant {variant.name}: plora.eval_splits {list(settings.plora.eval_splits)} lacks the "
                    f"experiment's split {spec.split!r}"
                )
                break
            out[(variant.name, seed)] = settings
    runs_dirs = {s.pipeline.runs_dir for s in out.values()}
    if len(runs_dirs) > 1:
        problems.append(f"pipeline.runs_dir differs between variants ({sorted(runs_dirs)})")
    if problems:
        raise ConfigError(problems, spec.source)
    return out


class _Fingerprints:
    """Outside-input fingerprints computed once per (stage, settings): the raw files are read once."""

    def __init__(self) -> None:
        self.cache: dict[str, str] = {}

    def __call__(self, stage: Stage) -> str:
        if stage.fingerprint is None:
            return ""
        key = json.dumps([stage.name, stage.settings], sort_keys=True, default=str)
        if key not in self.cache:
            self.cache[key] = stage.fingerprint()
        return self.cache[key]


def _needed(stages: list[Stage], result: str) -> list[Stage]:
    """The stages ``result`` reads, directly or not, and itself, in stage order (a CRM row on recent
    histories needs no embeddings, index or retrieval)."""
    by_name = {s.name: s for s in stages}
    needed, todo = set(), [result]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name].inputs)
    return [s for s in stages if s.name in needed]


def plan_experiment(spec: ExperimentSpec, cli: Sequence[str] = ()) -> ExperimentPlan:
    """Resolve every variant x seed into stage folders and actions (nothing runs; raw files are hashed)."""
    all_settings = variant_settings(spec, cli)
    runs_dir = Path(next(iter(all_settings.values())).pipeline.runs_dir)
    root = runs_dir / spec.run_name
    store = Path(spec.store) if spec.store else runs_dir / "_stages"
    fingerprints = _Fingerprints()

    # Pass 1: the retrieval K values each item index must serve (union over the variants reading it).
    ks_by_index: dict[str, set[int]] = {}
    for settings in all_settings.values():
        stages = build_stages(settings)
        hashes = plan_hashes(stages, fingerprints)
        if "index" in hashes:
            ks_by_index.setdefault(hashes["index"], set()).update(retrieval_ks(settings))

    store_exec = StageExecutor(store / RECORDS)
    cell_exec = StageExecutor(root / RECORDS)
    units: dict[str, Unit] = {}
    cells = []
    for (vname, seed), settings in all_settings.items():
        variant = spec.variant(vname)
        probe = build_stages(settings)
        index_hash = plan_hashes(probe, fingerprints).get("index")
        ks = tuple(sorted(ks_by_index.get(index_hash, ()), reverse=True)) if index_hash else None
        # Pass 2: the hashes with the shared K values, then pass 3: the folders named by them.
        hashes = plan_hashes(build_stages(settings, ks=ks), fingerprints)
        dirs = {name: store / f"{name}-{hashes[name][:HASH_CHARS]}" for name in UPSTREAM if name in hashes}
        mode = None if variant.mode == "crm" else variant.mode
        if mode:
            dirs[mode] = root / "runs" / vname / f"seed{seed}" / mode
        stages = build_stages(settings, dirs=dirs, ks=ks)
        final = plan_hashes(stages, fingerprints)
        assert final == hashes, "a stage hash depends on a folder"
        keep = _needed(stages, mode or "sim")
        keys = []
        for stage in keep:
            shared = stage.name in UPSTREAM
            key = stage.folder.name if shared else f"{vname}/seed{seed}/{mode}"
            executor = store_exec if shared else cell_exec
            if key not in units:
                action = executor.action(key, hashes[stage.name])
                planned = PlannedStage(stage, hashes[stage.name], action)
                units[key] = Unit(key, planned, executor.records, settings.pipeline)
            units[key].users.append(f"{vname}/seed{seed}")
            keys.append(key)
        cells.append(Cell(variant, seed, settings, keys, keys[-1]))
    # shared stages first (in stage order), then the stage-2 runs: every stage comes after its inputs
    order = sorted(
        units.values(), key=lambda u: (not u.shared, UPSTREAM.index(u.planned.stage.name) if u.shared else 0)
    )
    return ExperimentPlan(spec, root, store, {u.key: u for u in order}, cells)


def plan_summary(plan: ExperimentPlan) -> dict[str, Any]:
    """A JSON-safe summary of the plan (written beside the results as plan.json)."""
    return {
        "experiment": plan.spec.run_name,
        "source": plan.spec.source,
        "store": str(plan.store),
        "units": [
            {"key": u.key, "stage": u.planned.stage.name, "hash": u.planned.hash, "folder": str(u.folder),
             "users": u.users}
            for u in plan.units.values()
        ],
        "cells": [{"variant": c.variant.name, "seed": c.seed, "units": c.units, "result": c.result} for c in plan.cells],
    }  # fmt: skip
