"""Class 6b: a run's saved ``config.yaml`` is a valid ``--config`` of the command that made it (same
sections), and a config file without the section a command reads is an error, not defaults."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from reclora_ds.config import ConfigError, config_section, load_config, save_config
from reclora_ds.data.config import PrepareConfig
from tests.bad_input.corpus import metadata, prepare_args, run_cli, sha256_tree, write_ml25m


def _configs():
    from reclora_ds.retrieval.embeddings import ItemEmbeddingConfig
    from reclora_ds.training.crm_config import CRMTrainConfig
    from reclora_ds.training.plora_config import PLoRATrainConfig

    return [PrepareConfig, CRMTrainConfig, PLoRATrainConfig, ItemEmbeddingConfig]


@pytest.mark.parametrize("cls", _configs(), ids=lambda c: c.__name__)
def test_save_then_load_gives_the_same_config(tmp_path, cls):
    cfg = cls()
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(cls, path) == cfg
    section = config_section(cls)
    data = yaml.safe_load(path.read_text())
    assert (list(data) == [section]) if section else ("seed" in data or len(data) > 1)


def test_prepare_config_is_saved_under_its_section():
    assert config_section(PrepareConfig) == "prepare"


def test_explicit_section_round_trips_for_the_plora_reader(tmp_path):
    """What ``train_plora --config`` reads: the saved file under ``plora:`` loads with ``section='plora'``."""
    from reclora_ds.training.plora_config import PLoRATrainConfig

    cfg = dataclasses.replace(PLoRATrainConfig(), lr=1e-4)
    path = save_config(cfg, tmp_path / "config.yaml", section="plora")
    assert list(yaml.safe_load(path.read_text())) == ["plora"]
    assert load_config(PLoRATrainConfig, path, section="plora") == cfg


def test_stage2_saved_config_has_the_plora_section():
    from reclora_ds.training.plora_config import PLoRATrainConfig

    assert config_section(PLoRATrainConfig) == "plora"


def test_flat_file_for_a_sectioned_command_is_an_error_naming_the_section(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"min_history": 3, "dataset": "ml-1m"}))
    with pytest.raises(ConfigError, match=r"has no 'prepare' section.*put them under `prepare:`"):
        load_config(PrepareConfig, path)


@pytest.mark.parametrize(
    "text", ["", "{}\n", "sim:\n  epochs: 1\n"], ids=["empty", "empty-mapping", "other-section"]
)
def test_a_file_without_the_section_is_never_the_defaults(capsys, tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    run_cli(capsys, "prepare", "--config", path).assert_user_error("has no 'prepare' section")
    run_cli(capsys, "train_plora", "--config", path).assert_user_error("has no 'plora' section")


def test_an_empty_section_means_its_defaults_explicitly(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prepare:\n")
    assert load_config(PrepareConfig, path) == PrepareConfig()


@pytest.mark.slow
def test_prepare_output_config_reruns_prepare_to_the_same_data(capsys, tmp_path):
    raw = write_ml25m(tmp_path / "raw")
    first = tmp_path / "first"
    assert run_cli(capsys, *prepare_args(raw, first, "min_history=3")).code == 0
    saved = tmp_path / "saved.yaml"
    saved.write_bytes((first / "config.yaml").read_bytes())
    second = tmp_path / "second"
    result = run_cli(capsys, "prepare", "--config", saved, f"output_dir={second}")
    assert result.code == 0, result.err
    a, b = metadata(first), metadata(second)
    assert a["counts"] == b["counts"] and a["config"]["min_history"] == b["config"]["min_history"] == 3
    trees = sha256_tree(first / "samples"), sha256_tree(second / "samples")
    assert trees[0] == trees[1]


def test_train_sim_reads_its_saved_flat_config(tmp_path):
    from reclora_ds.training.crm_config import CRMTrainConfig

    cfg = load_config(CRMTrainConfig, None, ["epochs=3", "output_dir=runs/x #1"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(CRMTrainConfig, path) == cfg
