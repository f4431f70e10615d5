"""Class 4: config mistakes are loud. Unknown or misspelled sections and keys, empty required paths, wrong
shapes, invalid values and an output location that cannot be created are all reported together, with
exit 2, before any data is read, for every command; no output folder appears."""

from __future__ import annotations

import pytest
import yaml

from tests.bad_input.corpus import run_cli, write_ml25m


@pytest.fixture
def raw(tmp_path):
    return write_ml25m(tmp_path / "raw")


def _config(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


CASES = {
    "misspelled section": (
        "prepar:\n  dataset: ml-1m\n",
        ["unknown section 'prepar' (did you mean 'prepare'?)"],
    ),
    "file without the section": ("pipeline:\n  name: x\n", ["has no 'prepare' section"]),
    "flat keys, no section": ("dataset: ml-1m\nmin_history: 3\n", ["put them under `prepare:`"]),
    "key outside its section": (
        "prepare:\n  kcore: 2\nmin_history: 3\n",
        ["'min_history' is at the top level"],
    ),
    "section is a string": (
        "prepare: ml-1m\n",
        ["prepare: expected a section (mapping of its keys), got str"],
    ),
    "section is a list": ("prepare: [1, 2]\n", ["got list"]),
    "empty raw_dir": ("prepare:\n  raw_dir: ''\n", ["raw_dir is empty", "'bundled'"]),
    "empty output_dir": ("prepare:\n  output_dir: ''\n", ["output_dir is empty"]),
    "misspelled key": (
        "prepare:\n  min_histroy: 3\n",
        ["unknown key 'min_histroy' (did you mean 'min_history'?)"],
    ),
    "invalid values together": (
        "prepare:\n  kcore: -1\n  dataset: netflix\n  split: [0.5, 0.5, 0.5]\n",
        ["kcore must be >= 0", "dataset must be one of", "split must be three positive"],
    ),
    "wrong type and unknown key together": (
        "prepare:\n  seed: 1.5\n  colour: red\n  goodreads: oops\n",
        ["seed: expected int", "unknown key 'colour'", "goodreads: expected a section"],
    ),
    "a top level that is a list": ("- prepare\n", ["top level must be a mapping"]),
    "unquoted octal for a path": ("prepare:\n  output_dir: 0755\n", ["expected a string, got 493"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: c.replace(" ", "_"))
def test_prepare_config_mistakes(capsys, tmp_path, monkeypatch, case):
    text, fragments = CASES[case]
    monkeypatch.chdir(tmp_path)
    path = _config(tmp_path, text)
    run_cli(capsys, "prepare", "--config", path).assert_user_error(str(path), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written, bundled not read


def test_every_problem_is_its_own_error_line(capsys, tmp_path):
    path = _config(tmp_path, "prepare:\n  kcore: five\n  min_histroy: 3\n  colour: red\n")
    result = run_cli(capsys, "prepare", "--config", path, "seed=x")
    result.assert_user_error()
    lines = result.err.strip().splitlines()
    assert len([line for line in lines if line.startswith(f"error: {path}: ")]) >= 4, result.err


def test_output_location_that_cannot_be_created_is_a_config_error(capsys, raw, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    run_cli(capsys, "prepare", f"raw_dir={raw}", f"output_dir={blocker}/sub/out").assert_user_error(
        "output_dir=", "which is a file"
    )


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train_sim", "epochs=-1x"], ["epochs: expected int"]),
        (["train_sim", "crm.serach=hard"], ["unknown key 'crm.serach' (did you mean 'crm.search'?)"]),
        (["train_plora", "adapter.num_experts=four"], ["adapter.num_experts: expected int"]),
        (["train_plora", "lr"], ["is not of the form key.sub=value"]),
        (
            ["extract_item_embeddings", "--dataset", "d", "--out", "o", "batch_size=0"],
            ["batch_size must be >= 1"],
        ),
        (["pipeline", "--config", "{pipe}"], ["unknown section 'sym' (did you mean 'sim'?)"]),
        (
            ["pipeline", "--config", "{pipe}", "sim.epochs=x"],
            ["unknown section 'sym'", "[sim] epochs: expected int"],
        ),
    ],
    ids=[
        "sim-type",
        "sim-misspelled",
        "plora-type",
        "plora-no-equals",
        "embeddings-range",
        "pipeline-section",
        "pipeline-both",
    ],
)
def test_other_commands_report_config_mistakes_before_any_work(capsys, tmp_path, argv, fragments):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump({"sym": {"epochs": 1}, "prepare": {"raw_dir": str(tmp_path)}}))
    result = run_cli(capsys, *[a.format(pipe=pipe) for a in argv])
    result.assert_user_error(*fragments)


def test_train_plora_config_without_its_section_is_an_error_not_defaults(capsys, tmp_path):
    path = _config(tmp_path, "lr: 0.001\nretrieval_dir: runs/x/retrieval\n")
    run_cli(capsys, "train_plora", "--config", path).assert_user_error(
        "has no 'plora' section", "put them under `plora:`"
    )


def test_train_sim_given_a_pipeline_file_is_an_error(capsys, tmp_path):
    path = _config(tmp_path, "sim:\n  epochs: 2\npipeline:\n  name: x\n")
    run_cli(capsys, "train_sim", "--config", path).assert_user_error("not a pipeline file")
