"""Personalized LoRA (PLoRA, paper §3.2): a bank of meta-LoRAs mixed per sample by a gate on the CRM state.

Shape legend:
    B    batch (samples; the gate weights are per sample, not per token)
    T    tokens
    D    hidden width; ``d_in`` / ``d_out`` are the wrapped projection's in / out features
    N    experts (meta-LoRAs), ``N_m`` in the paper
    r    LoRA rank of each expert
    d_c  width of the frozen CRM hidden state ``R_c`` that drives the gate
    d_h  hidden width of the gate

Layout follows peft per expert: ``A_k`` is (r, d_in) and ``B_k`` is (d_out, r), so one LoRA adds
``x A_k^T B_k^T``. (The paper writes ``X A B^T`` with ``A`` of shape (d_in, r), i.e. the transpose of ours.)

This file only holds the modules. Putting them into a model and feeding them the CRM state is
:mod:`reclora_ds.models.inject`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Every trainable PLoRA tensor (bank and gates) lives under a name starting with this prefix,
# so one rule decides what trains and what is saved.
PLORA_PREFIX = "plora_"

MIXINGS = ("products", "factors")
COMPUTE_DTYPES = ("activations", "params")


@dataclass
class PLoRAConfig:
    """Settings of the PLoRA bank and its gates (paper §3.2; defaults are the paper's main runs)."""

    num_experts: int = 16
    """N_m, the number of meta-LoRAs in each bank (ablations use 1, 2, 4, 8)."""
    rank: int = 8
    """r, the rank of each meta-LoRA."""
    alpha: float = 16.0
    """LoRA scaling numerator: the adapter output is multiplied by ``alpha / rank``."""
    dropout: float = 0.0
    """LoRA dropout on the adapter input (the base path never sees it)."""
    gate_hidden: int = 60
    """d_h, hidden width of each gate (the authors' code uses 60)."""
    gate_dropout: float = 0.1
    """Dropout between the gate's two Linear layers."""
    temperature: float = 1.0
    """tp of Eq. 14: the gate is ``softmax(beta / tp)``; larger is smoother (paper: 1, 5, 10, 15)."""
    mixing: Literal["products", "factors"] = "products"
    """``products``: paper Eq. 11, sum_k alpha_k A_k B_k. ``factors``: the authors' code, (sum alpha A)(sum alpha B)."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Suffixes of the dotted module names of the nn.Linear layers to adapt."""
    shared_gate: bool = False
    """False: one gate per adapted projection (the authors' code). True: one gate for all of them."""
    crm_dim: int = 256
    """d_c, width of the CRM hidden state fed to the gates."""
    compute_dtype: Literal["activations", "params"] = "activations"
    """Dtype of the bank's two GEMMs. ``activations``: the dtype of the frozen projection's input (bfloat16
    under a bf16 backbone): the bank is cast to it inside the forward, the parameters, their gradients and
    the optimizer stay in their own dtype (float32 master weights), and the activations are never converted.
    ``params``: the input is cast to the parameters' dtype and the result back (float32 math, one conversion
    of ``x`` and of ``Delta(x)`` per adapted projection and step). Identical when both dtypes agree; the gate
    always computes in its parameters' dtype."""

    def __post_init__(self) -> None:
        for name in ("num_experts", "rank", "gate_hidden", "crm_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PLoRAConfig.{name} must be a positive int, got {value!r}")
        for name in ("alpha", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PLoRAConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("dropout", "gate_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"PLoRAConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"PLoRAConfig.mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"PLoRAConfig.compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}"
            )
        if isinstance(self.target_modules, str):
            raise ValueError(
                f"PLoRAConfig.target_modules must be a sequence of module names, got the str {self.target_modules!r}"
            )
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(
                f"PLoRAConfig.target_modules must be non-empty names, got {self.target_modules!r}"
            )

    @property
    def scale(self) -> float:
        """LoRA scaling ``alpha / rank`` (2.0 for the paper's r=8, alpha=16)."""
        return self.alpha / self.rank


class PLoRAGate(nn.Module):
    """Gate of Eq. 13-14: per-sample expert weights from the frozen CRM state.

    .. math::

        \\beta = W_2\\,\\mathrm{Dropout}(\\mathrm{ReLU}(W_1\\,\\mathrm{LN}(R_c) + b_1)) + b_2, \\qquad
        \\alpha = \\mathrm{softmax}(\\beta / tp)

    The order is the authors' code (LayerNorm on ``R_c`` first). The paper's Eq. 13 writes
    ``W_2 ReLU(LN(W_1 R_c + b_1)) + b_2`` instead, with the LayerNorm after the first Linear.
    ``R_c`` is detached: the CRM is frozen, no gradient flows back into it.

    Args:
        crm_dim: d_c, width of the CRM state.
        num_experts: N, number of experts to weigh.
        hidden_dim: d_h, width of the hidden layer.
        dropout: dropout probability after the ReLU.
        temperature: tp > 0; softmax of ``beta / tp``.

    Shapes:
        crm_state: [B, d_c] -> alpha: [B, N], each row sums to 1.

    Example:
        >>> gate = PLoRAGate(crm_dim=256, num_experts=16)
        >>> gate(torch.randn(4, 256)).shape
        torch.Size([4, 16])
    """

    def __init__(
        self,
        crm_dim: int,
        num_experts: int,
        *,
        hidden_dim: int = 60,
        dropout: float = 0.1,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = temperature
        self.norm = nn.LayerNorm(crm_dim)
        self.proj_in = nn.Linear(crm_dim, hidden_dim)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(hidden_dim, num_experts)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: PLoRAConfig) -> PLoRAGate:
        """The gate that ``config`` describes."""
        return cls(
            config.crm_dim,
            config.num_experts,
            hidden_dim=config.gate_hidden,
            dropout=config.gate_dropout,
            temperature=config.temperature,
        )

    def reset_parameters(self) -> None:
        """Kaiming-uniform Linear weights (ReLU gain), zero biases, identity LayerNorm."""
        self.norm.reset_parameters()
        for linear in (self.proj_in, self.proj_out):
            nn.init.kaiming_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, crm_state: torch.Tensor) -> torch.Tensor:
        """Expert weights ``alpha`` [B, N] for a CRM state [B, d_c]."""
        hidden = self.act(self.proj_in(self.norm(crm_state.detach())))  # [B, d_h]
        beta = self.proj_out(self.dropout(hidden))  # [B, N]
        return torch.softmax(beta / self.temperature, dim=-1)


class PLoRALinear(nn.Module):
    """A frozen projection plus a per-sample mixture of ``N`` LoRAs (paper Eq. 9 and 11).

    .. math::

        y = \\mathrm{base}(x) + s \\cdot \\Delta(x), \\qquad s = \\alpha_{cfg} / r

    with, for one sample whose gate weights are ``alpha`` [N],

    - ``mixing="products"`` (paper Eq. 11, a mixture of the experts' products):
      ``Delta(x) = sum_k alpha_k x A_k^T B_k^T``. Computed as two GEMMs over the concatenated bank
      ``A_all = [A_1; ...; A_N]^T`` [d_in, N r] and ``B_all = [B_1, ..., B_N]^T`` [N r, d_out]:
      ``Delta = ((x A_all) * repeat_interleave(alpha, r)) B_all``, the cost of one LoRA of rank ``N r``.
      No per-sample d_in x d_out matrix is ever built.
    - ``mixing="factors"`` (the authors' code, a product of mixtures with cross terms):
      ``Delta(x) = x Abar^T Bbar^T`` with ``Abar = sum_k alpha_k A_k`` [r, d_in] and
      ``Bbar = sum_k alpha_k B_k`` [d_out, r] mixed per sample.

    Both coincide for a one-hot ``alpha``. LoRA dropout is applied to ``x`` on the adapter path only.

    Precision (``config.compute_dtype``): with ``activations`` the GEMMs run in ``x``'s dtype on copies of
    ``A``, ``B`` and ``alpha`` cast to it (``d(A.to(bf16)) / dA`` is the identity cast back, so the float32
    parameters receive float32 gradients of the bf16 computation, what mixed precision with master
    weights does); with ``params`` they run in the parameters' dtype on ``x`` cast to it.
    Each ``A_k`` is Kaiming-uniform (a = sqrt(5)) on its own (r, d_in) view, as peft initialises
    ``lora_A``, and every ``B_k`` is zero, so the layer equals ``base_layer`` at step 0.

    The gate weights reach the layer through ``alpha=``; inside a model, the routing context
    :func:`reclora_ds.models.inject.route_gate_inputs` passes them. The layer owns its gate
    (``plora_gate``) unless ``config.shared_gate``, in which case the model owns one shared gate.

    Args:
        base_layer: the frozen projection; only ``base_layer(x)``, ``in_features`` and ``out_features``
            are used, so an ``nn.Linear`` or a bitsandbytes ``Linear8bitLt`` both work.
        config: bank and gate settings.

    Shapes:
        x: [B, T, d_in] (or [B, d_in]); alpha: [B, N] -> [B, T, d_out] (or [B, d_out]).

    Example:
        >>> layer = PLoRALinear(nn.Linear(32, 32), PLoRAConfig(crm_dim=8))
        >>> layer(torch.randn(2, 5, 32), alpha=torch.full((2, 16), 1 / 16)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, base_layer: nn.Module, config: PLoRAConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.num_experts = config.num_experts
        self.rank = config.rank
        self.scale = config.scale
        self.mixing = config.mixing
        self.compute_dtype = config.compute_dtype
        self.plora_A = nn.Parameter(torch.empty(config.num_experts, config.rank, self.in_features))
        self.plora_B = nn.Parameter(torch.empty(config.num_experts, self.out_features, config.rank))
        self.plora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.plora_gate = None if config.shared_gate else PLoRAGate.from_config(config)
        self.reset_parameters()

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for code that reads ``proj.weight`` (dtype, device checks)."""
        return self.base_layer.weight

    def reset_parameters(self) -> None:
        """``A_k`` Kaiming-uniform per expert, ``B_k = 0``: the layer starts as ``base_layer``."""
        with torch.no_grad():
            for k in range(self.num_experts):
                # fan_in of the (r, d_in) view is d_in, as for peft's lora_A; on the whole [N, r, d_in]
                # tensor kaiming_uniform_ would use fan_in = r * d_in and a bound sqrt(r) times smaller.
                nn.init.kaiming_uniform_(self.plora_A[k], a=math.sqrt(5))
        nn.init.zeros_(self.plora_B)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """``base_layer(x) + scale * Delta(x)`` for per-sample gate weights ``alpha`` [B, N]."""
        if alpha is None:
            raise RuntimeError(
                "PLoRALinear got no gate weights: run the model inside "
                "`with route_gate_inputs(model, crm_state):` (reclora_ds.models.inject) or pass alpha=. "
                "With activation checkpointing, call backward() inside that block too."
            )
        batch = x.shape[0]
        if alpha.shape != (batch, self.num_experts):
            raise ValueError(
                f"alpha must be [batch={batch}, num_experts={self.num_experts}], got {tuple(alpha.shape)}"
            )
        result = self.base_layer(x)
        dtype = self._adapter_dtype(x)
        # x is already `dtype` under compute_dtype="activations" (or both dtypes agree): `.to` is a no-op then
        x_adapter = self.plora_dropout(x).to(dtype).reshape(batch, -1, self.in_features)  # [B, T, d_in]
        bank_a, bank_b = self.plora_A.to(dtype), self.plora_B.to(dtype)  # no-op unless bf16 compute
        alpha = alpha.to(dtype=dtype, device=x_adapter.device)
        if self.mixing == "products":
            delta = self._mix_products(x_adapter, alpha, bank_a, bank_b)
        else:
            delta = self._mix_factors(x_adapter, alpha, bank_a, bank_b)
        delta = delta.reshape(result.shape)  # [B, T, d_out] -> the base output's shape
        return result + (delta * self.scale).to(result.dtype)

    def _adapter_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the bank's GEMMs run in (``compute_dtype``; see the class docstring)."""
        if self.compute_dtype == "activations" and x.dtype.is_floating_point:
            return x.dtype
        return self.plora_A.dtype

    def _mix_products(
        self, x: torch.Tensor, alpha: torch.Tensor, bank_a: torch.Tensor, bank_b: torch.Tensor
    ) -> torch.Tensor:
        """``sum_k alpha_k x A_k^T B_k^T`` as two GEMMs over the concatenated bank; [B, T, d_out]."""
        n, r, d_in = bank_a.shape
        a_all = bank_a.reshape(n * r, d_in)  # [N*r, d_in], row k*r + j is row j of A_k
        b_all = bank_b.permute(1, 0, 2).reshape(self.out_features, n * r)  # [d_out, N*r], same order
        hidden = F.linear(x, a_all)  # [B, T, N*r]
        hidden = hidden * alpha.repeat_interleave(r, dim=-1)[:, None, :]  # expert k's r columns times alpha_k
        return F.linear(hidden, b_all)  # [B, T, d_out]

    def _mix_factors(
        self, x: torch.Tensor, alpha: torch.Tensor, bank_a: torch.Tensor, bank_b: torch.Tensor
    ) -> torch.Tensor:
        """``x Abar^T Bbar^T`` with the factors mixed per sample; [B, T, d_out]."""
        a_bar = torch.einsum("bn,nri->bri", alpha, bank_a)  # [B, r, d_in]
        b_bar = torch.einsum("bn,nor->bor", alpha, bank_b)  # [B, d_out, r]
        hidden = torch.bmm(x, a_bar.transpose(1, 2))  # [B, T, r]
        return torch.bmm(hidden, b_bar.transpose(1, 2))  # [B, T, d_out]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, rank={self.rank}, scale={self.scale}, mixing={self.mixing!r}, "
            f"compute_dtype={self.compute_dtype!r}"
        )
