"""The CRM's cost-saving forms against the plain formulas they replace, side by side in one process.

    python benchmarks/bench_crm_forms.py [--data DIR] [--config launch/configs/sim_quickstart.yaml]
                                         [--batch 128] [--steps 25] [--repeats 3] [key=value ...]

One thread, the batch of one rank of a 2-rank run (128), the same weights and batches for every variant.
The forms belong to SIM's own soft search, so the config is read with ``history_mode=recent
history_length=256 crm.search=soft`` (:data:`SOFT_SEARCH`) before the command line's overrides:

  * ``shipped``           the model as the CPU recipe runs it (every form below, the C++ kernels, fused AdamW)
  * ``no C++ kernels``    the shipped forms with :mod:`reclora_ds.cpu.kernels` not registered: the soft
                          search's inner products and the attention's ReLU / output layer / weighted sum as
                          the PyTorch ops of :mod:`reclora_ds.models.ops`
  * ``plain encoder``     ``BehaviourEncoder`` as ``ReLU(Linear([item; rating]))`` over gathered embeddings,
                          instead of projected table rows
  * ``plain attention``   the attention's first Linear over the concatenated ``[t, h, t - h, t * h]``,
                          instead of ``u_t + A_t h``
  * ``plain search``      the soft search as one inner product of gathered item vectors (einsum),
                          instead of field by field
  * ``all plain``         the three together, without the C++ kernels
  * ``unfused AdamW``     the shipped model with ``torch.optim.AdamW``'s default (foreach) implementation
  * ``compile model``     ``torch.compile`` (inductor) of the whole model without the C++ kernels: the
                          forward and backward of the shipped forms as inductor's generated C++
  * ``compile ops``       the model without the C++ kernels, its two ops' PyTorch forms compiled by
                          ``torch.compile`` and registered in their place (what would replace the kernels)

Before timing, the forward of ``all plain`` is compared with the shipped one (max |difference| of the
logits and states, eval mode). The variants run round-robin ``--repeats`` times; each line is the median
run, in ms per training step (forward, backward, AdamW), with every run's figure. Each run builds the model
afresh and takes ``--warmup`` untimed steps first; for the compiled variants the first of them compiles
(dynamo's caches are reset before each run; inductor's on-disk cache is not, so later runs compile faster),
and its time is printed apart as the compile time. Glibc's malloc thresholds are set as the recipe sets
them (``reclora_ds.cpu.allocator``); ``bench_crm.py --allocator`` measures that setting itself.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from bundled_data import processed_data

from reclora_ds.config import load_config
from reclora_ds.cpu import enable_cpu_extras
from reclora_ds.cpu import kernels as cpu_kernels
from reclora_ds.data.loader import CRMBatchLoader
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.models import ops
from reclora_ds.models.crm import BehaviourEncoder, Behaviours, FeatureSpec, TargetAttention
from reclora_ds.models.registry import build_crm
from reclora_ds.models.sim import SIM
from reclora_ds.training.crm_config import CRMTrainConfig
from reclora_ds.training.crm_recipe import crm_config, train_step

ROOT = Path(__file__).parents[1]
DEFAULT_CONFIG = ROOT / "launch" / "configs" / "sim_quickstart.yaml"
# the forms timed here are SIM's soft search over a recent window (the default CRM reads a retrieval instead)
SOFT_SEARCH = ("history_mode=recent", "history_length=256", "crm.search=soft")


# The plain formulas (what the shipped forms compute, written the direct way).
def plain_encoder(
    self: BehaviourEncoder, tables: list[torch.Tensor], ids: list[torch.Tensor]
) -> torch.Tensor:
    parts = [F.embedding(index, table) for table, index in zip(tables[:-1], ids[:-1], strict=True)]
    item = torch.cat(parts, dim=-1) if self.merge == "concat" else torch.stack(parts).sum(0)
    return self.act(self.proj(torch.cat([item, F.embedding(ids[-1], tables[-1])], dim=-1)))


def plain_first_layer(
    self: TargetAttention, target: torch.Tensor, behaviours: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    t = target.unsqueeze(1).expand_as(behaviours)
    whole = self.mlp[0](torch.cat([t, behaviours, t - behaviours, t * behaviours], dim=-1))  # [B, L, H]
    return whole, whole.new_zeros(whole.shape[0], whole.shape[2])  # the target's part is already in


def plain_search(self: SIM, batch: dict, behaviours: Behaviours | None = None) -> torch.Tensor:
    if behaviours is None:
        behaviours = Behaviours.from_batch(batch, self.behaviour_fields)
    tables = {name: self.embeddings.tables[name].weight for name in self.behaviour_fields}
    target = self.target_items({name: F.embedding(batch[name], t) for name, t in tables.items()})  # [B, D]
    items = self.target_items({name: F.embedding(behaviours.ids[name], t) for name, t in tables.items()})
    scores = torch.einsum("bld,bd->bl", items, target)  # [B, L, D] . [B, D]
    return scores.masked_fill(~behaviours.mask, float("-inf"))


PLAIN = {
    "encoder": (BehaviourEncoder, "forward", plain_encoder),
    "attention": (TargetAttention, "first_layer_parts", plain_first_layer),
    "search": (SIM, "search_scores", plain_search),
}
VARIANTS = {  # name -> (plain forms, fused AdamW, ops' implementations, torch.compile of: None | model | ops)
    "shipped": ((), True, "kernels", None),
    "no C++ kernels": ((), True, "pytorch", None),
    "plain encoder": (("encoder",), True, "kernels", None),
    "plain attention": (("attention",), True, "kernels", None),
    "plain search": (("search",), True, "kernels", None),
    "all plain": (("encoder", "attention", "search"), True, "pytorch", None),
    "unfused AdamW": ((), False, "kernels", None),
    "compile model": ((), True, "pytorch", "model"),
    "compile ops": ((), True, "compiled", "ops"),
}


def compiled_ops() -> dict[str, ops.Implementation]:
    """The ops' own PyTorch forms compiled by torch.compile, as implementations that take everything."""

    def everything(*args: torch.Tensor) -> bool:
        return True

    return {
        name: ops.Implementation(torch.compile(form), everything) for name, form in ops.PYTORCH_FORMS.items()
    }


@contextlib.contextmanager
def plain_forms(names: tuple[str, ...], implementations: str = "kernels") -> Iterator[None]:
    """The named plain formulas swapped in, and the ops' implementations: ``kernels`` (the C++ kernels),
    ``pytorch`` (their PyTorch forms) or ``compiled`` (:func:`compiled_ops`)."""
    saved = {name: getattr(PLAIN[name][0], PLAIN[name][1]) for name in names}
    chosen = {"kernels": cpu_kernels.IMPLEMENTATIONS, "pytorch": {}}.get(implementations)
    try:
        for name in names:
            cls, attr, fn = PLAIN[name]
            setattr(cls, attr, fn)
        with ops.implementations(compiled_ops() if chosen is None else chosen):
            yield
    finally:
        for name, original in saved.items():
            setattr(PLAIN[name][0], PLAIN[name][1], original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="processed dataset (default: prepare the bundled sample)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a CRMTrainConfig YAML file")
    parser.add_argument("--batch", type=int, default=128, help="samples per step (one rank's share)")
    parser.add_argument("--steps", type=int, default=25, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each variant (the median is reported)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. crm.item_merge=concat")
    args = parser.parse_args()
    torch.set_num_threads(1)
    enable_cpu_extras(allocator=True)  # as the recipe does on the CPU; the variants pick the ops' forms
    cpu_kernels.load(required=True)

    with tempfile.TemporaryDirectory() as tmp:
        data = processed_data(args.data, tmp)
        cfg = load_config(CRMTrainConfig, args.config, [f"data_dir={data}", *SOFT_SEARCH, *args.overrides])
        ds = ProcessedDataset(cfg.data_dir)
        spec = FeatureSpec.from_metadata(ds.metadata)
        loader = CRMBatchLoader(ds, "train", args.batch, history_length=cfg.history_length, shuffle=True)
        batches = [b for _, b in zip(range(args.warmup + args.steps), loader, strict=False)]

        def build() -> torch.nn.Module:
            torch.manual_seed(cfg.seed)
            return build_crm(cfg.model, crm_config(cfg), spec)

        model = build().eval()
        with torch.no_grad():
            with plain_forms(()):
                shipped = model(batches[0])
            with plain_forms(("encoder", "attention", "search"), "pytorch"):
                plain = model(batches[0])
        print(
            f"config {args.config} {' '.join(args.overrides)}; model {cfg.model} {crm_config(cfg)}; "
            f"L={cfg.history_length}, batch {args.batch}, 1 thread"
        )
        print(
            f"all plain vs shipped forward: max |d logit| {(plain.logit - shipped.logit).abs().max():.2e}, "
            f"max |d state| {(plain.hidden - shipped.hidden).abs().max():.2e}"
        )

        runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
        compile_s: dict[str, list[float]] = {name: [] for name, v in VARIANTS.items() if v[3]}
        for _ in range(args.repeats):
            for name, (forms, fused, implementations, compiled) in VARIANTS.items():
                if compiled:
                    torch._dynamo.reset()  # compile afresh in every run
                with plain_forms(forms, implementations):
                    model = build()
                    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=fused or None)
                    stepped = torch.compile(model) if compiled == "model" else model
                    for i, batch in enumerate(batches[: args.warmup]):
                        start = time.perf_counter()
                        train_step(stepped, batch, optimizer)
                        if compiled and i == 0:
                            compile_s[name].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    for batch in batches[args.warmup :]:
                        train_step(stepped, batch, optimizer)
                    runs[name].append(1e3 * (time.perf_counter() - start) / args.steps)
        for name, ms in runs.items():
            spread = ", ".join(f"{m:.1f}" for m in ms)
            compiling = ""
            if name in compile_s:
                compiling = "  compile (first step): " + ", ".join(f"{t:.1f}" for t in compile_s[name]) + " s"
            print(
                f"{name:>16}: {statistics.median(ms):6.1f} ms/step  (runs: {spread}){compiling}", flush=True
            )


if __name__ == "__main__":
    main()
