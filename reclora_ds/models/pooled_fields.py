"""The feature fields of a feature-interaction CRM: a sample's fields plus its mean-pooled history.

Shape legend:
    B    batch (samples)
    L    history length
    F    categorical fields of a sample (``metadata["fields"]``)
    P    pooled item-side history fields (``spec.behaviour_fields(config)``: item_id and its category)
    F'   fields seen by the interaction layer: F + P + 1 (the ``+ 1`` is the pooled rating bucket)
    E    embedding width of one field (or 1 for DeepFM's first-order weights)

Paper App. B: "For the feature interaction models, we implement average pooling across users' historical
behaviours and treat the results as additional feature fields". So, for each sample,

.. math::

    x = \\big[\\, e_1(x_1), \\dots, e_F(x_F),\\;
        \\bar h_1, \\dots, \\bar h_P,\\; \\bar r \\,\\big] \\in \\mathbb{R}^{F' \\times E},
    \\qquad
    \\bar h_p = \\frac{1}{\\max(1, |H|)} \\sum_{j \\in H} e_p(h_{j,p}),

where ``H`` is the set of real behaviours (``hist_mask``), ``e_p`` is the table of item field ``p`` and
``\\bar r`` pools the rating-bucket table the same way. An empty history pools to the zero vector.

Table sharing: a history field reads **its target field's table** (``hist_item`` reads ``item_id``'s rows,
``hist_genre`` reads ``genre``'s), as DIN / SIM do (:class:`reclora_ds.models.crm.FieldEmbeddings`). An
item therefore has one vector whether it is the target or a past behaviour, so the interaction layers
(FM inner products, cross layers, self-attention) compare the target with the history in one space, and
every gradient an item gets as a target also moves it as a behaviour. The alternative (separate history
tables, as :class:`reclora_ds.models.logreg.LogisticRegression` does with its width-1 weights) doubles the
item parameters and makes "the target is like the history" something each model must learn pair by pair
from co-occurrences, where shared tables give an item's similarity with itself from the start.

Which item fields are pooled is ``CRMConfig.behaviour_fields`` (None: item id and category; the authors'
ML-25M layout pools the item id only, set ``behaviour_fields=[item_id]``); ``item_merge`` does not apply
here: every pooled field is its own field of the stack. The rating is always pooled (the authors' field
counts include "history ratings").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from reclora_ds.batch import PAD_ID, history_key
from reclora_ds.models.crm import CRMConfig, FeatureSpec, FieldEmbeddings, gather_rows, require

RATING_FIELD = "hist_rating"
"""Name of the pooled rating field in :attr:`PooledFieldEmbeddings.field_names` (its batch key)."""


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, L, E] over the positions where ``mask`` [B, L] is True -> [B, E].

    A row without any True position gives 0 (the count is clamped to 1). Positions under a False mask
    contribute an exact 0 (``where``, not a product, so even a non-finite padded value is dropped).
    """
    real = mask.unsqueeze(-1)  # [B, L, 1]
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(values.dtype)  # [B, 1]
    summed = torch.where(real, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(1)
    return summed / count  # [B, E]


class PooledFieldEmbeddings(nn.Module):
    """The F' = F + P + 1 field vectors of a sample: its fields, then its pooled history fields.

    Args:
        config: ``behaviour_fields`` decides the P pooled item fields (see the module docstring).
        spec: the categorical fields and vocabulary sizes.
        embedding_dim: E (DeepFM also builds one with E = 1 for its first-order weights).

    Shapes:
        batch: each field [B]; ``hist_item``, ``hist_<item field>``, ``hist_rating`` [B, L] int64;
        ``hist_mask`` [B, L] bool -> [B, F', E], fields in the order of :attr:`field_names`.

    Example:
        >>> spec = FeatureSpec.from_metadata({"category_field": "genre", "fields": {
        ...     "user_id": {"source": "user", "vocab_size": 10},
        ...     "item_id": {"source": "item", "vocab_size": 20},
        ...     "genre": {"source": "item", "vocab_size": 6}}})
        >>> fields = PooledFieldEmbeddings(CRMConfig(), spec, embedding_dim=4)
        >>> fields.field_names
        ('user_id', 'item_id', 'genre', 'hist_item', 'hist_genre', 'hist_rating')
        >>> batch = {"user_id": torch.tensor([2, 3]), "item_id": torch.tensor([4, 5]),
        ...     "genre": torch.tensor([2, 3]), "hist_item": torch.randint(2, 20, (2, 7)),
        ...     "hist_genre": torch.randint(2, 6, (2, 7)), "hist_rating": torch.randint(1, 11, (2, 7)),
        ...     "hist_mask": torch.ones(2, 7, dtype=torch.bool)}
        >>> fields(batch).shape
        torch.Size([2, 6, 4])
    """

    def __init__(self, config: CRMConfig, spec: FeatureSpec, embedding_dim: int) -> None:
        super().__init__()
        self.history_fields = spec.behaviour_fields(config)
        self.embeddings = FieldEmbeddings(spec, embedding_dim)
        self.field_names = (*spec.names, *(history_key(f) for f in self.history_fields), RATING_FIELD)
        self.num_fields = len(self.field_names)  # F'
        self.embedding_dim = embedding_dim

    def pooled(self, table: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked mean of ``table`` [V, E] rows at ``ids`` [B, L] over ``mask`` [B, L] -> [B, E]."""
        ids = ids.masked_fill(~mask, PAD_ID)  # padded ids are never read (nor out of range)
        return masked_mean(gather_rows(table, ids), mask)  # [B, L, E] -> [B, E]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        require(batch, (*self.field_names, "hist_mask"))  # field_names are batch keys
        mask = batch["hist_mask"].bool()  # [B, L]
        fields = list(self.embeddings.fields(batch).values())  # F x [B, E]
        for name in self.history_fields:
            table = self.embeddings.tables[name].weight  # the target field's table
            fields.append(self.pooled(table, batch[history_key(name)], mask))  # [B, E]
        fields.append(self.pooled(self.embeddings.rating.weight, batch[RATING_FIELD], mask))  # [B, E]
        return torch.stack(fields, dim=1)  # F' x [B, E] -> [B, F', E]
