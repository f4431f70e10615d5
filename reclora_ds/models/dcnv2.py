"""DCNv2 (Wang et al., WWW 2021) over the sample's fields and its mean-pooled history: a Table 2 baseline.

Shape legend:
    B    batch (samples)
    L    history length
    F'   fields: F sample fields + P pooled item fields + the pooled rating (:mod:`reclora_ds.models.pooled_fields`)
    E    embedding width of one field
    d    width of the cross network, F' * E (the flattened field embeddings)
    d_c  width of the CRM state (the DNN's last hidden layer, ``config.tower[-1]``)

The network, in DCNv2's **stacked** structure (cross network, then the DNN on its output)::

    x_0    = flatten(pooled_fields(batch))                 [B, d]
    x_l+1  = x_0 * (W_l x_l + b_l) + x_l,  l < cross_layers [B, d]    W_l [d, d] full rank, * elementwise
    hidden = DNN(x_L)                                       [B, d_c]   the CRM state
    logit  = head(hidden)                                   [B]

A cross layer of degree l makes every polynomial of degree <= l + 1 of ``x_0`` reachable (the paper's
Theorem); the DNN on top adds the implicit interactions.

Why stacked and not parallel (FuxiCTR's default): the CRM state must be a d_c-wide last hidden layer that
explains the whole logit (``logit == head(hidden)``, as for DIN and SIM). In the parallel structure the
last layer is ``[x_L; DNN(x_0)]``, ``d + d_c`` wide, and its width depends on the dataset's field count;
stacked keeps the state at d_c and puts both the explicit and the implicit interactions under it. In the
DCNv2 paper neither structure is better on every dataset.

Reference implementation: FuxiCTR's ``CrossNetV2`` / ``DCNv2`` (``model_structure="stacked"``): the same
update ``X_i = X_i + X_0 * Linear(X_i)``, no low-rank mixture; rewritten on ``torch.nn`` over this
package's batch and field tables.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from reclora_ds.models.crm import CRMConfig, CRMOutput, FeatureSpec, MLPTower
from reclora_ds.models.pooled_fields import PooledFieldEmbeddings


class CrossNetwork(nn.Module):
    """DCNv2's cross network: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` with full-rank ``W_l``.

    Args:
        dim: d, the width of ``x_0``.
        layers: number of cross layers.

    Shapes:
        x0: [B, d] -> [B, d].

    Example:
        >>> CrossNetwork(6, layers=3)(torch.randn(2, 6)).shape
        torch.Size([2, 6])
    """

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = torch.addcmul(x, x0, layer(x))  # x_l + x_0 * (W_l x_l + b_l): [B, d]
        return x


class DCNv2(nn.Module):
    """DCNv2, stacked: the cross network over the fields and the pooled history, then the DNN tower.

    Reads ``embedding_dim``, ``cross_layers``, ``tower`` (DNN widths; the last one is d_c), ``dropout``
    and ``behaviour_fields`` of the config; the settings of the other models are ignored.

    Args:
        config: the CRM settings.
        spec: the categorical fields (:meth:`FeatureSpec.from_metadata`).

    Shapes:
        batch: the loader's dict (``label`` is not read): each field [B]; ``hist_item``,
        ``hist_<item field>``, ``hist_rating`` [B, L] int64; ``hist_mask`` [B, L] bool
        -> ``CRMOutput(logit [B], hidden [B, d_c])`` with ``logit == head(hidden)``.

    Example:
        >>> spec = FeatureSpec.from_metadata({"category_field": "genre", "fields": {
        ...     "user_id": {"source": "user", "vocab_size": 10},
        ...     "item_id": {"source": "item", "vocab_size": 20},
        ...     "genre": {"source": "item", "vocab_size": 6}}})
        >>> model = DCNv2(CRMConfig(embedding_dim=8, tower=(32, 16)), spec).eval()
        >>> batch = {"user_id": torch.tensor([2, 3]), "item_id": torch.tensor([4, 5]),
        ...     "genre": torch.tensor([2, 3]), "hist_item": torch.randint(2, 20, (2, 7)),
        ...     "hist_genre": torch.randint(2, 6, (2, 7)), "hist_rating": torch.randint(1, 11, (2, 7)),
        ...     "hist_mask": torch.ones(2, 7, dtype=torch.bool)}
        >>> out = model(batch)
        >>> out.logit.shape, out.hidden.shape
        (torch.Size([2]), torch.Size([2, 16]))
    """

    def __init__(self, config: CRMConfig, spec: FeatureSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.fields = PooledFieldEmbeddings(config, spec, config.embedding_dim)
        width = self.fields.num_fields * config.embedding_dim  # d
        self.cross = CrossNetwork(width, config.cross_layers)
        self.tower = MLPTower(width, config.tower, config.dropout)
        self.head = nn.Linear(config.hidden_dim, 1)
        self.hidden_dim = config.hidden_dim

    def forward(self, batch: Mapping[str, torch.Tensor]) -> CRMOutput:
        """Logit [B] and CRM state [B, d_c] (the DNN's last layer over the cross network's output)."""
        x0 = self.fields(batch).flatten(1)  # [B, F', E] -> [B, d]
        hidden = self.tower(self.cross(x0))  # [B, d] -> [B, d_c]
        logit = self.head(hidden).squeeze(-1)  # [B, 1] -> [B]
        return CRMOutput(logit=logit, hidden=hidden)
