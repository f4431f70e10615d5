"""Logistic regression over the categorical fields and the mean-pooled history: the results table's LR row.

Shape legend:
    B    batch (samples)
    L    history length
    F    categorical fields of a sample
    P    pooled history fields (``behaviour_fields``: item_id and the category by default)
    d_c  width of the "hidden" vector = F + P (one term per feature group, see below)

The model is one weight per feature value (an embedding of width 1, as the authors' ``LR``):

.. math::

    \\mathrm{logit} = b + \\sum_{f} w_f[x_f] + \\sum_{p} \\frac{1}{|H|} \\sum_{j \\in H} u_p[h_{j,p}]

i.e. one-hot features for the sample's fields and mean-pooled multi-hot features for the history
(``u_p`` is its own table: an item in the history is a different feature than the same item as target).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from reclora_ds.batch import PAD_ID, history_key
from reclora_ds.models.crm import CRMConfig, CRMOutput, FeatureSpec, require


class SumHead(nn.Module):
    """Logistic regression's head: the sum of the per-group terms plus a bias.

    Args:
        (none: the only parameter is the learned bias, initialised to 0.)

    Shapes:
        terms: [B, d_c] -> [B, 1].

    Example:
        >>> SumHead()(torch.ones(2, 3))
        tensor([[3.],
                [3.]], grad_fn=<AddBackward0>)
    """

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, terms: torch.Tensor) -> torch.Tensor:
        return terms.sum(dim=-1, keepdim=True) + self.bias  # [B, d_c] -> [B, 1]


class LogisticRegression(nn.Module):
    """Logistic regression on one-hot fields plus mean-pooled history one-hots.

    ``hidden`` is the vector of the F + P additive terms (one per sample field, one per pooled history
    field) and ``head`` sums them and adds the bias, so ``logit == head(hidden)``. It is a baseline for
    the results table, not a CRM state for the PLoRA gates (its width is F + P, not 256). All weights
    start at 0 (the model starts at p = 0.5; the loss is convex).

    Args:
        config: only ``behaviour_fields`` is read (which item fields of the history are pooled).
        spec: the categorical fields.

    Shapes:
        batch: each field [B]; ``hist_item``, ``hist_<item field>`` [B, L]; ``hist_mask`` [B, L]
        -> ``CRMOutput(logit [B], hidden [B, F + P])`` (``hist_rating`` is not used).

    Example:
        >>> spec = FeatureSpec.from_metadata({"category_field": "genre", "fields": {
        ...     "user_id": {"source": "user", "vocab_size": 10},
        ...     "item_id": {"source": "item", "vocab_size": 20},
        ...     "genre": {"source": "item", "vocab_size": 6}}})
        >>> model = LogisticRegression(CRMConfig(), spec)
        >>> batch = {"user_id": torch.tensor([2, 3]), "item_id": torch.tensor([4, 5]),
        ...     "genre": torch.tensor([2, 3]), "hist_item": torch.randint(2, 20, (2, 7)),
        ...     "hist_genre": torch.randint(2, 6, (2, 7)), "hist_mask": torch.ones(2, 7, dtype=torch.bool)}
        >>> model(batch).hidden.shape
        torch.Size([2, 5])
    """

    def __init__(self, config: CRMConfig, spec: FeatureSpec) -> None:
        super().__init__()
        self.spec = spec
        self.names = spec.names
        self.history_fields = spec.behaviour_fields(config)
        self.weights = nn.ModuleDict({f.name: nn.Embedding(f.vocab_size, 1) for f in spec.fields})
        self.history_weights = nn.ModuleDict(
            {name: nn.Embedding(spec[name].vocab_size, 1) for name in self.history_fields}
        )
        self.head = SumHead()
        self.hidden_dim = len(self.names) + len(self.history_fields)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for table in (*self.weights.values(), *self.history_weights.values()):
            nn.init.zeros_(table.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> CRMOutput:
        """Logit [B] and the per-group terms [B, F + P]."""
        require(batch, [*self.names, *(history_key(n) for n in self.history_fields), "hist_mask"])
        field_terms = [self.weights[name](batch[name]) for name in self.names]  # F x [B, 1]
        real = batch["hist_mask"].bool()  # [B, L]
        mask = real.unsqueeze(-1).to(self.head.bias.dtype)  # [B, L, 1]
        count = mask.sum(dim=1).clamp(min=1.0)  # [B, 1]; an empty history pools to 0
        history_terms = []
        for name in self.history_fields:
            ids = batch[history_key(name)].masked_fill(~real, PAD_ID)  # [B, L]; padding never read
            weights = self.history_weights[name](ids) * mask  # [B, L, 1]
            history_terms.append(weights.sum(dim=1) / count)  # [B, 1]
        hidden = torch.cat(field_terms + history_terms, dim=-1)  # [B, F + P]
        logit = self.head(hidden).squeeze(-1)  # [B, 1] -> [B]
        return CRMOutput(logit=logit, hidden=hidden)
