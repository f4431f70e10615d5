"""The CTR frame shared by the sequential CRMs of the paper's Table 2 (GRU4Rec, Caser, SASRec).

Shape legend:
    B    batch (samples)
    L    history length given to the model (the loader's ``history_length``)
    L'   Caser's window: the most recent behaviours its convolutions read
    F    categorical fields of a sample
    E    embedding width of one field (``embedding_dim``)
    D    width of an item / behaviour (``E * len(behaviour_fields)``, or ``E`` with ``item_merge="sum"``)
    d_c  width of the CRM state (the tower's last layer, ``tower[-1]``)

GRU4Rec, Caser and SASRec were published as next-item models; the paper scores them as CTR models
(Table 2: AUC and log loss of one target item for one user, App. B: "DNN layers / DNN hidden size" after
the sequence encoder). All three share this frame and differ only in the encoder ``encode``::

    fields   = [emb(f) for f in metadata fields]                       F x [B, E]
    t        = merge(emb(f)(target item) for f in behaviour_fields)    [B, D]    (as DIN's target)
    h_j      = m_j * ReLU(Linear([item emb of behaviour j; rating j])) [B, L, D]  (DIN's behaviour encoder)
    u        = encode(h, m)  if the sample has a behaviour, else 0     [B, D]    the user-interest vector
    hidden   = tower([fields; u; t; u * t])                            [B, d_c]  the CRM state
    logit    = head(hidden)                                            [B]

- Behaviours are embedded exactly as DIN embeds them (:class:`reclora_ds.models.crm.BehaviourEncoder`:
  item fields and the rating bucket), so the sequence models see the same information as DIN and SIM.
  Padded positions (``m_j = False``) are set to the zero vector before any encoder reads them, and their
  ids are PAD already (:class:`reclora_ds.models.crm.Behaviours`): what a batch holds there never matters.
- ``u`` lives in the item space (width D), so ``u * t`` is the explicit interest-target match the
  next-item models score with (their logit is ``<u, t>``); the tower learns the rest. ``t`` also enters on
  its own (its field embeddings are among ``fields`` too, but ``t`` is the merged item vector).
- An empty history gives ``u = 0`` for every encoder: "no interest information", the same input whatever
  the encoder would compute on an all-padding sequence.
- ``hidden`` is the output of the tower's last ``Linear + ReLU + Dropout`` layer (d_c = ``tower[-1]``):
  the last hidden layer before the logit, which the PLoRA gates of stage 2 read as the CRM state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from reclora_ds.models.crm import (
    BehaviourEncoder,
    Behaviours,
    CRMConfig,
    CRMOutput,
    FeatureSpec,
    FieldEmbeddings,
    MLPTower,
)


def real_first_index(mask: torch.Tensor) -> torch.Tensor:
    """Positions [B, L] that move each row's real behaviours to the front, in their order (left-aligned).

    A stable sort on ``~mask``: real positions (key 0) keep their order and come before the padding.
    """
    return torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # [B, L]


def real_last_index(mask: torch.Tensor) -> torch.Tensor:
    """Positions [B, L] that move each row's real behaviours to the end, in their order (right-aligned).

    The loader's batches are right-aligned already; this also accepts a mask with holes.
    """
    return torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices  # [B, L]


def take_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]``: x [B, L, W], index [B, L'] -> [B, L', W]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class SequenceCTR(nn.Module):
    """The CTR frame of a sequential CRM: embeddings, behaviour vectors, interest vector, tower, head.

    A subclass provides ``encode(history [B, L, D], mask [B, L]) -> u [B, D]`` (its sequence encoder);
    ``forward`` does the rest (module docstring). What ``encode`` returns for a row without any real
    behaviour is discarded: the frame sets ``u = 0`` there.

    Args:
        config: embedding width, tower, dropout and the encoder's settings.
        spec: the categorical fields (:meth:`FeatureSpec.from_metadata`).

    Shapes:
        batch: the loader's dict (``label`` is not read): each field [B]; ``hist_item``,
        ``hist_<item field>``, ``hist_rating`` [B, L] int64; ``hist_mask`` [B, L] bool
        -> ``CRMOutput(logit [B], hidden [B, d_c])``.

    Example:
        >>> class LastBehaviour(SequenceCTR):
        ...     def encode(self, history, mask):
        ...         return history[:, -1]
        >>> spec = FeatureSpec.from_metadata({"category_field": "genre", "fields": {
        ...     "user_id": {"source": "user", "vocab_size": 10},
        ...     "item_id": {"source": "item", "vocab_size": 20},
        ...     "genre": {"source": "item", "vocab_size": 6}}})
        >>> model = LastBehaviour(CRMConfig(embedding_dim=8, tower=(16,)), spec)
        >>> batch = {"user_id": torch.tensor([2, 3]), "item_id": torch.tensor([4, 5]),
        ...     "genre": torch.tensor([2, 3]), "hist_item": torch.randint(2, 20, (2, 7)),
        ...     "hist_genre": torch.randint(2, 6, (2, 7)), "hist_rating": torch.randint(1, 11, (2, 7)),
        ...     "hist_mask": torch.ones(2, 7, dtype=torch.bool)}
        >>> model(batch).hidden.shape
        torch.Size([2, 16])
    """

    def __init__(self, config: CRMConfig, spec: FeatureSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.behaviour_fields = spec.behaviour_fields(config)
        self.item_merge = config.item_merge
        embedding_dim = config.embedding_dim
        self.item_dim = embedding_dim * (
            len(self.behaviour_fields) if self.item_merge == "concat" else 1
        )  # D
        self.hidden_dim = config.hidden_dim
        self.embeddings = FieldEmbeddings(spec, embedding_dim)
        self.behaviour_encoder = BehaviourEncoder(self.item_dim, embedding_dim, self.item_merge)
        self.tower = MLPTower(
            len(spec.fields) * embedding_dim + 3 * self.item_dim, config.tower, config.dropout
        )
        self.head = nn.Linear(config.hidden_dim, 1)

    def encode(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The user-interest vector u [B, D] of the behaviour vectors [B, L, D] (0 at padding)."""
        raise NotImplementedError(f"{type(self).__name__} must define encode(history, mask)")

    def target_items(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The target item's vector [B, D] from the per-field embeddings [B, E] of the sample."""
        parts = [fields[name] for name in self.behaviour_fields]
        return torch.cat(parts, dim=-1) if self.item_merge == "concat" else torch.stack(parts).sum(0)

    def behaviour_vectors(self, behaviours: Behaviours) -> torch.Tensor:
        """``h`` [B, L, D]: each behaviour's vector, exactly 0 at padded positions."""
        tables = [self.embeddings.tables[name].weight for name in self.behaviour_fields]
        ids = [behaviours.ids[name] for name in self.behaviour_fields]
        history = self.behaviour_encoder([*tables, self.embeddings.rating.weight], [*ids, behaviours.rating])
        return history * behaviours.mask.unsqueeze(-1)  # [B, L, D]

    def interest(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``u`` [B, D] of a batch: the encoder's output, 0 for an empty history."""
        behaviours = Behaviours.from_batch(batch, self.behaviour_fields)
        return self._interest(behaviours)

    def _interest(self, behaviours: Behaviours) -> torch.Tensor:
        history = self.behaviour_vectors(behaviours)  # [B, L, D]
        u = self.encode(history, behaviours.mask)  # [B, D]
        has_history = behaviours.mask.any(dim=1, keepdim=True)  # [B, 1]
        # where, not a product: an encoder output that is not finite on an all-padding row cannot leak
        return torch.where(has_history, u, torch.zeros_like(u))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> CRMOutput:
        """Logit [B] and CRM state [B, d_c] of a batch."""
        behaviours = Behaviours.from_batch(batch, self.behaviour_fields)
        fields = self.embeddings.fields(batch)  # name -> [B, E]
        target = self.target_items(fields)  # [B, D]
        u = self._interest(behaviours)  # [B, D]
        features = torch.cat([*fields.values(), u, target, u * target], dim=-1)  # [B, F*E + 3D]
        hidden = self.tower(features)  # [B, d_c]
        logit = self.head(hidden).squeeze(-1)  # [B, 1] -> [B]
        return CRMOutput(logit=logit, hidden=hidden)
