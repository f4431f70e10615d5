"""Build a stage-1 CRM by name: the paper's SIM, DIN (w/o long retriever) and the baselines of Table 2.

Feature interaction models (history mean-pooled into extra fields, paper App. B): ``logreg``, ``deepfm``,
``dcnv2``, ``autoint``. User behaviour models (scoring the target against the history): ``din``, ``sim``,
``gru4rec``, ``caser``, ``sasrec``. Classes are imported on first use, so a registry lookup costs nothing.
"""

from __future__ import annotations

import importlib

from torch import nn

from reclora_ds.models.crm import CRMConfig, FeatureSpec

CRM_MODELS: dict[str, str] = {
    "sim": "reclora_ds.models.sim:SIM",
    "din": "reclora_ds.models.din:DIN",
    "logreg": "reclora_ds.models.logreg:LogisticRegression",
    "deepfm": "reclora_ds.models.deepfm:DeepFM",
    "dcnv2": "reclora_ds.models.dcnv2:DCNv2",
    "autoint": "reclora_ds.models.autoint:AutoInt",
    "gru4rec": "reclora_ds.models.gru4rec:GRU4Rec",
    "caser": "reclora_ds.models.caser:Caser",
    "sasrec": "reclora_ds.models.sasrec:SASRec",
}
"""Registry name -> ``module:Class`` of every CRM."""


def crm_class(name: str) -> type[nn.Module]:
    """The model class registered as ``name`` (one of :data:`CRM_MODELS`)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in CRM_MODELS:
        raise ValueError(f"unknown CRM {name!r}; choose one of {sorted(CRM_MODELS)}")
    module, _, cls = CRM_MODELS[key].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_crm(name: str, config: CRMConfig, feature_spec: FeatureSpec) -> nn.Module:
    """The CRM ``name`` (one of :data:`CRM_MODELS`) for ``config`` and the dataset's ``feature_spec``.

    Every model's forward takes the loader's batch and returns ``CRMOutput(logit [B], hidden [B, d_c])``;
    ``model.hidden_dim`` is d_c and ``model.head`` maps ``hidden`` to the logit (DeepFM adds its first-order
    and FM terms), so any of them can drive
    the PLoRA gates (stage 2 reads d_c from the checkpoint).

    Example:
        >>> spec = FeatureSpec.from_metadata({"category_field": "genre", "fields": {
        ...     "user_id": {"source": "user", "vocab_size": 10},
        ...     "item_id": {"source": "item", "vocab_size": 20},
        ...     "genre": {"source": "item", "vocab_size": 6}}})
        >>> build_crm("sim", CRMConfig.for_dataset("ml-1m"), spec).hidden_dim
        256
    """
    return crm_class(name)(config, feature_spec)
