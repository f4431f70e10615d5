"""Every variant's settings and results in TensorBoard's HParams view (``tensorboard --logdir <exp>/tb``).

One HParams run per variant (``SummaryWriter.add_hparams``, run name = the variant): its hyper-parameters
are ``mode``, ``seeds`` and every pipeline key that any variant of the experiment overrides, at this
variant's resolved value (so the columns line up); its metrics are ``hparam/<metric>_mean`` and ``_std``
for each of the spec's metrics, and ``hparam/p_bootstrap`` against the reference (an undefined value, such
as the std of one seed, is left out: an empty cell).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from reclora_ds.config import config_to_dict
from reclora_ds.experiments.plan import ExperimentPlan

HPARAMS_DIR = "tb"


def resolved_value(settings: Any, key: str) -> Any:
    """The value of a dotted pipeline key (``plora.adapter.num_experts``) in resolved settings."""
    section, _, rest = key.partition(".")
    node: Any = config_to_dict(getattr(settings, section))
    for part in rest.split("."):
        node = node[part]
    return node


def _scalar(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_hparams(plan: ExperimentPlan, rows: list[dict[str, Any]]) -> Path:
    """Write ``<experiment>/tb`` (replaced on every aggregation); returns the folder."""
    from torch.utils.tensorboard import SummaryWriter

    spec = plan.spec
    out = plan.root / HPARAMS_DIR
    if out.exists():
        shutil.rmtree(out)
    keys = sorted({k for v in spec.variants for k in v.overrides})
    first = {c.variant.name: c for c in reversed(plan.cells)}  # the first seed's cell of each variant
    by_name = {r["variant"]: r for r in rows}
    for variant in spec.variants:
        settings = first[variant.name].settings
        hparams = {"mode": variant.mode, "seeds": by_name[variant.name]["seeds"]}
        hparams.update({k: _scalar(resolved_value(settings, k)) for k in keys})
        metrics = {}
        for m in spec.metrics:
            for stat in ("mean", "std"):
                value = float(by_name[variant.name][f"{m}_{stat}"])
                if not math.isnan(value):  # undefined ones (one seed's std) stay empty cells
                    metrics[f"hparam/{m}_{stat}"] = value
        p = float(by_name[variant.name]["p_bootstrap"])
        if not math.isnan(p):
            metrics["hparam/p_bootstrap"] = p
        with SummaryWriter(str(out)) as writer:
            writer.add_hparams(hparams, metrics, run_name=variant.name)
    return out
