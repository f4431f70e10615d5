"""Shared fixtures: paths of the vendored real data and a prepared bundled dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from reclora_ds.config import PrepareConfig
from reclora_ds.data.prepare import bundled_dataset, prepare_dataset

FIXTURES = Path(__file__).parent / "fixtures"


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
