"""AutoInt (Song et al., CIKM 2019) over the sample's fields and its mean-pooled history: a Table 2 baseline.

Shape legend:
    B    batch (samples)
    L    history length
    F'   fields: F sample fields + P pooled item fields + the pooled rating (:mod:`reclora_ds.models.pooled_fields`)
    E    embedding width of one field
    A    width of the self-attention (``attention_size``)
    N    attention heads (``attention_heads``; 1 in the paper's runs), each d_h = A / N wide
    d_c  width of the CRM state (the tower's last hidden layer, ``config.tower[-1]``)

The network: ``interaction_layers`` interacting layers over the field vectors, then a tower::

    x^0    = pooled_fields(batch)                                     [B, F', E]
    x^l+1  = ReLU(MHSA(x^l) + W_res x^l)                              [B, F', A]
    hidden = tower(flatten(x^last))                                   [B, d_c]   the CRM state
    logit  = head(hidden)                                             [B]

One interacting layer, for field m and head h (AutoInt eqs. 5-8; the fields attend to each other, there is
no padding among them):

.. math::

    \\alpha^{(h)}_{m,k} = \\operatorname{softmax}_k\\big(\\langle W_Q^{(h)} x_m, W_K^{(h)} x_k \\rangle\\big),
    \\qquad
    \\tilde x^{(h)}_m = \\sum_{k} \\alpha^{(h)}_{m,k}\\, W_V^{(h)} x_k,

    x'_m = \\operatorname{ReLU}\\big([\\tilde x^{(1)}_m; \\dots; \\tilde x^{(N)}_m] + W_{res}\\, x_m\\big)

with ``W_Q, W_K, W_V`` [A, E_in] split into N row blocks (``E_in`` = E for the first layer, A after) and
``W_res`` [A, E_in]; no biases and no 1/sqrt(d_h) scaling, as in the paper and FuxiCTR's default
(``use_scale=False``). Dropout (``config.dropout``) applies to the attention weights, as in FuxiCTR.

The paper's AutoInt scores ``flatten(x^last)`` with one Linear; here that output layer is a tower
(``config.tower``), so the CRM state is a d_c-wide hidden layer over the interacting layers' output and
``logit == head(hidden)`` (the PLoRA gates need a d_c state; with a one-layer tower this is the paper's
model with a ReLU layer before its output unit).

Reference implementation: FuxiCTR's ``AutoInt`` / ``MultiHeadSelfAttention`` (``use_residual=True``,
``use_scale=False``, ``layer_norm=False``); unlike FuxiCTR, ``W_res`` is used even when E_in == A, as in
the paper's equation. Rewritten on ``torch.nn`` over this package's batch and field tables.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from reclora_ds.models.crm import CRMConfig, CRMOutput, FeatureSpec, MLPTower
from reclora_ds.models.pooled_fields import PooledFieldEmbeddings


class InteractingLayer(nn.Module):
    """One AutoInt interacting layer: multi-head self-attention over the fields, residual projection, ReLU.

    Args:
        in_dim: E_in, the width of each input field vector.
        attention_size: A, the output width (all heads together).
        heads: N, must divide ``attention_size``.
        dropout: dropout on the attention weights.

    Shapes:
        x: [B, F', E_in] -> [B, F', A]; :meth:`attention` also returns the weights [B, N, F', F'].

    Example:
        >>> InteractingLayer(8, 16, heads=2)(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 16])
    """

    def __init__(self, in_dim: int, attention_size: int, heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if attention_size % heads:
            raise ValueError(f"InteractingLayer: heads={heads} must divide attention_size={attention_size}")
        self.heads = heads
        self.head_dim = attention_size // heads
        self.query = nn.Linear(in_dim, attention_size, bias=False)
        self.key = nn.Linear(in_dim, attention_size, bias=False)
        self.value = nn.Linear(in_dim, attention_size, bias=False)
        self.residual = nn.Linear(in_dim, attention_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F', A] -> [B, N, F', d_h]."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads' outputs concatenated, [B, F', A], and the attention weights, [B, N, F', F']."""
        # [B, F', A] -> [B, N, F', d_h] each
        q, k, v = (self.split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # [B, N, F', F'], rows sum to 1
        out = self.dropout(weights) @ v  # [B, N, F', d_h]
        return out.transpose(1, 2).flatten(2), weights  # [B, F', N, d_h] -> [B, F', A]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(x)
        return torch.relu(attended + self.residual(x))  # [B, F', A]


class AutoInt(nn.Module):
    """AutoInt: interacting layers over the fields and the pooled history, then the tower.

    Reads ``embedding_dim``, ``interaction_layers``, ``attention_size``, ``attention_heads``, ``tower``
    (the last width is d_c), ``dropout`` and ``behaviour_fields`` of the config; the settings of the
    other models are ignored.

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
        >>> config = CRMConfig(embedding_dim=8, attention_size=16, interaction_layers=2, tower=(32, 16))
        >>> model = AutoInt(config, spec).eval()
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
        size, heads = config.attention_size, config.attention_heads
        widths = [config.embedding_dim] + [size] * (config.interaction_layers - 1)  # E_in of each layer
        self.interactions = nn.Sequential(
            *(InteractingLayer(width, size, heads, config.dropout) for width in widths)
        )
        self.tower = MLPTower(self.fields.num_fields * size, config.tower, config.dropout)
        self.head = nn.Linear(config.hidden_dim, 1)
        self.hidden_dim = config.hidden_dim

    def forward(self, batch: Mapping[str, torch.Tensor]) -> CRMOutput:
        """Logit [B] and CRM state [B, d_c] (the tower's last layer over the flattened attention output)."""
        x = self.interactions(self.fields(batch))  # [B, F', E] -> [B, F', A]
        hidden = self.tower(x.flatten(1))  # [B, F'*A] -> [B, d_c]
        logit = self.head(hidden).squeeze(-1)  # [B, 1] -> [B]
        return CRMOutput(logit=logit, hidden=hidden)
