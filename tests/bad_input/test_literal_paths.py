"""Class 3: paths are never rewritten. ``key=value`` overrides of string settings are literal (only other
types are parsed as YAML); raw files are opened exactly where the path says (no glob, no fsspec protocol);
the recorded sha256 is of the bytes read."""

from __future__ import annotations

import hashlib

import pytest

from reclora_ds.config import ConfigError, load_config
from reclora_ds.data.config import PrepareConfig
from tests.bad_input.corpus import metadata, prepare_args, ratings_rows, run_cli, write_ml25m


@pytest.mark.parametrize(
    "text", ["/data/raw #2", "0755", "1e3", "yes", "null", "~", "[a, b]", "{x: 1}", "2024-01-01", " spaced "]
)
def test_string_overrides_are_literal(text):
    cfg = load_config(PrepareConfig, None, [f"output_dir={text}", f"raw_dir={text}x"])
    assert cfg.output_dir == text
    assert cfg.raw_dir == f"{text}x"


def test_a_wholly_quoted_override_is_a_yaml_quoted_string():
    """The one exception, so that the empty string (CONFIG.md's ``''``) can be typed after ``key=``."""
    cfg = load_config(PrepareConfig, None, ['output_dir="a #b"', "raw_dir='x'y'"])
    assert (cfg.output_dir, cfg.raw_dir) == ("a #b", "'x'y'")  # the second is not valid YAML: literal
    with pytest.raises(ConfigError, match="output_dir is empty"):
        load_config(PrepareConfig, None, ["output_dir=''"])


def test_non_string_overrides_are_still_parsed_as_yaml():
    cfg = load_config(PrepareConfig, None, ["min_history=3", "split=[0.7, 0.2, 0.1]", "strict=true"])
    assert (cfg.min_history, cfg.split, cfg.strict) == (3, (0.7, 0.2, 0.1), True)


def test_optional_string_override_null_means_none_and_other_text_is_literal():
    from reclora_ds.retrieval.embeddings import ItemEmbeddingConfig

    assert load_config(ItemEmbeddingConfig, None, ["shard_dir=null"]).shard_dir is None
    assert load_config(ItemEmbeddingConfig, None, ["shard_dir=0755"]).shard_dir == "0755"
    assert load_config(ItemEmbeddingConfig, None, ["shard_dir=/x #1"]).shard_dir == "/x #1"


def test_unquoted_number_for_a_string_setting_in_a_file_is_an_error_not_a_conversion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prepare:\n  output_dir: 0755\n")  # YAML 1.1 reads this as the octal int 493
    with pytest.raises(ConfigError, match=r"output_dir: expected a string, got 493 .*quote it"):
        load_config(PrepareConfig, path)
    path.write_text("prepare:\n  output_dir: '0755'\n")
    assert load_config(PrepareConfig, path).output_dir == "0755"


def test_train_sim_and_pipeline_overrides_keep_hashes_and_octal_text():
    from reclora_ds.pipeline.config import load_pipeline_settings
    from reclora_ds.training.crm_config import CRMTrainConfig

    assert load_config(CRMTrainConfig, None, ["output_dir=runs/#2 0755"]).output_dir == "runs/#2 0755"
    settings = load_pipeline_settings(
        None, ["pipeline.name=0755", "embeddings.shard_dir=s #1", "prepare.raw_dir=r #2"]
    )
    assert (settings.pipeline.name, settings.embeddings.shard_dir) == ("0755", "s #1")
    assert settings.prepare.raw_dir == "r #2"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["raw[12]", "raw [v1]", "ml::small", "raw*", "data #2", "s3:x"])
def test_raw_folders_with_glob_or_protocol_characters_are_read_literally(capsys, tmp_path, name):
    """A sibling that the name would match as a glob holds different data: the right one must be read."""
    raw = write_ml25m(tmp_path / name)
    decoy_rows = [(u, i, r, t) for u, i, r, t in ratings_rows() if u <= 6]  # fewer rows
    write_ml25m(tmp_path / "raw1", decoy_rows)
    write_ml25m(tmp_path / "rawx", decoy_rows)
    out = tmp_path / "out"
    result = run_cli(capsys, *prepare_args(raw, out))
    assert result.code == 0, result.err
    m = metadata(out)
    assert m["counts"]["raw_rows"] == len(ratings_rows())
    assert m["raw_dir"] == str(raw)
    for entry in m["raw_files"]:
        assert entry["sha256"] == hashlib.sha256((raw / entry["name"]).read_bytes()).hexdigest()


def test_literal_lines_reads_a_gz_file_under_a_bracketed_folder(tmp_path):
    import gzip

    from reclora_ds.data.raw.delimited import literal_lines

    folder = tmp_path / "g[1]"
    folder.mkdir()
    with gzip.open(folder / "a.json.gz", "wt") as f:
        f.write('{"a": 1}\r\n{"a": 2}\r{"a": 3}\n')
    (tmp_path / "g1").mkdir()  # what the glob g[1] would match
    batches = list(literal_lines(folder / "a.json.gz", "utf-8", 2, keep_linebreaks=True))
    assert [b.to_pylist() for b in batches] == [['{"a": 1}\n', '{"a": 2}\n'], ['{"a": 3}\n']]
