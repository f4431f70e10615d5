"""The processed dataset a benchmark runs on: ``--data`` when given, else the bundled real MovieLens sample
(ml-latest-small) prepared into a temporary folder with the default recipe."""

from __future__ import annotations

from pathlib import Path


def processed_data(data: str, tmp: str | Path) -> Path:
    """``data`` when it is set; otherwise prepare the bundled sample into ``tmp/data`` and return that."""
    if data:
        return Path(data)
    from reclora_ds.config import PrepareConfig
    from reclora_ds.data.prepare import prepare_dataset

    out = Path(tmp) / "data"
    prepare_dataset(PrepareConfig(raw_dir="", output_dir=str(out), few_shot_size=1000))
    return out
