"""Caser (Tang & Wang, WSDM 2018) as a CTR model: convolutions over the most recent behaviours, then the tower.

Shape legend:
    B    batch (samples)
    L    history length (the loader's ``history_length``)
    L'   the window: the most recent behaviours the convolutions read (:data:`CASER_WINDOW`)
    D    width of an item / behaviour (see :mod:`reclora_ds.models.sequence`)
    n_v  vertical filters (``caser_vertical_filters``)
    n_h  horizontal filters per height (``caser_horizontal_filters``)
    d_c  width of the CRM state

Caser reads the last L' behaviours as an "image" ``X`` [L', D] (row i = the i-th of them, oldest first;
rows of a shorter history are zero vectors on top, as the loader's left padding puts them)::

    vertical,   k = 1..n_v:       o_v[k, :]  = sum_i w_k[i] X[i, :] + b_k                   [D]   (no activation)
    horizontal, h = 1..L', k = 1..n_h:
                                  c[i]      = ReLU(<F_hk, X[i : i + h, :]> + b_hk), i = 1..L'-h+1
                                  o_h[h, k] = max_i c[i]                                   (max over time)
    u = ReLU(W [o_v (n_v D); o_h (n_h L')] + b)                                            [D]   after dropout

as in the paper (Sec. 3.2-3.3: vertical filters are weighted sums of the rows, horizontal filters of every
height 1..L' are max-pooled over time, both concatenated, dropout, one fully connected layer with ReLU)
and RecBole's ``Caser``. The user embedding the paper concatenates next (its long-term preference ``P_u``)
is here the sample's fields, which the CTR frame (:class:`reclora_ds.models.sequence.SequenceCTR`) feeds
to the tower with ``u``. The window is the paper's Markov order L; the authors' code (caser_pytorch,
``--L 5``) defaults to 5 and so does :data:`CASER_WINDOW`; RecBole uses the whole history instead (L' = L).
"""

from __future__ import annotations

import torch
from torch import nn

from reclora_ds.models.crm import CRMConfig, FeatureSpec
from reclora_ds.models.sequence import SequenceCTR, real_last_index, take_positions

CASER_WINDOW = 5
"""L', the most recent behaviours Caser's convolutions read (the Caser authors' default Markov order, ``--L 5``). A module
constant until CRMConfig gets a ``caser_window`` setting (crm.py belongs to another change)."""


class Caser(SequenceCTR):
    """Caser: vertical and horizontal convolutions over the last L' behaviours give the interest vector.

    Args:
        config: ``embedding_dim``, ``tower``, ``dropout`` (before the fully connected layer),
            ``caser_vertical_filters`` (n_v, App. B.1 {2, 4, 8}) and ``caser_horizontal_filters``
            (n_h per height, App. B.1 {4, 8, 16}). Other encoders' settings are ignored.
        spec: the categorical fields (:meth:`FeatureSpec.from_metadata`).

    Shapes:
        batch: the loader's dict (see :class:`reclora_ds.models.sequence.SequenceCTR`)
        -> ``CRMOutput(logit [B], hidden [B, d_c])``;
        ``convolutions(history [B, L, D], mask [B, L])`` -> ``(o_v [B, n_v, D], o_h [B, L', n_h])``.

    Example:
        >>> spec = FeatureSpec.from_metadata({"category_field": "genre", "fields": {
        ...     "user_id": {"source": "user", "vocab_size": 10},
        ...     "item_id": {"source": "item", "vocab_size": 20},
        ...     "genre": {"source": "item", "vocab_size": 6}}})
        >>> model = Caser(CRMConfig(embedding_dim=8), spec).eval()
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
        self.window = CASER_WINDOW
        n_v, n_h = config.caser_vertical_filters, config.caser_horizontal_filters
        self.vertical = nn.Conv2d(1, n_v, kernel_size=(self.window, 1))  # [B, 1, L', D] -> [B, n_v, 1, D]
        self.horizontal = nn.ModuleList(  # height h: [B, 1, L', D] -> [B, n_h, L' - h + 1, 1]
            nn.Conv2d(1, n_h, kernel_size=(height, self.item_dim)) for height in range(1, self.window + 1)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(n_v * self.item_dim + n_h * self.window, self.item_dim)
        self.act = nn.ReLU()

    def image(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``X`` [B, L', D]: each row's last L' real behaviours, oldest first, zero rows on top if fewer."""
        recent = take_positions(history, real_last_index(mask))[:, -self.window :]  # [B, min(L, L'), D]
        missing = self.window - recent.shape[1]
        if missing:  # a history shorter than the window: zero rows in front, as left padding
            recent = nn.functional.pad(recent, (0, 0, missing, 0))
        return recent

    def convolutions(self, history: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The vertical outputs ``o_v`` [B, n_v, D] and the max-pooled horizontal ones ``o_h`` [B, L', n_h]."""
        x = self.image(history, mask).unsqueeze(1)  # [B, 1, L', D]
        vertical = self.vertical(x).squeeze(2)  # [B, n_v, 1, D] -> [B, n_v, D]
        horizontal = [
            self.act(conv(x)).squeeze(3).amax(dim=2)  # [B, n_h, L'-h+1, 1] -> [B, n_h, L'-h+1] -> [B, n_h]
            for conv in self.horizontal
        ]
        return vertical, torch.stack(horizontal, dim=1)  # [B, n_v, D], [B, L', n_h]

    def encode(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``u = ReLU(W dropout([o_v; o_h]) + b)`` [B, D]."""
        vertical, horizontal = self.convolutions(history, mask)
        z = torch.cat([vertical.flatten(1), horizontal.flatten(1)], dim=1)  # [B, n_v*D + L'*n_h]
        return self.act(self.fc(self.dropout(z)))
