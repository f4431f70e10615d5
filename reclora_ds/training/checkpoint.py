"""Self-describing CRM checkpoints, atomic on disk, and the trainer state that makes a resume exact.

A checkpoint is a folder::

    model.safetensors    the CRM's state dict (float32, CPU); its header metadata repeats crm.json
    crm.json             what rebuilds the model without the dataset: model name, CRMConfig, FeatureSpec
                         (fields, sources, vocab sizes, category field, rating buckets), d_c, the history
                         the loader must give it (mode, length, retrieval file), the processed dataset's
                         name, folder and metadata.json sha256, step, epoch, validation metrics
    trainer_state.pt     (``checkpoints/last`` only) optimizer, scheduler, epoch, step, data position,
                         every rank's RNG states, best metric, patience counter, per-epoch history

:func:`load_crm` rebuilds the model from ``crm.json`` alone and loads the weights with strict key and
shape checks. Folders are written atomically (:func:`reclora_ds.files.atomic_dir`): into a temporary sibling, then
renamed over the old one, so a process killed at any moment leaves a complete checkpoint behind
(:func:`resolve_checkpoint` finds it). A disk that fills up during the write raises
:class:`reclora_ds.files.DiskFullError` (``error: <folder>: no space left ...`` from the entry points, exit
2) and leaves the previous checkpoint as it was, loadable (``tests/faults/test_full_disk.py``).

``trainer_state.pt`` holds tensors and plain Python values only (numpy RNG states are stored as tensors),
so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from reclora_ds.data.histories import load_retrieved
from reclora_ds.files import atomic_dir, resolve_old
from reclora_ds.models.crm import LEGACY_SIM, CRMConfig, FeatureSpec, FieldSpec
from reclora_ds.models.registry import build_crm

CRM_FORMAT = "reclora_ds.crm"
CRM_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "crm.json"
TRAINER_STATE_FILE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, incomplete or does not match the model it should rebuild."""


@dataclasses.dataclass
class CRMCheckpointInfo:
    """Everything ``crm.json`` records: enough to rebuild the CRM and to feed it the same batches.

    Attributes:
        model: registry name (:data:`reclora_ds.models.registry.CRM_MODELS`).
        config: the CRMConfig the model was built with.
        feature_spec: the fields and vocabulary sizes of the processed dataset it was trained on.
        hidden_dim: d_c, the width of the CRM state.
        history_mode, history_length: the loader settings of its batches.
        retrieval_dir, retrieval_sha256: for ``retrieved`` histories, the retrieval folder it was trained on
            and its sidecar's checksum (:meth:`history_loader_kwargs` refuses another retrieval).
        dataset: ``{"name", "data_dir", "metadata_sha256"}`` of the processed dataset.
        step, epoch: training position when it was saved.
        metrics: validation metrics at that point (empty when none yet).
        train_config: the resolved training config of the run (provenance; not needed to rebuild).
    """

    model: str
    config: CRMConfig
    feature_spec: FeatureSpec
    hidden_dim: int
    history_mode: str
    history_length: int
    retrieval_dir: str = ""
    retrieval_sha256: str = ""
    dataset: dict[str, str] = dataclasses.field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    train_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def history_loader_kwargs(self, dataset_dir: str | Path) -> dict[str, Any]:
        """The :class:`~reclora_ds.data.loader.CRMBatchLoader` history settings of the CRM's training
        batches: ``history_mode``, ``history_length`` and, for ``retrieved``, the very retrieval it was
        trained on (opened, checked against ``dataset_dir`` and the recorded sidecar checksum)."""
        kwargs: dict[str, Any] = {"history_mode": self.history_mode, "history_length": self.history_length}
        if self.history_mode == "retrieved":
            retrieved = load_retrieved(self.retrieval_dir, dataset_dir)
            if self.retrieval_sha256 and retrieved.sidecar_sha256 != self.retrieval_sha256:
                raise CheckpointError(
                    f"{self.retrieval_dir} is not the retrieval this CRM was trained on (its retrieval.json "
                    "changed since: the retrieval was re-run); retrain the CRM on it"
                )
            kwargs["retrieved"] = retrieved
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        spec = self.feature_spec
        return {
            "format": CRM_FORMAT,
            "format_version": CRM_FORMAT_VERSION,
            "model": self.model,
            "crm_config": _plain(dataclasses.asdict(self.config)),
            "feature_spec": {
                "fields": [dataclasses.asdict(f) for f in spec.fields],
                "category_field": spec.category_field,
                "rating_vocab_size": spec.rating_vocab_size,
            },
            "hidden_dim": self.hidden_dim,
            "history": {
                "mode": self.history_mode,
                "length": self.history_length,
                "retrieval_dir": self.retrieval_dir,
                "retrieval_sha256": self.retrieval_sha256,
            },
            "dataset": dict(self.dataset),
            "step": self.step,
            "epoch": self.epoch,
            "metrics": dict(self.metrics),
            "train_config": _plain(self.train_config),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CRMCheckpointInfo:
        if data.get("format") != CRM_FORMAT:
            raise CheckpointError(f"not a CRM checkpoint description (format={data.get('format')!r})")
        if data.get("format_version") != CRM_FORMAT_VERSION:
            raise CheckpointError(
                f"CRM checkpoint format_version {data.get('format_version')}, this reclora_ds reads "
                f"{CRM_FORMAT_VERSION}"
            )
        spec = data["feature_spec"]
        feature_spec = FeatureSpec(
            fields=tuple(FieldSpec(**f) for f in spec["fields"]),
            category_field=spec["category_field"],
            rating_vocab_size=int(spec["rating_vocab_size"]),
        )
        history = data["history"]
        if history["mode"] == "retrieved" and "retrieval_dir" not in history:
            raise CheckpointError(
                "this CRM was trained on a retrieved-history file of an older reclora_ds (history.retrieved_path); "
                "retrain it on a retrieval folder"
            )
        # Checkpoints written before CRMConfig.item_merge existed concatenated the item fields; those
        # written before short_term_length / behaviour_age existed are the long-term-only SIM.
        crm_config = {"item_merge": "concat", **LEGACY_SIM, **data["crm_config"]}
        return cls(
            model=data["model"],
            config=CRMConfig(**crm_config),
            feature_spec=feature_spec,
            hidden_dim=int(data["hidden_dim"]),
            history_mode=history["mode"],
            history_length=int(history["length"]),
            retrieval_dir=history.get("retrieval_dir", ""),
            retrieval_sha256=history.get("retrieval_sha256", ""),
            dataset=dict(data.get("dataset", {})),
            step=int(data.get("step", 0)),
            epoch=int(data.get("epoch", 0)),
            metrics=dict(data.get("metrics", {})),
            train_config=dict(data.get("train_config", {})),
        )


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------------------
# Atomic folders
# ----------------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint folder for ``path``.

    ``path`` may be a checkpoint folder, its ``.old`` twin left by a kill between the two renames of
    :func:`reclora_ds.files.atomic_dir`, or a run folder (then ``checkpoints/best`` is taken).
    """
    path = Path(path)
    best = path / "checkpoints" / "best"
    if resolve_old(best).exists():
        path = best
    if (path / INFO_FILE).is_file():
        return path
    old = resolve_old(path)
    if (old / INFO_FILE).is_file():
        return old
    raise CheckpointError(f"{path}: no CRM checkpoint here (no {INFO_FILE})")


def checkpoint_exists(path: str | Path) -> bool:
    """True when :func:`resolve_checkpoint` finds a complete checkpoint at ``path`` (or its ``.old`` twin)."""
    try:
        resolve_checkpoint(path)
    except CheckpointError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached copy of ``model``'s state dict (what safetensors stores)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_crm_checkpoint(
    path: str | Path,
    model: nn.Module,
    info: CRMCheckpointInfo,
    trainer_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically: weights, ``crm.json`` and, if given, ``trainer_state.pt``.

    Call it on one rank only (the recipes call it on rank 0). Returns ``path``.

    Raises:
        reclora_ds.files.DiskFullError: the disk filled up; the previous checkpoint at ``path`` is unchanged.
    """
    path = Path(path)
    description = json.dumps(info.to_dict(), indent=2, sort_keys=False)
    with atomic_dir(path) as tmp:
        save_file(model_state(model), str(tmp / WEIGHTS_FILE), metadata={"crm": description})
        (tmp / INFO_FILE).write_text(description)
        if trainer_state is not None:
            torch.save(dict(trainer_state), tmp / TRAINER_STATE_FILE)
    return path


def read_info(path: str | Path) -> CRMCheckpointInfo:
    """The :class:`CRMCheckpointInfo` of a checkpoint (``crm.json``, else the weights file's header)."""
    folder = resolve_checkpoint(path) if not Path(path).is_file() else Path(path).parent
    info_path = folder / INFO_FILE
    if info_path.is_file():
        return CRMCheckpointInfo.from_dict(json.loads(info_path.read_text()))
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        meta = f.metadata() or {}
    if "crm" not in meta:
        raise CheckpointError(f"{folder}: neither {INFO_FILE} nor a 'crm' header in {WEIGHTS_FILE}")
    return CRMCheckpointInfo.from_dict(json.loads(meta["crm"]))


def load_weights(model: nn.Module, weights: str | Path) -> None:
    """Load a safetensors state dict into ``model``, naming every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{weights} does not match the model: missing {missing}, unexpected {unexpected}, shapes {shapes}"
        )
    model.load_state_dict(state, strict=True)


def load_crm(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, CRMCheckpointInfo]:
    """Rebuild a CRM from a checkpoint folder alone (no dataset needed); returns ``(model in eval mode, info)``.

    ``path``: a checkpoint folder (``checkpoints/best``, ``checkpoints/last``) or a run folder (its best).
    It builds nothing: the model computes its ops in whatever form the process uses
    (:mod:`reclora_ds.models.ops`; the PyTorch forms unless a recipe registered others).
    """
    folder = resolve_checkpoint(path)
    info = read_info(folder)
    model = build_crm(info.model, info.config, info.feature_spec)
    if getattr(model, "hidden_dim", info.hidden_dim) != info.hidden_dim:
        raise CheckpointError(
            f"{folder}: rebuilt model has d_c={model.hidden_dim}, crm.json says {info.hidden_dim}"
        )
    load_weights(model, folder / WEIGHTS_FILE)
    return model.to(device).eval(), info


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The ``trainer_state.pt`` of a (``last``) checkpoint folder."""
    file = resolve_checkpoint(path) / TRAINER_STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file.parent}: no {TRAINER_STATE_FILE} (a best checkpoint cannot be resumed)")
    return torch.load(file, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global RNG is what is saved)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
