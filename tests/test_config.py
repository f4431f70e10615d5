"""Config system: YAML + dotted overrides, all problems reported at once, resolved config saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reclora_ds.config import (
    ConfigError,
    PrepareConfig,
    config_to_dict,
    field_paths,
    load_config,
    save_config,
)

CONFIGS = Path(__file__).parents[1] / "launch" / "configs"


def test_defaults_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prepare:\n  dataset: ml-1m\n  min_history: 3\n")
    cfg = load_config(
        PrepareConfig,
        path,
        ["kcore=5", "prepare.seed=7", "goodreads.timestamp_field=date_updated", "split=[0.7, 0.2, 0.1]"],
        section="prepare",
    )
    assert (cfg.dataset, cfg.min_history, cfg.kcore, cfg.seed) == ("ml-1m", 3, 5, 7)
    assert cfg.goodreads.timestamp_field == "date_updated"
    assert cfg.split == (0.7, 0.2, 0.1)
    assert cfg.few_shot_size == 70_000  # untouched default


def test_all_problems_reported_together_with_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prepare:\n  min_histroy: 3\n  kcore: five\n  goodreads: {colour: red}\n")
    with pytest.raises(ConfigError) as info:
        load_config(PrepareConfig, path, ["seed=1.5", "strict=maybe"], section="prepare")
    msg = str(info.value)
    for expected in (
        "unknown key 'min_histroy'",
        "kcore: expected int",
        "unknown key 'goodreads.colour'",
        "seed: expected int",
        "strict: expected bool",
        "valid keys:",
        "goodreads.books_glob",
    ):
        assert expected in msg, msg
    assert str(path) in msg


def test_post_init_checks_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="split must be three positive fractions"):
        load_config(PrepareConfig, None, ["split=[0.5, 0.5, 0.5]"])
    with pytest.raises(ConfigError, match="dataset must be one of"):
        load_config(PrepareConfig, None, ["dataset=netflix"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        load_config(PrepareConfig, None, ["min_history"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PrepareConfig, tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(PrepareConfig, None, ["min_history=9", "goodreads.books_glob=b*.json.gz"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(PrepareConfig, path) == cfg
    assert set(field_paths(PrepareConfig)) >= {"min_history", "goodreads.books_glob"}
    assert yaml.safe_load(path.read_text()) == config_to_dict(cfg)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    data = yaml.safe_load(path.read_text())
    if "prepare" in data:
        load_config(PrepareConfig, path, section="prepare")


def test_literal_fields_and_exponent_floats():
    from reclora_ds.config import CRMTrainConfig

    cfg = load_config(CRMTrainConfig, None, ["crm.search=hard", "lr=1e-3"])
    assert cfg.crm.search == "hard" and cfg.lr == 1e-3
    with pytest.raises(ConfigError, match=r"crm.search: expected one of \['soft', 'hard', 'precomputed'\]"):
        load_config(CRMTrainConfig, None, ["crm.search=fuzzy"])
