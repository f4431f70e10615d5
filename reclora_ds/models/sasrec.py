"""SASRec (Kang & McAuley, ICDM 2018) as a CTR model: causal self-attention over the history, then the tower.

Shape legend:
    B    batch (samples)
    L    history length (the loader's ``history_length``; at most :data:`SASREC_MAX_POSITIONS`)
    D    width of an item / behaviour (see :mod:`reclora_ds.models.sequence`)
    A    attention width (``attention_size``)
    nh   attention heads (``attention_heads``), each A / nh wide
    d_c  width of the CRM state

The encoder (the CTR frame around it is :class:`reclora_ds.models.sequence.SequenceCTR`), with ``m_t`` the
mask and ``h_t`` [D] the behaviour vectors, oldest first, right-aligned (slot L - 1 = most recent)::

    x_t   = m_t * Dropout(W_in h_t + b_in + P[L - 1 - t])                    [B, L, A]
    for each of the ``sequence_layers`` blocks:
        q = LN_1(x)
        x = m * (q + Dropout(MHA(q, x, x)))      attention of t over j <= t with m_j (causal, padding masked)
        y = LN_2(x)
        x = m * (y + Dropout(W_2 Dropout(ReLU(W_1 y + b_1)) + b_2))          point-wise feed-forward, A -> A
    u     = W_o LN_f(x)_{t*} + b_o,  t* = the most recent real position      [B, D]

- **Layer norm: pre-LN, as the original.** Kang & McAuley's code normalises the queries and the
  feed-forward input (``normalize(seq)``), adds the residual to the *normalised* input, leaves keys and
  values unnormalised, and ends with a final layer norm; pmixer's PyTorch port does the same. This file
  follows that layout exactly (it is neither the textbook pre-LN, whose residual is the raw input, nor
  RecBole's post-LN).
- **Positions.** Learned embeddings ``P`` indexed by recency (row 0 = the most recent behaviour), which is
  the original's slot embedding under its left padding: the same row always means "k behaviours ago",
  whatever L is, so a model trained on one history length reads another up to :data:`SASREC_MAX_POSITIONS`.
  The original scales item embeddings by sqrt(A) before adding ``P``; here the input projection ``W_in``
  (D -> A) learns that scale.
- **Attention:** :class:`CausalSelfAttention`, with the parameters of ``nn.MultiheadAttention``
  (``in_proj`` [3A, A], ``out_proj`` [A, A]) but computed with ``scaled_dot_product_attention`` on an
  explicit boolean mask in which every position may attend to itself. Under a causal mask every
  left-padding position is a query whose keys are all masked; ``nn.MultiheadAttention`` returns NaN for
  such a row on its ``need_weights=True`` path and a zero attention on others, so what reaches the gradients would
  depend on its dispatch. Here those rows are always finite (and zeroed by ``m``).
- ``u`` is projected back to the item space (``W_o``: A -> D) so the frame's ``u * t`` is defined; SASRec
  scores ``<F_t, N_i>`` with the item embedding in the same place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from reclora_ds.models.crm import CRMConfig, FeatureSpec
from reclora_ds.models.sequence import SequenceCTR

SASREC_MAX_POSITIONS = 256
"""Rows of SASRec's position table: the longest history it reads (the SIM window of the toolkit's longest
configurations). A module constant until CRMConfig gets a ``max_positions`` setting (crm.py belongs to
another change)."""


def attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """Which key each query may read: [B, L] bool -> [B, L, L] bool (True = attend).

    Position t reads the real positions j <= t (causal, padding masked), and always itself, so no query row
    is empty (a padded query only reads itself; its output is discarded).
    """
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()  # [L, L], j <= t
    itself = torch.eye(length, dtype=torch.bool, device=mask.device)
    return (causal & mask.unsqueeze(1)) | itself  # [B, L, L]


class CausalSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention of queries ``q`` over keys / values ``x`` under a boolean mask.

    .. math::

        [Q; K; V] = [q W_Q^\\top + b_Q;\\ x W_K^\\top + b_K;\\ x W_V^\\top + b_V], \\qquad
        \\mathrm{head}_i = \\mathrm{softmax}\\Big(\\frac{Q_i K_i^\\top}{\\sqrt{A / n_h}} + \\log M\\Big) V_i, \\qquad
        \\mathrm{out} = [\\mathrm{head}_1, \\dots, \\mathrm{head}_{n_h}] W_O^\\top + b_O

    (``log M`` = 0 where the mask allows, -inf elsewhere). The parameters are laid out as
    ``nn.MultiheadAttention``'s (``in_proj.weight`` = its ``in_proj_weight`` [3A, A], ``out_proj``), so the
    two give the same output wherever a query has a key to read.

    Args:
        dim: A, the width of queries, keys, values and output.
        heads: n_h, number of heads (divides A).
        dropout: dropout on the attention weights in training mode.

    Shapes:
        q, x: [B, L, A]; allowed: [B, L, L] bool (query, key) -> [B, L, A].

    Example:
        >>> attn = CausalSelfAttention(dim=8, heads=2)
        >>> x = torch.randn(3, 5, 8)
        >>> attn(x, x, attention_mask(torch.ones(3, 5, dtype=torch.bool))).shape
        torch.Size([3, 5, 8])
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"CausalSelfAttention: heads={heads} must divide dim={dim}")
        self.heads = heads
        self.dropout = dropout
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        w_q, w_kv = self.in_proj.weight.split([dim, 2 * dim])  # [A, A], [2A, A]
        b_q, b_kv = self.in_proj.bias.split([dim, 2 * dim])
        query = F.linear(q, w_q, b_q)  # [B, L, A]
        key, value = F.linear(x, w_kv, b_kv).chunk(2, dim=-1)  # 2 x [B, L, A]

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)  # [B, nh, L, A/nh]

        out = F.scaled_dot_product_attention(
            split_heads(query),
            split_heads(key),
            split_heads(value),
            attn_mask=allowed.unsqueeze(1),  # [B, 1, L, L], broadcast over the heads
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, nh, L, A/nh]
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))  # [B, L, A]


class SASRecBlock(nn.Module):
    """One SASRec block in the original's pre-LN layout (module docstring of :mod:`reclora_ds.models.sasrec`).

    Args:
        dim: A.
        heads: n_h.
        dropout: on the attention weights, the attention output and inside and after the feed-forward.

    Shapes:
        x: [B, L, A]; mask: [B, L] bool; allowed: [B, L, L] bool -> [B, L, A] (0 at padded positions).

    Example:
        >>> block = SASRecBlock(dim=8, heads=2)
        >>> mask = torch.ones(3, 5, dtype=torch.bool)
        >>> block(torch.randn(3, 5, 8), mask, attention_mask(mask)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(  # the original's two kernel-1 Conv1d = two position-wise Linear layers
            nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        keep = mask.unsqueeze(-1)  # [B, L, 1]
        q = self.attention_norm(x)
        x = (q + self.attention_dropout(self.attention(q, x, allowed))) * keep  # residual on the normed q
        y = self.ffn_norm(x)
        return (y + self.ffn(y)) * keep


class SASRec(SequenceCTR):
    """SASRec: causal self-attention blocks over the history; the output at the most recent behaviour is u.

    Args:
        config: ``embedding_dim``, ``tower``, ``dropout``, ``attention_size`` (A, App. B.1 {64, 128, 256}),
            ``attention_heads`` (App. B.1 {1, 2, 4}) and ``sequence_layers`` (blocks, App. B.1 {1, 2, 3}).
        spec: the categorical fields (:meth:`FeatureSpec.from_metadata`).

    Shapes:
        batch: the loader's dict (see :class:`reclora_ds.models.sequence.SequenceCTR`), L <= 256
        -> ``CRMOutput(logit [B], hidden [B, d_c])``;
        ``sequence_outputs(history [B, L, D], mask [B, L])`` -> [B, L, A] (after the final layer norm).

    Example:
        >>> spec = FeatureSpec.from_metadata({"category_field": "genre", "fields": {
        ...     "user_id": {"source": "user", "vocab_size": 10},
        ...     "item_id": {"source": "item", "vocab_size": 20},
        ...     "genre": {"source": "item", "vocab_size": 6}}})
        >>> model = SASRec(CRMConfig(embedding_dim=8, attention_size=16, attention_heads=2), spec).eval()
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
        width = config.attention_size
        self.input = nn.Linear(self.item_dim, width)
        self.positions = nn.Embedding(SASREC_MAX_POSITIONS, width)  # row k = the behaviour k steps ago
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            SASRecBlock(width, config.attention_heads, config.dropout) for _ in range(config.sequence_layers)
        )
        self.final_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, self.item_dim)
        # unit-norm rows on average: the positions start on the scale the final layer norms produce
        nn.init.normal_(self.positions.weight, std=1.0 / math.sqrt(width))

    def sequence_outputs(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The last block's output at every position, after the final layer norm: [B, L, A]."""
        length = history.shape[1]
        if length > SASREC_MAX_POSITIONS:
            raise ValueError(
                f"error: history_length: SASRec reads at most SASREC_MAX_POSITIONS={SASREC_MAX_POSITIONS} "
                f"behaviours, the batch has L={length}"
            )
        recency = torch.arange(length - 1, -1, -1, device=history.device)  # [L]: L-1 ... 0 (most recent)
        x = self.input(history) + self.positions(recency)  # [B, L, A]
        x = self.input_dropout(x) * mask.unsqueeze(-1)
        allowed = attention_mask(mask)  # [B, L, L]
        for block in self.blocks:
            x = block(x, mask, allowed)
        return self.final_norm(x)

    def encode(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``u = W_o out_{t*} + b_o`` [B, D], t* = each row's most recent real position."""
        outputs = self.sequence_outputs(history, mask)  # [B, L, A]
        length = mask.shape[1]
        last = length - 1 - mask.flip(1).to(torch.uint8).argmax(dim=1)  # [B] (L - 1 when right-aligned)
        recent = outputs[torch.arange(outputs.shape[0], device=outputs.device), last]  # [B, A]
        return self.output(recent)
