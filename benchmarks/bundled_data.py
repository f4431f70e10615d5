"""The processed dataset a benchmark runs on: ``--data`` when given, else the bundled real MovieLens sample
(ml-latest-small) prepared into a temporary folder with the default recipe."""

from __future__ import annotations

from pathlib import Path


def processed_data(data: str, tmp: str | Path) -> Path:
    """``data`` when it is set; otherwise prepare the bundled sample into ``tmp/data`` and return that."""
    if data:
        return Path(data)
    from reclora_ds.data.config import PrepareConfig
    from reclora_ds.data.prepare import prepare_dataset

    out = Path(tmp) / "data"
    prepare_dataset(PrepareConfig(raw_dir="", output_dir=str(out), few_shot_size=1000))
    return out


def retrieval_overrides(config: str, overrides: list[str], data: Path, tmp: str | Path) -> list[str]:
    """The overrides that give a CRM config with ``history_mode=retrieved`` a retrieval folder of ``data``.

    Nothing when the config reads recent histories, or its ``retrieval_dir`` already holds a retrieval of
    this dataset. Otherwise a stand-in is written into ``tmp/retrieval``: the retriever's ``recent`` mode
    (no item embeddings or index needed) for K = ``history_length``. It has the shapes, lookups and loader
    cost of the semantic retrieval, with other rows: fine for speed, not for accuracy.
    """
    from reclora_ds.config import load_config
    from reclora_ds.data.histories import RetrievedHistoriesError, load_retrieved
    from reclora_ds.retrieval.retriever import retrieve_histories
    from reclora_ds.training.crm_config import CRMTrainConfig

    cfg = load_config(CRMTrainConfig, config, [f"data_dir={data}", *overrides])
    if cfg.history_mode != "retrieved":
        return []
    try:
        load_retrieved(cfg.retrieval_dir, data).require_k(cfg.history_length)
        return []
    except (RetrievedHistoriesError, FileNotFoundError):
        pass
    out = Path(tmp) / "retrieval"
    retrieve_histories(data, None, ks=(cfg.history_length,), mode="recent", out_dir=out)
    print(f"no retrieval of {data} at {cfg.retrieval_dir}: timing on a stand-in ('recent' mode) in {out}")
    return [f"retrieval_dir={out}"]
