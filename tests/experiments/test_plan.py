"""Planning an experiment: what variants share is one folder (by hash), each variant x seed has its own
stage-2 folder, and the records decide skip / resume / redo as in the pipeline. Nothing runs here: the
plan only hashes the (tiny) raw files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reclora_ds.experiments.plan import plan_experiment
from reclora_ds.experiments.spec import load_spec, parse_spec
from reclora_ds.pipeline.runner import StageExecutor
from reclora_ds.pipeline.stages import UPSTREAM
from tests.experiments.tiny import tiny_spec


def spec_with(tmp_path, ml1m_dir, variants=None, **extra):
    path = tiny_spec(tmp_path, ml1m_dir, "default", **extra)
    data = yaml.safe_load(path.read_text())
    if variants is not None:
        data["variants"] = variants
        data["reference"] = variants[0]["name"]
        data["plot"] = {"kind": "bars"}
    return parse_spec(data, str(path))


def by_stage(plan):
    out = {}
    for unit in plan.units.values():
        out.setdefault(unit.planned.stage.name, []).append(unit)
    return out


def test_two_variants_two_seeds_share_every_upstream_stage(tmp_path, ml1m_dir):
    plan = plan_experiment(spec_with(tmp_path, ml1m_dir))
    stages = by_stage(plan)
    for name in UPSTREAM:  # one folder each, used by all 4 runs
        (unit,) = stages[name]
        assert len(unit.users) == 4 and unit.folder.parent == plan.store
        assert unit.folder.name == f"{name}-{unit.planned.hash[:12]}"
    runs = stages["lora"] + stages["plora"]
    assert sorted(str(u.folder.relative_to(plan.root)) for u in runs) == [
        "runs/lora_r2/seed1/lora", "runs/lora_r2/seed2/lora", "runs/plora_n3/seed1/plora", "runs/plora_n3/seed2/plora",
    ]  # fmt: skip
    assert len({u.planned.hash for u in runs}) == 4  # the seed is part of stage 2's settings
    # every stage-2 config points at the shared folders
    cell = plan.cells[0]
    assert cell.settings.plora.seed == 1 and cell.settings.pipeline.modes == ("lora",)
    cfg = yaml.safe_load(plan.units[cell.result].planned.stage.write_files["stage_config.yaml"])["plora"]
    assert cfg["crm_path"] == str(stages["sim"][0].folder) and cfg["retrieval_dir"] == str(
        stages["retrieval"][0].folder
    )
    assert cfg["output_dir"] == str(plan.root / "runs/lora_r2/seed1/lora") and cfg["seed"] == 1
    assert all(a == "run" for a in (u.planned.action for u in plan.units.values()))
    text = plan.describe()
    assert "used by 4 runs (computed once)" in text and "lora_r2/seed2/lora" in text


def test_variants_that_change_the_crm_or_the_prompt_share_the_one_retrieval(tmp_path, ml1m_dir):
    variants = [
        {"name": "id20", "mode": "plora", "overrides": {"sim.history_length": 20}},
        {"name": "id10", "mode": "plora", "overrides": {"sim.history_length": 10}},
        {"name": "recent_prompt", "mode": "plora", "overrides": {"plora.short_history": "recent"}},
        {"name": "recent_crm", "mode": "plora", "overrides": {"sim.history_mode": "recent"}},
        {"name": "neither", "mode": "plora",
         "overrides": {"sim.history_mode": "recent", "plora.short_history": "recent"}},
    ]  # fmt: skip
    plan = plan_experiment(spec_with(tmp_path, ml1m_dir, variants))
    stages = by_stage(plan)
    for name in ("prepare", "backbone", "embeddings", "index", "retrieval"):
        assert len(stages[name]) == 1, name
    (retrieval,) = stages["retrieval"]
    assert retrieval.planned.stage.settings == {"ks": [20, 10, 3]}  # every K any variant reads
    assert len(retrieval.users) == 2 * 4  # "neither" reads no retrieval
    sims = stages["sim"]  # L=20 retrieved (also the recent-prompt row's), L=10 retrieved, recent 20
    assert len(sims) == 3
    assert sorted(len(u.users) for u in sims) == [2, 4, 4]
    recent = [u for u in sims if u.planned.stage.inputs == ("prepare",)]
    assert len(recent) == 1 and len(recent[0].users) == 4  # the two "w/o long retriever" rows share it


def test_records_make_a_rerun_skip_resume_and_redo(tmp_path, ml1m_dir):
    spec = spec_with(tmp_path, ml1m_dir)
    plan = plan_experiment(spec)
    executors = {}
    for unit in plan.units.values():  # a finished experiment's records
        ex = executors.setdefault(unit.records, StageExecutor(unit.records))
        ex.write_record(
            unit.key, {"stage": unit.planned.stage.name, "hash": unit.planned.hash, "status": "done"}
        )
    assert {u.planned.action for u in plan_experiment(spec).units.values()} == {"skip"}

    # interrupted in a stage-2 run: that run resumes, nothing else runs
    key = "plora_n3/seed2/plora"
    ex = StageExecutor(plan.root / "_records")
    ex.write_record(key, {**ex.record(key), "status": "running"})
    actions = {k: u.planned.action for k, u in plan_experiment(spec).units.items()}
    assert actions.pop(key) == "resume" and set(actions.values()) == {"skip"}

    # a changed CRM setting: a new CRM folder (the old one stays for other experiments), every run redone
    changed = {k: u for k, u in plan_experiment(spec, ["sim.lr=0.002"]).units.items()}
    new_sim = [u for u in changed.values() if u.planned.stage.name == "sim"]
    assert len(new_sim) == 1 and new_sim[0].planned.action == "run" and new_sim[0].key not in plan.units
    assert {u.planned.action for u in changed.values() if not u.shared} == {"redo"}
    assert {u.planned.action for u in changed.values() if u.shared and u.planned.stage.name != "sim"} == {
        "skip"
    }

    # another seed: only its two stage-2 runs are new
    ex.write_record(key, {**ex.record(key), "status": "done"})
    more = dict(yaml.safe_load(Path(spec.source).read_text()), seeds=[1, 2, 3])
    actions = {k: u.planned.action for k, u in plan_experiment(parse_spec(more, spec.source)).units.items()}
    assert sorted(k for k, a in actions.items() if a != "skip") == [
        "lora_r2/seed3/lora",
        "plora_n3/seed3/plora",
    ]


def test_a_crm_row_varies_sim_seed_and_zero_shot_runs_once(tmp_path, ml1m_dir):
    variants = [
        {"name": "reclora", "mode": "plora"},
        {"name": "din", "mode": "crm", "overrides": {"sim.model": "din", "sim.history_mode": "recent"}},
        {"name": "zs", "mode": "zero_shot"},
    ]
    spec = spec_with(tmp_path, ml1m_dir, variants)
    plan = plan_experiment(spec)
    cells = {(c.variant.name, c.seed): c for c in plan.cells}
    assert set(cells) == {("reclora", 1), ("reclora", 2), ("din", 1), ("din", 2), ("zs", 1)}
    assert [cells[("din", s)].settings.sim.seed for s in (1, 2)] == [1, 2]
    din_units = {plan.units[cells[("din", s)].result].key for s in (1, 2)}
    assert len(din_units) == 2 and all(k.startswith("sim-") for k in din_units)
    # a CRM on recent histories reads only the prepared data: no backbone, embeddings, index, retrieval
    assert [plan.units[k].planned.stage.name for k in cells[("din", 1)].units] == ["prepare", "sim"]
    assert plan.units[cells[("reclora", 1)].result].planned.stage.name == "plora"


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, ml1m_dir):
    path = tiny_spec(tmp_path, ml1m_dir, "default")
    run = subprocess.run(
        [sys.executable, "-m", "reclora_ds", "experiment", "--config", str(path), "--dry-run"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "experiment tiny" in run.stdout and "computed once" in run.stdout
    assert "plora_n3/seed2/plora" in run.stdout
    assert not (tmp_path / "runs").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "reclora_ds", "experiment", "--config", str(path), "--dry-run", "plora.lora_rank=2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "error:" in bad.stderr and "plora.lora_rank" in bad.stderr
    assert load_spec(path).name == "tiny"
