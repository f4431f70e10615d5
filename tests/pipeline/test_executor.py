"""The stage executor shared by ``reclora-ds pipeline`` and ``reclora-ds experiment``: records, the re-check
under the lock (a stage another process finished is skipped), redo clears the folder, inline stages (the
report) always run, and stage hashes do not depend on where the stages write."""

from __future__ import annotations

from pathlib import Path

from reclora_ds.pipeline.config import PipelineConfig, load_pipeline_settings
from reclora_ds.pipeline.runner import PlannedStage, StageExecutor, plan_hashes
from reclora_ds.pipeline.stages import Command, Stage, build_stages
from tests.pipeline.tiny import tiny_config

ONE = PipelineConfig(nproc=1)


def test_a_stage_finished_elsewhere_is_skipped_and_redo_clears_the_folder(tmp_path):
    ex = StageExecutor(tmp_path / "records")
    folder = tmp_path / "out"
    stage = Stage("s", (), {}, [Command("platform", [])], {"note.txt": "x"}, folder=folder)
    record = ex.execute(PlannedStage(stage, "h1", "run"), ONE, "group/s", "[1/1]")
    assert record["status"] == "done" and record["hash"] == "h1" and (folder / "note.txt").is_file()
    log = (tmp_path / "records" / "group" / "s.log").read_text()
    assert log.count("$ ") == 1
    # a stale plan (made before another process finished it) runs nothing
    again = ex.execute(PlannedStage(stage, "h1", "run"), ONE, "group/s", "[1/1]")
    assert again == record and (tmp_path / "records" / "group" / "s.log").read_text() == log
    assert ex.action("group/s", "h1") == "skip" and ex.action("group/s", "h2") == "redo"
    (folder / "stale.bin").write_bytes(b"0")
    ex.execute(PlannedStage(stage, "h2", "redo"), ONE, "group/s", "[1/1]")
    assert not (folder / "stale.bin").exists() and ex.record("group/s")["hash"] == "h2"


def test_an_inline_stage_runs_every_time(tmp_path):
    calls = []
    stage = Stage("report", (), {}, run_inline=lambda: calls.append(1), folder=tmp_path / "r")
    ex = StageExecutor(tmp_path / "records")
    for _ in range(2):
        ex.execute(PlannedStage(stage, "h", "run"), ONE, "report", "[1/1]")
    assert calls == [1, 1]


def test_hashes_do_not_depend_on_the_folders(tmp_path, ml1m_dir):
    settings = load_pipeline_settings(tiny_config(tmp_path, ml1m_dir, "default", "a"))
    moved = build_stages(
        settings, dirs={name: tmp_path / "elsewhere" / name for name in ("prepare", "sim", "lora")}
    )
    assert plan_hashes(build_stages(settings)) == plan_hashes(moved)
    assert Path(moved[0].folder) == tmp_path / "elsewhere" / "prepare"
    # a retrieval of more K values than this pipeline reads is another retrieval, and the stages after it follow
    more = plan_hashes(build_stages(settings, ks=(20, 5, 3)))
    base = plan_hashes(build_stages(settings))
    assert (
        more["index"] == base["index"]
        and more["retrieval"] != base["retrieval"]
        and more["sim"] != base["sim"]
    )
