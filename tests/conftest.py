"""Shared fixtures: paths of the vendored real data, prepared datasets, tiny stage-2 assets."""

from __future__ import annotations

from pathlib import Path

import pytest

from reclora_ds.data.config import PrepareConfig
from reclora_ds.data.prepare import bundled_dataset, prepare_dataset

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_collection_modifyitems(items):
    """Tiers: every test that starts several processes (``distributed``) or a SLURM cluster is ``slow``, so
    ``pytest -m "not slow"`` is the quick edit-test loop; CI runs everything."""
    for item in items:
        if item.get_closest_marker("distributed") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_launcher_variables(monkeypatch):
    """No test sees (or passes on) the launcher variables of an outer job or of a previous test: a recipe
    run in-process sets them for its 1-rank group, and they must not leak into later tests."""
    from tests.launch import LAUNCH_VARS

    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def ml_small_dir() -> Path:
    """Real MovieLens ml-latest-small (ML-25M layout), vendored in the package."""
    return bundled_dataset("ml-latest-small")


@pytest.fixture(scope="session")
def ml1m_dir() -> Path:
    """Real MovieLens-1M files restricted to users 1..100."""
    return FIXTURES / "ml-1m-sample"


@pytest.fixture(scope="session")
def ml_small_prepared(tmp_path_factory, ml_small_dir):
    """The bundled sample prepared once with default settings (few_shot_size kept small)."""
    out = tmp_path_factory.mktemp("ml_small_prepared")
    cfg = PrepareConfig(dataset="ml-25m", raw_dir=str(ml_small_dir), output_dir=str(out), few_shot_size=5000)
    return prepare_dataset(cfg)


@pytest.fixture(scope="session")
def ml1m_prepared(tmp_path_factory, ml1m_dir):
    out = tmp_path_factory.mktemp("ml1m_prepared")
    cfg = PrepareConfig(
        dataset="ml-1m", raw_dir=str(ml1m_dir), output_dir=str(out), few_shot_size=1000, shards_per_split=4
    )
    return prepare_dataset(cfg)


PLORA_CRM_HISTORY = 20
"""History length of the ``plora_assets`` CRM (recent histories)."""


@pytest.fixture(scope="session")
def plora_assets(ml1m_prepared, tmp_path_factory) -> dict[str, str]:
    """Stage-2 inputs for the prepared ML-1M sample: a tiny Llama backbone folder (word tokenizer over the
    dataset's titles, chat template) and a tiny random SIM checkpoint. Keys: data_dir, backbone, crm_path."""
    from reclora_ds.data.processed import ProcessedDataset
    from reclora_ds.data.prompts import TextView, prompt_body
    from reclora_ds.data.text import ml1m_profile
    from reclora_ds.models.crm import CRMConfig, FeatureSpec
    from reclora_ds.models.registry import build_crm
    from reclora_ds.training.checkpoint import CRMCheckpointInfo, save_crm_checkpoint
    from tests.tiny_llm import tiny_llama, word_tokenizer

    data_dir = Path(ml1m_prepared.output_dir)
    out = tmp_path_factory.mktemp("plora_assets")
    ds = ProcessedDataset(data_dir)
    profile = ml1m_profile("M", "25", "12")
    corpus = [
        prompt_body("ml-1m", TextView(t, ((t, 4.0), (t, 1.0)), profile, "M"))
        for t in ds.items["title"].to_pylist()
    ]
    tokenizer = word_tokenizer(corpus)
    llm = tiny_llama(tokenizer, max_positions=1024)
    llm.save_pretrained(out / "backbone")
    tokenizer.save_pretrained(out / "backbone")
    spec = FeatureSpec.from_metadata(ds.metadata)
    crm_config = CRMConfig(embedding_dim=8, attention_hidden=16, tower=(16, 16), top_k=10)
    crm = build_crm("sim", crm_config, spec)
    info = CRMCheckpointInfo(
        model="sim",
        config=crm_config,
        feature_spec=spec,
        hidden_dim=crm.hidden_dim,
        history_mode="recent",
        history_length=PLORA_CRM_HISTORY,
    )
    save_crm_checkpoint(out / "crm", crm, info)
    return {"data_dir": str(data_dir), "backbone": str(out / "backbone"), "crm_path": str(out / "crm")}
