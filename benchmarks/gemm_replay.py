"""The frozen backbone's matrix products of one stage-2 micro-batch, replayed alone: what a step would cost if
everything between its products (norms, rotary, SiLU, residual adds, softmax, adapters, autograd) were free.

    python benchmarks/gemm_replay.py --tokens 300 --batch 4            # SmolLM2-135M, bf16, one thread

``bench_plora.py --stage2`` prints it beside each variant's measured seconds per sample: the measured time
over the replay is how much of a step is *not* the products, and the replay over the FLOP floor (the bench's
``4 P T + 8 n T^2 d`` at the matmul probe's rate) is how far the products themselves, at the step's own shapes,
run from the probe's best case.

Products of one micro-batch of B prompts of T tokens (M = B T), per decoder layer, as the stage-2 step runs
them (the adapters' products are not counted: the floor does not count them either):

* every ``nn.Linear`` of the layer, W [out, in]: the forward ``Y = X W^T`` ([M, in] x [in, out]) and, in
  training, the input gradient ``dX = dY W`` ([M, out] x [out, in]); no weight gradient (frozen);
* the attention in the layout of ``eager_fused``'s matmul form (:func:`reclora_ds.cpu.kernels.decoder_attention_matmul`):
  per batch row and key head, the G = H / Hk query heads' rows stacked, Q_g [G T, d]: ``S = Q_g K^T``
  ([G T, d] x [d, T]) and ``O = P V`` ([G T, T] x [T, d]); in training also ``dV = P^T dO_g``,
  ``dP = dO_g V^T``, ``dQ = dS K``, ``dK = dS^T Q_g``. Full T x T squares, as the matmul form computes them.

FLOPs: 2 m k n per [m, k] x [k, n] product, so a training micro-batch counts ``4 P M`` for the projections
(P the layers' linear weights) and ``12 L H T^2 d B`` for the attention (L layers), an inference one ``2 P M``
and ``4 L H T^2 d B`` (``tests/test_gemm_replay.py`` checks the count against ``torch.utils.flop_counter`` on a
real model).

Each layer has its own weights (the real model's size: streamed from memory as the step streams them); the
activations are allocated once per shape and reused, the products' outputs are fresh tensors. The result is
the best of ``repeats`` replays of all layers after one untimed one, on ``threads`` threads.

Shape legend: B prompts per micro-batch, T tokens per prompt (padded), M = B T, L layers, H query heads,
Hk key / value heads, G = H / Hk, d head width.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BackboneProducts:
    """What the replay needs of a backbone: its decoder layers' linear shapes and its attention heads.

    Attributes:
        linears: (out, in) of each ``nn.Linear`` of one decoder layer, in module order.
        layers: L, decoder layers.
        heads: H, query heads; kv_heads: Hk; head_dim: d.
    """

    linears: tuple[tuple[int, int], ...]
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of_config(cls, config: object) -> BackboneProducts:
        """From a transformers decoder config (the model is built on the meta device: no weights)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        first_layer = ".layers.0."
        linears = tuple(
            (m.out_features, m.in_features)
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and first_layer in f"{name}."
        )
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(linears, config.num_hidden_layers, heads, kv_heads, head_dim)

    @classmethod
    def of(cls, backbone: str) -> BackboneProducts:
        """From a backbone name (``default`` or a local folder)."""
        from transformers import AutoConfig

        from reclora_ds.backbone import resolve_backbone

        return cls.of_config(AutoConfig.from_pretrained(str(resolve_backbone(backbone))))

    @property
    def decoder_weights(self) -> int:
        """P, the decoder layers' linear weights (the non-embedding weights the FLOP floor counts)."""
        return self.layers * sum(out * inp for out, inp in self.linears)

    def floor_flops(self, tokens: float, train: bool) -> float:
        """The FLOP floor of one sample of ``tokens`` real tokens (issue #16's, as ``bench_plora --stage2``
        prints it): ``2 P T + 4 L T^2 H d`` forward, twice that in training (forward plus the activations'
        gradients; it counts the attention's backward as one forward where its four products cost two, so
        the floor is a little low: about 4% of a SmolLM2 training sample at 300 tokens)."""
        forward = 2 * self.decoder_weights * tokens + 4 * self.layers * tokens**2 * self.heads * self.head_dim
        return 2 * forward if train else forward

    def flops(self, batch: int, tokens: int, train: bool) -> int:
        """FLOPs of one micro-batch's products: ``2 P M + 4 L H T^2 d B`` forward, three times the
        attention's and twice the projections' in training."""
        rows = batch * tokens
        projections = sum(2 * rows * out * inp for out, inp in self.linears) * self.layers
        attention = 2 * 2 * self.layers * self.heads * tokens * tokens * self.head_dim * batch
        return 2 * projections + 3 * attention if train else projections + attention


def _layer_products(
    shape: BackboneProducts,
    batch: int,
    tokens: int,
    train: bool,
    weight: Callable[..., torch.Tensor],
    activation: Callable[..., torch.Tensor],
) -> list[Callable[[], torch.Tensor]]:
    """The products of one layer as closures over this layer's own weights (``weight(*size)``: a new tensor)
    and the activations shared by all layers (``activation(*size)``: one tensor per size)."""
    rows = batch * tokens
    groups = shape.heads // shape.kv_heads
    stacked = groups * tokens  # G T rows per (batch row, key head)
    pairs = batch * shape.kv_heads
    rand = activation

    products: list[Callable[[], torch.Tensor]] = []
    for out, inp in shape.linears:
        w, x = weight(out, inp), rand(rows, inp)
        products.append(lambda w=w, x=x: F.linear(x, w))  # Y = X W^T
        if train:
            grad = rand(rows, out)
            products.append(lambda w=w, g=grad: torch.matmul(g, w))  # dX = dY W
    q, k, v = (
        rand(pairs, stacked, shape.head_dim),
        rand(pairs, tokens, shape.head_dim),
        rand(pairs, tokens, shape.head_dim),
    )
    p, d_out = rand(pairs, stacked, tokens), rand(pairs, stacked, shape.head_dim)
    products += [lambda: torch.matmul(q, k.transpose(1, 2)), lambda: torch.matmul(p, v)]  # S, O
    if train:
        products += [
            lambda: torch.matmul(p.transpose(1, 2), d_out),  # dV = P^T dO_g
            lambda: torch.matmul(d_out, v.transpose(1, 2)),  # dP = dO_g V^T
            lambda: torch.matmul(p, k),  # dQ = dS K (dS has P's shape)
            lambda: torch.matmul(p.transpose(1, 2), q),  # dK = dS^T Q_g
        ]
    return products


def replay_seconds(
    shape: BackboneProducts,
    batch: int,
    tokens: int,
    *,
    train: bool,
    dtype: torch.dtype = torch.bfloat16,
    threads: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> float:
    """Best wall seconds of one micro-batch's products over all layers (module docstring)."""
    if batch < 1 or tokens < 1 or repeats < 1:
        raise ValueError(f"batch, tokens and repeats must be >= 1, got {batch}, {tokens}, {repeats}")
    generator = torch.Generator().manual_seed(seed)
    shared: dict[tuple[int, ...], torch.Tensor] = {}

    def weight(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(dtype)

    def activation(*size: int) -> torch.Tensor:
        if size not in shared:
            shared[size] = weight(*size)
        return shared[size]

    layers = [_layer_products(shape, batch, tokens, train, weight, activation) for _ in range(shape.layers)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = math.inf
        for attempt in range(repeats + 1):  # the first builds oneDNN's kernels for these shapes: untimed
            start = time.perf_counter()
            for products in layers:
                for product in products:
                    product()
            if attempt:
                best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--tokens", type=int, default=300, help="T, padded tokens per prompt")
    parser.add_argument("--batch", type=int, default=4, help="B, prompts per micro-batch")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = BackboneProducts.of(args.backbone)
    dtype = getattr(torch, args.dtype)
    print(f"{args.backbone}: {shape}")
    for train in (True, False):
        seconds = replay_seconds(
            shape,
            args.batch,
            args.tokens,
            train=train,
            dtype=dtype,
            threads=args.threads,
            repeats=args.repeats,
        )
        flops = shape.flops(args.batch, args.tokens, train)
        print(
            f"{'train' if train else 'infer'}: {args.batch} x {args.tokens} tokens, {seconds / args.batch:.4f} s "
            f"per sample, {flops / seconds / 1e9:.0f} GFLOP/s over {flops / 1e9:.1f} GFLOP"
        )


if __name__ == "__main__":
    main()
