"""GRU4Rec (Hidasi et al., ICLR 2016) as a CTR model: a GRU over the history, then the CRM tower.

Shape legend:
    B    batch (samples)
    L    history length (the loader's ``history_length``)
    n    number of real behaviours of a row (``hist_mask.sum(1)``)
    D    width of an item / behaviour (see :mod:`reclora_ds.models.sequence`)
    H    GRU hidden size (:data:`GRU_HIDDEN_SIZE`)
    d_c  width of the CRM state

The encoder (the CTR frame around it is :class:`reclora_ds.models.sequence.SequenceCTR`)::

    x_1..x_n = the row's real behaviour vectors, oldest first            n x [D]  (padding skipped)
    s_k      = GRU(x_k, s_{k-1}),  s_0 = 0                               [H]      (``sequence_layers`` layers)
    u        = W_o s_n + b_o                                             [D]      the state after the most
                                                                                  recent behaviour, in item space

with the GRU cell of PyTorch (``nn.GRU``; r, z, n gates)::

    r = sigma(W_ir x + b_ir + W_hr s + b_hr)        z = sigma(W_iz x + b_iz + W_hz s + b_hz)
    c = tanh(W_in x + b_in + r * (W_hn s + b_hn))   s' = (1 - z) * c + z * s

Left padding must not change ``u``: the GRU runs over the real behaviours only. Each row's behaviours are
moved to the front (a stable sort of the mask) and handed to ``nn.GRU`` as a packed sequence of length n,
whose final state is ``s_n`` of every row (one cuDNN / MKL call instead of a Python loop over L). The
output projection ``W_o`` [D, H] maps the state to the item space, as RecBole's ``dense`` layer does, so
``u * t`` is defined. Dropout (``config.dropout``) is applied to the GRU inputs and, with more than one
layer, between GRU layers (``nn.GRU(dropout=...)``), as in RecBole's GRU4Rec.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from reclora_ds.models.crm import CRMConfig, FeatureSpec
from reclora_ds.models.sequence import SequenceCTR, real_first_index, take_positions

GRU_HIDDEN_SIZE = 64
"""H, the GRU's hidden size (paper App. B.1: {64, 128, 256}). A module constant until CRMConfig gets a
``gru_hidden`` setting (crm.py belongs to another change)."""


class GRU4Rec(SequenceCTR):
    """GRU4Rec: the state of a GRU after the most recent real behaviour is the user-interest vector.

    Args:
        config: ``embedding_dim``, ``tower``, ``dropout`` and ``sequence_layers`` (GRU layers; App. B.1
            {1, 2, 3}). The attention / Caser / SIM settings are ignored.
        spec: the categorical fields (:meth:`FeatureSpec.from_metadata`).

    Shapes:
        batch: the loader's dict (see :class:`reclora_ds.models.sequence.SequenceCTR`)
        -> ``CRMOutput(logit [B], hidden [B, d_c])``; ``states(history [B, L, D], mask [B, L])`` -> [B, H].

    Example:
        >>> spec = FeatureSpec.from_metadata({"category_field": "genre", "fields": {
        ...     "user_id": {"source": "user", "vocab_size": 10},
        ...     "item_id": {"source": "item", "vocab_size": 20},
        ...     "genre": {"source": "item", "vocab_size": 6}}})
        >>> model = GRU4Rec(CRMConfig(embedding_dim=8, sequence_layers=2), spec).eval()
        >>> batch = {"user_id": torch.tensor([2, 3]), "item_id": torch.tensor([4, 5]),
        ...     "genre": torch.tensor([2, 3]), "hist_item": torch.randint(2, 20, (2, 7)),
        ...     "hist_genre": torch.randint(2, 6, (2, 7)), "hist_rating": torch.randint(1, 11, (2, 7)),
        ...     "hist_mask": torch.ones(2, 7, dtype=torch.bool)}
        >>> out = model(batch)
        >>> out.logit.shape, out.hidden.shape
        (torch.Size([2]), torch.Size([2, 256]))
    """

    def __init__(self, config: CRMConfig, spec: FeatureSpec) -> None:
        super().__init__(config, spec)
        layers = config.sequence_layers
        self.input_dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(
            self.item_dim,
            GRU_HIDDEN_SIZE,
            num_layers=layers,
            batch_first=True,
            dropout=config.dropout if layers > 1 else 0.0,  # between layers only: nn.GRU warns otherwise
        )
        self.output = nn.Linear(GRU_HIDDEN_SIZE, self.item_dim)

    def states(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``s_n`` [B, H]: the last GRU layer's state after each row's most recent real behaviour.

        A row without behaviours runs one step over a zero vector (a packed sequence cannot be empty);
        the frame replaces its ``u`` by 0.
        """
        lengths = mask.sum(dim=1)  # [B]
        front = take_positions(history, real_first_index(mask))  # [B, L, D], real behaviours first
        packed = pack_padded_sequence(
            self.input_dropout(front), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, last = self.gru(packed)  # [layers, B, H], in the rows' own order (unsorted back by PyTorch)
        return last[-1]  # [B, H]

    def encode(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``u = W_o s_n + b_o`` [B, D]."""
        return self.output(self.states(history, mask))
