"""The pipeline's own settings and the stage configs it resolves from one YAML file.

One file drives the whole run (``launch/configs/quickstart.yaml``)::

    pipeline:   PipelineConfig (below): run name, ranks, launcher, which stage-2 modes, index
    prepare:    PrepareConfig            (reclora_ds.data.config)
    sim:        CRMTrainConfig           (reclora_ds.training.crm_config)
    embeddings: ItemEmbeddingConfig      (reclora_ds.retrieval.embeddings)
    plora:      PLoRATrainConfig         (reclora_ds.training.plora_config), shared by every mode of ``pipeline.modes``

Command-line overrides are dotted keys under those sections (``sim.epochs=2 plora.max_steps=10
pipeline.nproc=1``). The paths that connect the stages (data, CRM, retrieval and output folders, and each
stage-2 stage's mode) belong to the pipeline, which sets them under ``<runs_dir>/<name>/<stage>``
(:data:`PIPELINE_OWNED`): a file or override that sets one is an error naming the key, never silently
replaced. Modelling keys stay the user's: the retrieved K values follow ``sim.history_length`` and
``plora.short_history_length`` (``reclora_ds.pipeline.stages.retrieval_ks``). Every stage config is built
and validated before the first stage starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from reclora_ds.config import (
    ConfigError,
    config_from_dict,
    did_you_mean,
    merge,
    parse_overrides,
    read_yaml_mapping,
)
from reclora_ds.data.config import PrepareConfig
from reclora_ds.models.rec_llm import MODES
from reclora_ds.retrieval.embeddings import ItemEmbeddingConfig
from reclora_ds.training.crm_config import CRMTrainConfig
from reclora_ds.training.plora_config import PLoRATrainConfig


@dataclasses.dataclass
class PipelineConfig:
    name: str = "quickstart"
    """Run name: every stage writes under ``<runs_dir>/<name>/<stage>``."""
    runs_dir: str = "runs"
    """Folder holding the runs."""
    nproc: int = 2
    """Ranks of the distributed stages (SIM, embeddings, stage 2) on this node."""
    threads_per_rank: int = 0
    """``OMP_NUM_THREADS`` of each rank; 0 = the node's cores divided by ``nproc`` (at least 1)."""
    launcher: Literal["local", "slurm"] = "local"
    """``local``: torchrun / deepspeed on this machine. ``slurm``: every distributed stage is a job step
    started by ``launch/slurm/common.sh`` (``reclora_launch``; the pipeline runs inside an sbatch job)."""
    plora_launcher: Literal["deepspeed", "torchrun"] = "deepspeed"
    """Local launcher of stage 2 (both run the DeepSpeed ZeRO-2 engine)."""
    modes: tuple[str, ...] = ("lora", "plora")
    """Stage-2 modes to train and evaluate, in order: any of zero_shot, lora, plora."""
    index_kind: Literal["flat", "hnsw", "ivf"] = "flat"
    """FAISS index type of the item index (tools/build_faiss_index.py)."""
    pca_components: int = 512
    """PCA width of the index (capped by the LLM's hidden size)."""

    def __post_init__(self) -> None:
        problems = []
        if not self.name or "/" in self.name:
            problems.append(f"name={self.name!r} must be a non-empty folder name")
        if self.nproc < 1:
            problems.append(f"nproc={self.nproc} must be >= 1")
        if self.threads_per_rank < 0:
            problems.append(f"threads_per_rank={self.threads_per_rank} must be >= 0")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes or len(set(self.modes)) != len(self.modes):
            problems.append(f"modes={list(self.modes)} must be distinct values of {list(MODES)}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


# section name -> its dataclass; the file's top level may hold nothing else.
SECTIONS: dict[str, type] = {
    "pipeline": PipelineConfig,
    "prepare": PrepareConfig,
    "sim": CRMTrainConfig,
    "embeddings": ItemEmbeddingConfig,
    "plora": PLoRATrainConfig,
}


# The keys the pipeline sets itself (paths between stages, the mode of each stage-2 stage).
PIPELINE_OWNED: dict[str, tuple[str, ...]] = {
    "prepare": ("output_dir",),
    "sim": ("data_dir", "output_dir", "retrieval_dir"),
    "embeddings": ("backbone",),
    "plora": ("data_dir", "output_dir", "crm_path", "retrieval_dir", "mode"),
}
_OWNED_WHY = {
    "embeddings.backbone": "the items are embedded with plora.backbone",
    "plora.mode": "each mode of pipeline.modes is its own stage",
}


@dataclasses.dataclass
class PipelineSettings:
    """Every section of a pipeline file, validated; the stage paths are not yet filled in."""

    pipeline: PipelineConfig
    prepare: PrepareConfig
    sim: CRMTrainConfig
    embeddings: ItemEmbeddingConfig
    plora: PLoRATrainConfig
    source: str


def load_pipeline_settings(path: str | Path | None, overrides: Sequence[str] = ()) -> PipelineSettings:
    """Read a pipeline YAML file plus ``section.key=value`` overrides; every problem reported at once.

    Raises:
        ConfigError: unknown sections or keys, wrong types, failed checks (all of them, per section).
    """
    source = str(path) if path else "<defaults>"
    data = read_yaml_mapping(path) if path is not None else {}
    tree, problems = parse_overrides(overrides)
    data = merge(data, tree)
    problems += [
        f"unknown section {key!r}{did_you_mean(str(key), list(SECTIONS))} (valid sections: {', '.join(SECTIONS)})"
        for key in data
        if key not in SECTIONS
    ]
    for section, keys in PIPELINE_OWNED.items():
        given = data.get(section)
        for key in keys:
            if isinstance(given, Mapping) and key in given:
                name = f"{section}.{key}"
                problems.append(
                    f"{name} is set by the pipeline ({_OWNED_WHY.get(name, 'it connects the stages under <runs_dir>/<name>/')}); "
                    "remove it from the file and the overrides"
                )
    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        value = data.get(section)
        value = {} if value is None else value
        if not isinstance(value, Mapping):
            problems.append(
                f"{section}: expected a section (mapping of its keys), got {type(value).__name__} {value!r}"
            )
            continue
        try:
            built[section] = config_from_dict(cls, value, f"{source} [{section}]")
        except ConfigError as exc:
            problems += [f"[{section}] {problem}" for problem in exc.problems]
    if problems:
        raise ConfigError(problems, source)
    return PipelineSettings(source=source, **built)
