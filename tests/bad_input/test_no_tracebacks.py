"""Class 5: foreseeable mistakes never end in a traceback. Every command prints ``error: <file/key>:
<reason>`` and exits 2; the ones that need the data are detected right after reading, the others before.
The subprocess case checks the real console script's exit status."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from tests.bad_input.corpus import (
    GOODREADS_DATE,
    goodreads_user,
    prepare_args,
    ratings_rows,
    run_cli,
    write_goodreads,
    write_ml25m,
)


@pytest.fixture
def raw(tmp_path):
    return write_ml25m(tmp_path / "raw")


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (
            ["min_history=50"],
            ["error: min_history: min_history=50 leaves no sample", "longest user timeline"],
        ),
        (["kcore=500"], ["error: kcore: kcore=500 removes all"]),
        (["min_history=11", "split=[0.98, 0.01, 0.01]"], ["error: split:", "every split needs at least one"]),
        (["seed=-1"], ["seed must be in [0, 2**63), got -1"]),
    ],
    ids=["min_history", "kcore", "split", "seed"],
)
def test_settings_that_leave_nothing(capsys, raw, tmp_path, extra, fragments):
    out = tmp_path / "out"
    run_cli(capsys, *prepare_args(raw, out, *extra)).assert_user_error(*fragments)
    assert not out.exists()


def test_output_path_under_a_file(capsys, raw, tmp_path):
    (tmp_path / "f").write_text("")
    run_cli(capsys, *prepare_args(raw, tmp_path / "f" / "out")).assert_user_error(
        "lies under", "which is a file"
    )


def test_goodreads_books_matching_no_interaction(capsys, tmp_path):
    books = [{"book_id": str(1000 + i), "title": f"Other {i}"} for i in range(5)]
    raw = write_goodreads(tmp_path / "gr", books=books)
    run_cli(capsys, *prepare_args(raw, tmp_path / "out", dataset="goodreads")).assert_user_error(
        "goodreads_books_x.json.gz", "is one the interactions rate"
    )


def test_goodreads_pathologically_nested_json_line(capsys, tmp_path):
    raw = write_goodreads(tmp_path / "gr")
    with gzip.open(raw / "goodreads_interactions_x.json.gz", "rt") as f:
        lines = f.read().splitlines()
    lines.insert(3, '{"user_id": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with gzip.open(raw / "goodreads_interactions_x.json.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    run_cli(capsys, *prepare_args(raw, tmp_path / "out", dataset="goodreads")).assert_user_error(
        "goodreads_interactions_x.json.gz:4"
    )


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"prepare:\n" + b"  " * 1 + b"[" * 3_000 + b"]" * 3_000 + b"\n", "c.yaml"),
        (b"prepare:\n  raw_dir: caf\xe9\n", "not UTF-8 text"),
        (b"prepare:\n  raw_dir: [unclosed\n", "not valid YAML"),
    ],
    ids=["nested-yaml", "latin1-yaml", "broken-yaml"],
)
def test_unreadable_config_files(capsys, tmp_path, content, fragment):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    run_cli(capsys, "prepare", "--config", path).assert_user_error(fragment)


def test_config_that_is_a_folder_or_missing(capsys, tmp_path):
    run_cli(capsys, "prepare", "--config", tmp_path).assert_user_error("is a folder, not a YAML config file")
    run_cli(capsys, "train_sim", "--config", tmp_path / "nope.yaml").assert_user_error(
        "config file not found"
    )


def test_raw_dir_that_is_a_file_or_missing(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    run_cli(capsys, *prepare_args(tmp_path / "f", tmp_path / "o1")).assert_user_error(
        "raw data folder not found"
    )
    run_cli(capsys, *prepare_args(tmp_path / "none", tmp_path / "o2", dataset="goodreads")).assert_user_error(
        "folder not found"
    )


def test_commands_given_missing_inputs(capsys, tmp_path):
    run_cli(
        capsys, "build_faiss_index", "--embeddings", tmp_path / "none", "--out", tmp_path / "idx"
    ).assert_user_error("none")
    run_cli(
        capsys, "retrieve_histories", "--processed", tmp_path / "none", "--index", tmp_path / "i", "--ks", "5"
    ).assert_user_error("none")


def test_user_error_types_are_caught_centrally_and_bugs_keep_their_traceback():
    from reclora_ds import cli
    from reclora_ds.config import UserError

    def mistake():
        raise UserError("x.yaml: something the user did")

    assert cli.run_command(mistake) == 2

    def bug():
        raise KeyError("internal")

    with pytest.raises(KeyError):
        cli.run_command(bug)


@pytest.mark.slow
def test_the_console_script_exits_2_without_a_traceback(tmp_path):
    raw = write_ml25m(tmp_path / "raw", [(u, i, r, t) for u, i, r, t in ratings_rows() if u <= 2])
    proc = subprocess.run(
        [sys.executable, "-m", "reclora_ds", *prepare_args(raw, tmp_path / "out", "min_history=40")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "error: min_history:" in proc.stderr


def test_goodreads_date_constant_is_the_documented_shape():
    import pyarrow as pa

    from reclora_ds.data.raw.goodreads.parsing import parse_goodreads_dates

    _, ok = parse_goodreads_dates(pa.array([GOODREADS_DATE]))
    assert ok.all() and len(goodreads_user(5)) == 32 and json.dumps({"a": 1})
