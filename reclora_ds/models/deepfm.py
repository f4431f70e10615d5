"""DeepFM (Guo et al., IJCAI 2017) over the sample's fields and its mean-pooled history: a Table 2 baseline.

Shape legend:
    B    batch (samples)
    L    history length
    F'   fields of the interaction: F sample fields + P pooled item fields + the pooled rating
         (:mod:`reclora_ds.models.pooled_fields`)
    E    embedding width of one field
    d_c  width of the CRM state (the DNN's last hidden layer, ``config.tower[-1]``)

The network (one embedding per field, shared by the FM and the DNN, DeepFM's defining choice)::

    v        = pooled_fields(batch)                         [B, F', E]
    w        = first_order(batch)                           [B, F', 1]   the same pooling, width-1 tables
    fm       = 1/2 * sum_e ((sum_f v_fe)^2 - sum_f v_fe^2)  [B]          the FM second-order term
    hidden   = DNN(flatten(v))                              [B, d_c]     the CRM state
    logit    = sum_f w_f + fm + head(hidden)                [B]

The FM term is the sum over field pairs of their inner products, computed in O(F' E) instead of O(F'^2 E):

.. math::

    \\sum_{f < g} \\langle v_f, v_g \\rangle
      = \\tfrac12 \\sum_{e} \\Big[ \\big(\\textstyle\\sum_f v_{fe}\\big)^2 - \\sum_f v_{fe}^2 \\Big]

``hidden`` is the DNN's last ``Linear + ReLU + Dropout`` layer (:class:`reclora_ds.models.crm.MLPTower`
with ``config.tower``). Unlike DIN / SIM, ``head(hidden)`` is **not** the whole logit: DeepFM adds the
first-order and FM terms, ``logit = first_order + fm + head(hidden)``, and ``head.bias`` is the model's
global bias. The state the PLoRA gates read therefore carries the deep part of the score only; the FM
part reaches it indirectly, through the shared embeddings the DNN reads.

First-order weights: one scalar per feature value, pooled over the history like the embeddings (the
width-1 tables are shared between a target field and its history field too) and initialised like them.

Reference implementation: FuxiCTR's ``DeepFM`` (``FactorizationMachine`` = ``LogisticRegression`` +
``InnerProductInteraction(output="product_sum")``, DNN on the flattened shared embeddings, summed
logits), the maintained CTR library whose conventions the toolkit's DIN already follows; here it is
rewritten on ``torch.nn`` over this package's batch and field tables.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from reclora_ds.models.crm import CRMConfig, CRMOutput, FeatureSpec, MLPTower
from reclora_ds.models.pooled_fields import PooledFieldEmbeddings


def fm_second_order(fields: torch.Tensor) -> torch.Tensor:
    """Sum of the pairwise inner products of the fields: [B, F', E] -> [B] (O(F' E), see the module docstring)."""
    square_of_sum = fields.sum(dim=1).square()  # [B, E]
    sum_of_squares = fields.square().sum(dim=1)  # [B, E]
    return 0.5 * (square_of_sum - sum_of_squares).sum(dim=-1)  # [B]


class DeepFM(nn.Module):
    """DeepFM: first-order weights + FM second-order term + DNN, over the fields and the pooled history.

    Reads ``embedding_dim``, ``tower`` (DNN widths; the last one is d_c), ``dropout`` and
    ``behaviour_fields`` (which item fields of the history are pooled) of the config; the settings of the
    other models are ignored.

    Args:
        config: the CRM settings.
        spec: the categorical fields (:meth:`FeatureSpec.from_metadata`).

    Shapes:
        batch: the loader's dict (``label`` is not read): each field [B]; ``hist_item``,
        ``hist_<item field>``, ``hist_rating`` [B, L] int64; ``hist_mask`` [B, L] bool
        -> ``CRMOutput(logit [B], hidden [B, d_c])``.

    Example:
        >>> spec = FeatureSpec.from_metadata({"category_field": "genre", "fields": {
        ...     "user_id": {"source": "user", "vocab_size": 10},
        ...     "item_id": {"source": "item", "vocab_size": 20},
        ...     "genre": {"source": "item", "vocab_size": 6}}})
        >>> model = DeepFM(CRMConfig(embedding_dim=8, tower=(32, 16)), spec).eval()
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
        self.first_order = PooledFieldEmbeddings(config, spec, 1)
        self.tower = MLPTower(self.fields.num_fields * config.embedding_dim, config.tower, config.dropout)
        self.head = nn.Linear(config.hidden_dim, 1)
        self.hidden_dim = config.hidden_dim

    def forward(self, batch: Mapping[str, torch.Tensor]) -> CRMOutput:
        """Logit [B] (first order + FM + head(hidden)) and CRM state [B, d_c] (the DNN's last layer)."""
        fields = self.fields(batch)  # [B, F', E]
        first = self.first_order(batch).sum(dim=(1, 2))  # [B, F', 1] -> [B]
        hidden = self.tower(fields.flatten(1))  # [B, F'*E] -> [B, d_c]
        logit = first + fm_second_order(fields) + self.head(hidden).squeeze(-1)  # [B]
        return CRMOutput(logit=logit, hidden=hidden)
