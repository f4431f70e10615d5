"""DIN (Deep Interest Network) on the history it is given: the CRM of the "w/o long retriever" ablation.

Shape legend:
    B    batch (samples)
    L    history length (the loader's ``history_length``; ``history_mode="recent"`` gives the most recent L)
    F    categorical fields of a sample
    E    embedding width of one field
    D    width of an item / behaviour (``E * len(behaviour_fields)``, or ``E`` with ``item_merge="sum"``)
    d_c  width of the CRM state (the tower's last layer)

The network (the authors' DIN, reclora-facts section 2)::

    fields   = [emb(f) for f in metadata fields]                       F x [B, E]
    target   = merge(emb(f)(target item) for f in behaviour_fields)    [B, D]   (concat or sum)
    h_j      = ReLU(Linear([item emb of behaviour j; rating emb j]))   [B, L, D]
    interest = sum_j mask_j * MLP([t, h_j, t - h_j, t * h_j]) * h_j    [B, D]   (no softmax)
    hidden   = tower([fields; interest])                               [B, d_c]  the CRM state
    logit    = head(hidden)                                            [B]

:class:`reclora_ds.models.sim.SIM` is this network behind a general search unit; both share parameter
names, so one's state dict loads into the other.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from reclora_ds.models.crm import (
    AGE_BUCKETS,
    BehaviourEncoder,
    Behaviours,
    CRMConfig,
    CRMOutput,
    FeatureSpec,
    FieldEmbeddings,
    MLPTower,
    PairwiseDots,
    TargetAttention,
    pair_count,
)


class DIN(nn.Module):
    """DIN over the whole history of the batch (target attention, then the MLP tower).

    Which history that is belongs to the loader: ``history_mode="recent"`` with ``history_length=K`` gives
    the K most recent behaviours (the paper's DIN baseline). The SIM-only settings of the config
    (``search``, ``top_k``, ``short_term_length``, ``behaviour_age``) are ignored.

    Args:
        config: embedding width, attention MLP, tower and dropout.
        spec: the categorical fields (:meth:`FeatureSpec.from_metadata`).

    Shapes:
        batch: the loader's dict (``label`` is not read): each field [B]; ``hist_item``,
        ``hist_<item field>``, ``hist_rating`` [B, L] int64; ``hist_mask`` [B, L] bool -> ``CRMOutput(logit [B], hidden [B, d_c])``.

    Example:
        >>> spec = FeatureSpec.from_metadata({"category_field": "genre", "fields": {
        ...     "user_id": {"source": "user", "vocab_size": 10},
        ...     "item_id": {"source": "item", "vocab_size": 20},
        ...     "genre": {"source": "item", "vocab_size": 6}}})
        >>> model = DIN(CRMConfig(embedding_dim=8), spec).eval()
        >>> batch = {"user_id": torch.tensor([2, 3]), "item_id": torch.tensor([4, 5]),
        ...     "genre": torch.tensor([2, 3]), "hist_item": torch.randint(2, 20, (2, 7)),
        ...     "hist_genre": torch.randint(2, 6, (2, 7)), "hist_rating": torch.randint(1, 11, (2, 7)),
        ...     "hist_mask": torch.ones(2, 7, dtype=torch.bool)}
        >>> out = model(batch)
        >>> out.logit.shape, out.hidden.shape
        (torch.Size([2]), torch.Size([2, 256]))
    """

    def __init__(self, config: CRMConfig, spec: FeatureSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.behaviour_fields = spec.behaviour_fields(config)
        embedding_dim = config.embedding_dim
        self.item_merge = config.item_merge
        item_dim = embedding_dim * (len(self.behaviour_fields) if self.item_merge == "concat" else 1)  # D
        self.item_dim = item_dim
        self.hidden_dim = config.hidden_dim
        self.behaviour_age = self.reads_age(config)
        self.embeddings = FieldEmbeddings(spec, embedding_dim, AGE_BUCKETS if self.behaviour_age else 0)
        self.behaviour_encoder = BehaviourEncoder(
            item_dim, embedding_dim, self.item_merge, features=2 if self.behaviour_age else 1
        )
        self.attention = TargetAttention(
            item_dim, config.attention_hidden, config.attention_layers, config.dropout
        )
        tower_in = (
            len(spec.fields) * embedding_dim + self.interest_count(config) * item_dim
        )  # [fields; interests]
        self.crosses = PairwiseDots() if config.tower_crosses else None
        if self.crosses is not None:
            # the vectors crossed: F field embeddings and every interest's E-wide parts (D / E each)
            tower_in += pair_count(len(spec.fields) + self.interest_count(config) * item_dim // embedding_dim)
        self.tower = MLPTower(tower_in, config.tower, config.dropout)
        self.head = nn.Linear(config.hidden_dim, 1)

    @staticmethod
    def reads_age(config: CRMConfig) -> bool:
        """Whether the behaviour encoders embed each behaviour's age (DIN: never, as in the paper)."""
        return False

    @staticmethod
    def interest_count(config: CRMConfig) -> int:
        """Interest vectors [B, D] the tower reads beside the fields (DIN: one; SIM may add its short term)."""
        return 1

    def forward(self, batch: Mapping[str, torch.Tensor]) -> CRMOutput:
        """Logit [B] and CRM state [B, d_c] of a batch, attending over its whole history."""
        return self.forward_behaviours(batch, self.read_behaviours(batch))

    def read_behaviours(self, batch: Mapping[str, torch.Tensor], prefix: str = "hist_") -> Behaviours:
        """The batch's history (``prefix="recent_"``: its short-term window) as the model reads it, with
        age buckets when ``behaviour_age``."""
        return Behaviours.from_batch(batch, self.behaviour_fields, age=self.behaviour_age, prefix=prefix)

    def target_items(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The target item's vector [B, D] from the per-field embeddings [B, E] of the sample."""
        parts = [fields[name] for name in self.behaviour_fields]
        return torch.cat(parts, dim=-1) if self.item_merge == "concat" else torch.stack(parts).sum(0)

    def encode(self, behaviours: Behaviours, encoder: BehaviourEncoder) -> torch.Tensor:
        """``h_j`` [B, L, D]: each behaviour's item fields, rating (and age) through ``encoder``."""
        tables = [self.embeddings.tables[name].weight for name in self.behaviour_fields]
        ids = [behaviours.ids[name] for name in self.behaviour_fields]
        extra_tables, extra_ids = (
            [self.embeddings.rating.weight],
            [behaviours.rating],
        )  # per-behaviour features
        if self.behaviour_age:
            extra_tables.append(self.embeddings.age.weight)
            extra_ids.append(behaviours.age)
        return encoder([*tables, *extra_tables], [*ids, *extra_ids])  # [B, L, D]

    def extra_interests(self, batch: Mapping[str, torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        """Interest vectors [B, D] beyond the one over ``behaviours`` (none for DIN; SIM's short term)."""
        return []

    def forward_behaviours(self, batch: Mapping[str, torch.Tensor], behaviours: Behaviours) -> CRMOutput:
        """Logit and CRM state for the sample features of ``batch`` and the history ``behaviours``."""
        fields = self.embeddings.fields(batch)  # name -> [B, E]
        target = self.target_items(fields)  # [B, D]
        history = self.encode(behaviours, self.behaviour_encoder)  # [B, L, D]
        interest = self.attention(target, history, behaviours.mask)  # [B, D]
        features = torch.cat([*fields.values(), interest, *self.extra_interests(batch, target)], dim=-1)
        if self.crosses is not None:  # features: [B, F*E + n*D] = [B, F + n*D/E, E] viewed per vector
            vectors = features.view(len(features), -1, self.embeddings.embedding_dim)
            features = torch.cat([features, self.crosses(vectors)], dim=-1)  # [B, F*E + n*D + pairs]
        hidden = self.tower(features)  # [B, d_c]
        logit = self.head(hidden).squeeze(-1)  # [B, 1] -> [B]
        return CRMOutput(logit=logit, hidden=hidden)
