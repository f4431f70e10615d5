"""Config system: YAML + dotted overrides, all problems reported at once, resolved config saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reclora_ds.config import ConfigError, config_to_dict, field_paths, load_config, save_config
from reclora_ds.data.config import PrepareConfig

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
    assert yaml.safe_load(path.read_text()) == {"prepare": config_to_dict(cfg)}  # the section prepare reads


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_through_its_real_loader(path):
    """Pipeline files through the pipeline's loader (and its stage plan), stage files through their stage's."""
    from reclora_ds.pipeline.config import load_pipeline_settings
    from reclora_ds.pipeline.stages import build_stages
    from reclora_ds.training.crm_config import CRMTrainConfig
    from reclora_ds.training.plora_config import PLoRATrainConfig

    data = yaml.safe_load(path.read_text())
    kind = path.name.split("_")[0]
    if "pipeline" in data or path.name == "quickstart.yaml":
        settings = load_pipeline_settings(path)
        assert [s.name for s in build_stages(settings)][-1] == "report"
        load_config(PrepareConfig, path, section="prepare")  # `reclora-ds prepare --config` reads it too
    elif kind == "prepare":
        load_config(PrepareConfig, path, section="prepare")
    elif kind == "sim":
        load_config(CRMTrainConfig, path)
    elif kind == "plora":
        load_config(PLoRATrainConfig, path, section="plora")
    else:
        pytest.fail(f"{path.name}: no known loader for this shipped config")


def test_pipeline_owned_keys_set_by_the_user_are_errors_naming_the_key(tmp_path):
    from reclora_ds.pipeline.config import load_pipeline_settings

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"sim": {"output_dir": "elsewhere"}, "plora": {"epochs": 2}}))
    with pytest.raises(ConfigError) as err:
        load_pipeline_settings(path, ["plora.retrieval_dir=/x", "plora.mode=lora", "prepare.output_dir=o"])
    text = str(err.value)
    for key in ("sim.output_dir", "plora.retrieval_dir", "plora.mode", "prepare.output_dir"):
        assert f"{key} is set by the pipeline" in text
    # modelling keys stay the user's, per mode: the prompt history and the CRM's history
    path.write_text(yaml.safe_dump({"plora": {"epochs": 2}}))
    settings = load_pipeline_settings(path, ["plora.short_history=recent", "sim.history_mode=recent"])
    assert settings.plora.short_history == "recent" and settings.sim.history_mode == "recent"


def test_literal_fields_and_exponent_floats():
    from reclora_ds.training.crm_config import CRMTrainConfig

    cfg = load_config(CRMTrainConfig, None, ["crm.search=hard", "history_mode=recent", "lr=1e-3"])
    assert cfg.crm.search == "hard" and cfg.lr == 1e-3
    with pytest.raises(ConfigError, match=r"crm.search: expected one of \['soft', 'hard', 'precomputed'\]"):
        load_config(CRMTrainConfig, None, ["crm.search=fuzzy"])
