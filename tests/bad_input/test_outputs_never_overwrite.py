"""Class 1: outputs never overwrite or delete a user's files; a rerun leaves the old or the new output,
never a mix; loaders refuse a folder that does not match its metadata.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reclora_ds.data.processed import ProcessedDataError, ProcessedDataset
from tests.bad_input.corpus import metadata, prepare_args, run_cli, sha256_tree, write_ml25m


@pytest.fixture
def raw(tmp_path):
    return write_ml25m(tmp_path / "raw")


def _user_folder(path: Path) -> dict[str, str]:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("prepare:\n  dataset: ml-1m\n")
    (path / "metadata.json").write_text('{"mine": true}')
    (path / "samples").mkdir()
    (path / "samples" / "train-00000-of-00001.parquet").write_bytes(b"my own parquet")
    return sha256_tree(path)


def test_prepare_refuses_a_folder_of_user_files_and_touches_nothing(capsys, raw, tmp_path):
    out = tmp_path / "mine"
    before = _user_folder(out)
    run_cli(capsys, *prepare_args(raw, out)).assert_user_error("output_dir=", "not an earlier output")
    assert sha256_tree(out) == before


def test_output_dir_dot_with_the_users_config_is_refused(capsys, raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(f"prepare:\n  raw_dir: {raw}\n  few_shot_size: 10\n")
    before = config.read_bytes()
    run_cli(capsys, "prepare", "--config", "config.yaml", "output_dir=.").assert_user_error(
        "config.yaml: output_dir='.'", "current folder"
    )
    assert config.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "raw"]


def test_output_folder_holding_the_config_file_is_refused(capsys, raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = out / "my.yaml"
    config.write_text(f"prepare:\n  raw_dir: {raw}\n  output_dir: {out}\n")
    run_cli(capsys, "prepare", "--config", config).assert_user_error("holds", "my.yaml")
    assert config.is_file()


@pytest.mark.parametrize("where", ["raw", "parent"])
def test_output_that_is_or_holds_the_raw_folder_is_refused(capsys, raw, where):
    out = raw if where == "raw" else raw.parent
    before = sha256_tree(raw)
    run_cli(capsys, *prepare_args(raw, out)).assert_user_error("output_dir=")
    assert sha256_tree(raw) == before


@pytest.mark.slow
def test_rerun_replaces_an_earlier_output_whole_without_stale_shards(capsys, raw, tmp_path):
    out = tmp_path / "out"
    assert run_cli(capsys, *prepare_args(raw, out, "shards_per_split=4")).code == 0
    assert run_cli(capsys, *prepare_args(raw, out, "shards_per_split=1")).code == 0
    listed = {n for names in metadata(out)["shards"].values() for n in names}
    assert {p.name for p in (out / "samples").iterdir()} == listed  # no shard of the first run left
    assert all(n.endswith("-of-00001.parquet") for n in listed)
    ProcessedDataset(out)  # consistent


@pytest.mark.slow
def test_a_failure_while_writing_leaves_the_previous_output_intact(capsys, raw, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(capsys, *prepare_args(raw, out)).code == 0
    before = sha256_tree(out)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr("reclora_ds.data.prepare.plot_summary", boom)
    with pytest.raises(OSError):
        from reclora_ds.data.config import PrepareConfig
        from reclora_ds.data.prepare import prepare_dataset

        prepare_dataset(PrepareConfig(raw_dir=str(raw), output_dir=str(out), few_shot_size=10, min_history=3))
    assert sha256_tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temporary left


def test_a_folder_holding_only_the_pipelines_stage_config_counts_as_empty(tmp_path):
    from reclora_ds.config import STAGE_CONFIG_FILE, output_dir_problems
    from reclora_ds.data.prepare import own_output_problem
    from reclora_ds.pipeline.stages import CONFIG_FILE

    assert CONFIG_FILE == STAGE_CONFIG_FILE  # one name for the pipeline's file
    out = tmp_path / "prepare"
    out.mkdir()
    (out / STAGE_CONFIG_FILE).write_text("prepare: {}\n")
    assert (
        output_dir_problems(
            out, "output_dir", is_own_output=own_output_problem, protected=[out / STAGE_CONFIG_FILE]
        )
        == []
    )
    (out / "notes.txt").write_text("mine")
    assert output_dir_problems(out, "output_dir", is_own_output=own_output_problem)


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    from reclora_ds.data.config import PrepareConfig
    from reclora_ds.data.prepare import prepare_dataset

    raw = write_ml25m(tmp_path_factory.mktemp("raw") / "raw")
    out = tmp_path_factory.mktemp("processed") / "data"
    prepare_dataset(
        PrepareConfig(raw_dir=str(raw), output_dir=str(out), few_shot_size=10, shards_per_split=2)
    )
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_loader_refuses_a_missing_shard(processed, tmp_path):
    data = _copy(processed, tmp_path / "d")
    next((data / "samples").glob("valid-*.parquet")).unlink()
    with pytest.raises(ProcessedDataError, match="lacks 1 shard"):
        ProcessedDataset(data)


def test_loader_refuses_a_shard_of_another_run(processed, tmp_path):
    data = _copy(processed, tmp_path / "d")
    pq.write_table(pa.table({"sample_id": [1]}), data / "samples" / "train-00000-of-00009.parquet")
    with pytest.raises(ProcessedDataError, match="a mix of two runs"):
        ProcessedDataset(data)


def test_loader_refuses_row_counts_that_differ_from_the_metadata(processed, tmp_path):
    data = _copy(processed, tmp_path / "d")
    shard = sorted((data / "samples").glob("test-*.parquet"))[0]
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard)
    with pytest.raises(ProcessedDataError, match="split 'test' has"):
        ProcessedDataset(data)


def test_loader_refuses_another_schema_version_and_a_short_timeline(processed, tmp_path):
    data = _copy(processed, tmp_path / "d")
    meta = json.loads((data / "metadata.json").read_text())
    (data / "metadata.json").write_text(json.dumps(meta | {"schema_version": 99}))
    with pytest.raises(ProcessedDataError, match="schema_version 99"):
        ProcessedDataset(data)
    (data / "metadata.json").write_text(json.dumps(meta))
    t = pq.read_table(data / "timelines.parquet")
    pq.write_table(t.slice(1), data / "timelines.parquet")
    with pytest.raises(ProcessedDataError, match="timelines.parquet"):
        ProcessedDataset(data)


@pytest.mark.parametrize(
    "argv",
    [
        ["train_sim", "output_dir={out}", "data_dir={out}"],
        ["train_plora", "output_dir={out}"],
        ["make_synthetic_ml25m", "--out", "{out}", "--rows", "3000"],
        ["build_faiss_index", "--embeddings", "{out}", "--out", "{out}"],
        ["retrieve_histories", "--processed", "{out}", "--index", "{out}", "--ks", "5", "--out", "{out}"],
        ["extract_item_embeddings", "--dataset", "{out}", "--out", "{out}"],
    ],
    ids=lambda a: a[0],
)
def test_every_command_refuses_an_output_folder_of_user_files(capsys, tmp_path, argv):
    out = tmp_path / "mine"
    before = _user_folder(out)
    run_cli(capsys, *[a.format(out=out) for a in argv]).assert_user_error(str(out), "not an earlier output")
    assert sha256_tree(out) == before


def test_output_under_a_file_is_refused_for_prepare_and_train_sim(capsys, raw, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    run_cli(capsys, *prepare_args(raw, blocker / "out")).assert_user_error("which is a file")
    run_cli(capsys, "train_sim", f"output_dir={blocker / 'run'}").assert_user_error("which is a file")
    assert blocker.read_text() == "x" and os.path.isfile(blocker)
