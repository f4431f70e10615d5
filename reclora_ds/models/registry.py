"""Build a stage-1 CRM by name: ``sim`` (the paper's), ``din`` (w/o long retriever), ``logreg`` (baseline)."""

from __future__ import annotations

from torch import nn

from reclora_ds.models.crm import CRMConfig, FeatureSpec
from reclora_ds.models.din import DIN
from reclora_ds.models.logreg import LogisticRegression
from reclora_ds.models.sim import SIM

CRM_MODELS: dict[str, type[nn.Module]] = {"sim": SIM, "din": DIN, "logreg": LogisticRegression}


def build_crm(name: str, config: CRMConfig, feature_spec: FeatureSpec) -> nn.Module:
    """The CRM ``name`` (one of :data:`CRM_MODELS`) for ``config`` and the dataset's ``feature_spec``.

    Every model's forward takes the loader's batch and returns ``CRMOutput(logit [B], hidden [B, d_c])``;
    ``model.hidden_dim`` is d_c and ``model.head`` maps ``hidden`` to the logit.

    Example:
        >>> spec = FeatureSpec.from_metadata({"category_field": "genre", "fields": {
        ...     "user_id": {"source": "user", "vocab_size": 10},
        ...     "item_id": {"source": "item", "vocab_size": 20},
        ...     "genre": {"source": "item", "vocab_size": 6}}})
        >>> build_crm("sim", CRMConfig.for_dataset("ml-1m"), spec).hidden_dim
        256
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in CRM_MODELS:
        raise ValueError(f"unknown CRM {name!r}; choose one of {sorted(CRM_MODELS)}")
    return CRM_MODELS[key](config, feature_spec)
