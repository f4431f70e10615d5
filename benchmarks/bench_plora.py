"""Stage-2 cost: PLoRA's step against peft's LoRA r=8 (issue #5), and the real stage-2 path against a FLOP floor
(issue #16).

    python benchmarks/bench_plora.py --stage2 --runs runs/quickstart          # real stage 2, 2 ranks (below)
    python benchmarks/bench_plora.py --stage2 --runs runs/quickstart --quick  # the last speed-ups, 2 steps
    python benchmarks/bench_plora.py                        # SmolLM2-135M-Instruct, CPU, float32, B=4, T=256
    python benchmarks/bench_plora.py --tiny                 # smoke run on a random 2-layer Llama (< 1 min)
    python benchmarks/bench_plora.py --device cuda --dtype bfloat16 --batch 8
    python benchmarks/bench_plora.py --profile              # + where PLoRA's extra time goes

Variants, all on ``q_proj`` and ``v_proj`` with r=8, alpha=16, adapter dropout 0 (stage 2's settings):

  * ``lora``                 peft's ``LoraConfig`` / ``get_peft_model``, as ``RecLLM`` mode ``lora`` builds it
                             (the baseline);
  * ``plora-N{2,4,16}-products`` / ``-factors``   :func:`reclora_ds.models.inject.inject_plora` with one gate
    per adapted projection (gate dropout 0.1, the default), routed by
    :func:`reclora_ds.models.inject.route_gate_inputs` with a random CRM state [B, 256] standing in for the
    frozen CRM's (the CRM itself is not run: it is not part of PLoRA's cost);
  * ``plora-N{n}-{mixing}-fp32math`` (only with ``--only``): the same with ``compute_dtype="params"``, the bank's
    GEMMs in float32 on the activations cast to it (the default computes in the activations' dtype, bf16 under
    ``--dtype bfloat16``).

The step is stage 2's (``RecLLM._forward_lm``): a left-padded batch of prompts (lengths drawn in
[0.8 T, T]) ending with the two tokens of ``"Yes."``; the LM gets ``attention_mask``, ``position_ids``
from the mask and only the last 3 positions go through the LM head
(:func:`reclora_ds.models.rec_llm.last_logits`), and the loss is
:func:`reclora_ds.models.rec_llm.answer_loss` on the answer tokens. A training step is that forward +
backward + ``AdamW.step`` over the trainable parameters + ``zero_grad``; an inference step is the forward in
``eval`` mode under ``torch.no_grad`` (``RecLLM.score``).

Every variant wraps its own copy of ONE loaded model whose frozen tensors are shared (``deepcopy`` with the
parameters in the memo), so all run the same weights on the same batch. After ``--warmup`` untimed steps of
each kind per variant and one untimed step per variant that measures memory, the variants run round-robin
for ``--trials`` trials (the first variant of a trial rotates, so none always follows the same neighbour),
each trial timing one training step then one inference step of every variant. The table gives each
variant's median, the median and range of the per-trial paired ratios to ``lora`` (variant time / lora's
time in the same trial: the load of the machine moves both), and the memory. PASS / MISS compares the
median paired training ratio of every PLoRA variant with the target (CPU 1.10, CUDA 1.05).

Clocks: every step is timed on the wall clock and on the process CPU time (``time.process_time``). On a CPU
with one torch thread the verdict uses CPU time: it is the step's cost without the time slices that other
processes on a shared machine take from it (wall-clock ratios swung 0.6-1.5 from trial to trial on the
shared 2-core machine, CPU-time ones far less); the wall-clock ratios are printed beside it. With more
threads (CPU time adds the threads up) and on CUDA the verdict uses the wall clock.

Threads: one by default (``--threads``), as stage 2 runs on a CPU: the quickstart launches two DeepSpeed
ranks with ``OMP_NUM_THREADS=1`` on a 2-core machine, each stepping a micro batch of 4. (With two OpenMP
threads on a 2-core machine that other processes also use, steps were about 3x slower and erratic.)

Stage 2 (``--stage2``): every variant is a real stage-2 run: ``deepspeed --num_gpus 2`` (``--ranks``;
``OMP_NUM_THREADS=1``) starts this file with ``--stage2-worker``, whose ranks run
:class:`reclora_ds.training.plora_recipe.PLoRARecipe` (RecLLM with the quickstart's SIM, DeepSpeed ZeRO-2,
the quickstart's prompts from ``<runs>/prepare``, ``<runs>/retrieval``, ``<runs>/sim``) for a few optimizer
steps, then its final evaluation of test ids. The
recipe's own ``perf`` figures are read back from ``metrics.json``: seconds per sample of the timed steps
(data, forward, backward, optimizer step; no logging, validation or checkpoint), of evaluation, prompt tokens
per sample and the padding fraction. Variants switch one speed-up at a time (``STAGE2_VARIANTS``). The FLOP
floor: a training sample costs ``4 P T`` (forward + activation gradients through the frozen weights; no
weight gradients) and an inference sample ``2 P T``, with P the non-embedding weights of the decoder layers
and T the real (unpadded) tokens per sample; the attention scores add ``4 n_layers T^2 d`` (training x2). The
floor divides that by a matmul probe measured in the same run (a [1024, 576] @ [576, 1536] GEMM, fp32 and
bf16, best of several, one thread as each rank runs); measured / floor shows how far a variant is from what
the cores can do. Job seconds per sample = a rank's seconds per sample / the number of ranks. A second table
replays the frozen backbone's matrix products alone at each variant's micro-batch, evaluation batch and mean
padded prompt length (``gemm_replay.py``, after the variants' runs): measured / replay is what the rest of a
step costs, replay / floor how far the products themselves run from the probe.

Memory: on CPU, the peak of the process RSS sampled every millisecond by a thread during one training step,
minus the RSS just before it (after ``gc.collect()`` and glibc ``malloc_trim(0)``, so heap memory freed by
earlier steps does not hide the step's own growth): what one step allocates on top of the model, the
optimizer state and the other variants. On CUDA, ``torch.cuda.max_memory_allocated()`` during the step
minus ``torch.cuda.memory_allocated()`` before it. ``saved`` is exact: the bytes of the distinct tensors
autograd keeps for backward in that step (parameters excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
import yaml
from gemm_replay import BackboneProducts, replay_seconds
from torch import nn

from reclora_ds.batch import IGNORE_INDEX
from reclora_ds.models.inject import inject_plora, route_gate_inputs
from reclora_ds.models.plora import PLoRAConfig, PLoRAGate, PLoRALinear
from reclora_ds.models.rec_llm import answer_loss, last_logits
from reclora_ds.package_data import find_ds_config
from reclora_ds.training.plora_recipe import TRAIN_PHASES

TARGET_MODULES = ("q_proj", "v_proj")
RANK = 8
ALPHA = 16.0
CRM_DIM = 256
EXPERT_COUNTS = (2, 4, 16)
MIXINGS = ("products", "factors")
BASELINE = "lora"
TARGET_RATIO = {"cpu": 1.10, "cuda": 1.05}
ANSWER_TOKENS = 2  # "Yes." / "No." are two tokens of SmolLM2's tokenizer (resolve_answer_tokens)
MIN_PROMPT_SHARE = 0.8  # prompt lengths are drawn in [0.8 T, T], left-padded to T
RSS_SAMPLE_S = 0.001
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 1 << 20


# ------------------------------------------------------------------------------------------- model


def load_base(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The frozen causal LM every variant wraps: the backbone (as stage 2 loads it), or a random tiny Llama."""
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            attn_implementation=args.attn_implementation,
        )
        model = LlamaForCausalLM(config).to(DTYPES[args.dtype])
    else:
        from reclora_ds.llm_loader import load_causal_lm

        model, _ = load_causal_lm(
            args.backbone, dtype=args.dtype, attn_implementation=args.attn_implementation
        )
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.to(device).train()


def shared_copy(base: nn.Module) -> nn.Module:
    """A deep copy of ``base`` whose parameters are ``base``'s own tensors (frozen, so safe to share)."""
    memo = {id(param): param for param in base.parameters()}
    return copy.deepcopy(base, memo)


def build_lora(base: nn.Module) -> nn.Module:
    """peft's LoRA r=8 with the settings of ``RecLLM`` mode ``lora``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(shared_copy(base), config)


def build_plora(
    base: nn.Module, num_experts: int, mixing: str, compute_dtype: str = "activations"
) -> nn.Module:
    model = shared_copy(base)
    config = PLoRAConfig(
        num_experts=num_experts,
        rank=RANK,
        alpha=ALPHA,
        temperature=1.0,
        mixing=mixing,
        target_modules=TARGET_MODULES,
        crm_dim=CRM_DIM,
        compute_dtype=compute_dtype,
    )
    inject_plora(model, config)
    return model


# ------------------------------------------------------------------------------------------- batch


@dataclass
class Batch:
    """A stage-2 micro batch: left-padded prompts ending with the answer tokens, and a CRM state."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 0 on the left padding
    labels: torch.Tensor  # [B, K]: the last K positions' labels (answer ids, IGNORE_INDEX elsewhere)
    crm_state: torch.Tensor  # [B, d_c]

    @property
    def keep(self) -> int:
        """K, the positions that go through the LM head (the answer position and the answer tokens)."""
        return self.labels.shape[1]


def make_batch(batch: int, seq: int, vocab: int, device: torch.device, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(MIN_PROMPT_SHARE * seq), seq + 1, (batch,), generator=generator)
    input_ids = torch.randint(1, vocab, (batch, seq), generator=generator)
    attention_mask = (torch.arange(seq)[None, :] >= seq - lengths[:, None]).long()
    input_ids = input_ids * attention_mask  # pad id 0 on the left
    keep = ANSWER_TOKENS + 1
    labels = torch.full((batch, keep), IGNORE_INDEX, dtype=torch.long)
    labels[:, 1:] = input_ids[:, -ANSWER_TOKENS:]
    crm_state = torch.randn(batch, CRM_DIM, generator=generator)
    return Batch(
        input_ids.to(device),
        attention_mask.to(device),
        labels.to(device),
        crm_state.to(device),
    )


# ----------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One adapted model with its optimizer, and the measurements taken on it."""

    name: str
    model: nn.Module
    routed_plora: bool  # True: PLoRA, run inside route_gate_inputs; False: peft's LoRA
    optimizer: torch.optim.Optimizer = field(init=False)
    times: dict[str, list[float]] = field(default_factory=dict)  # "train wall" -> seconds per trial, ...
    step_bytes: int = 0
    saved_bytes: int = 0

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(self.trainable(), lr=1e-4, weight_decay=0.0)

    def trainable(self) -> list[nn.Parameter]:
        return [param for param in self.model.parameters() if param.requires_grad]

    def routed(self, batch: Batch):
        return (
            route_gate_inputs(self.model, batch.crm_state) if self.routed_plora else contextlib.nullcontext()
        )

    def logits(self, batch: Batch) -> torch.Tensor:
        """The LM's logits of the last K positions [B, K, V], as ``RecLLM._forward_lm`` asks for them."""
        return last_logits(self.model, batch.input_ids, batch.attention_mask, batch.keep)

    def train_step(self, batch: Batch) -> None:
        with self.routed(batch):
            loss = answer_loss(self.logits(batch), batch.labels)
            loss.backward()  # inside the routing block, as checkpointed layers need
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def infer_step(self, batch: Batch) -> None:
        self.model.eval()
        try:
            with torch.no_grad(), self.routed(batch):
                self.logits(batch)
        finally:
            self.model.train()


# suffix of a PLoRA variant whose bank computes in its float32 parameters' dtype (compute_dtype="params")
# instead of the activations' (the default): the two differ only under a bf16 / fp16 backbone
FP32_MATH = "-fp32math"


def variant_names() -> list[str]:
    plora = [f"plora-N{n}-{mixing}" for n in EXPERT_COUNTS for mixing in MIXINGS]
    return [BASELINE, *plora, *(name + FP32_MATH for name in plora)]


def build_variants(base: nn.Module, names: list[str]) -> list[Variant]:
    variants = [Variant(BASELINE, build_lora(base), routed_plora=False)]
    for suffix, compute_dtype in (("", "activations"), (FP32_MATH, "params")):
        for num_experts in EXPERT_COUNTS:
            for mixing in MIXINGS:
                name = f"plora-N{num_experts}-{mixing}{suffix}"
                if name in names:
                    model = build_plora(base, num_experts, mixing, compute_dtype)
                    variants.append(Variant(name, model, routed_plora=True))
    return variants


# ------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall-clock seconds of one call of ``step``, and the process CPU seconds it took (all threads)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc only), so the RSS before a step is its true floor."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RSSPeak:
    """Peak process RSS above the level at entry, sampled by a thread every ``RSS_SAMPLE_S``."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(RSS_SAMPLE_S)

    def __enter__(self) -> RSSPeak:
        gc.collect()
        _malloc_trim()
        self.baseline = self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def step_memory(step: Callable[[], None], device: torch.device) -> int:
    """Bytes one call of ``step`` needs above what is allocated before it (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with RSSPeak() as rss:
        step()
    return rss.growth


class SavedForBackward:
    """Bytes of the distinct storages autograd saves for backward inside the block (exact, noise-free).

    A ``saved_tensors_hooks`` pack hook sees every tensor a forward saves; storages are counted once,
    so views of one buffer and frozen weights saved by many ops are not double-counted. Parameters
    (frozen or not) are left out: they exist whether or not a step runs.
    """

    def __init__(self, model: nn.Module) -> None:
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameter_storages:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedForBackward:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


# ------------------------------------------------------------------------------------------- report


def paired_ratios(values: list[float], base: list[float]) -> list[float]:
    """Per-trial ratios: the variant's time over lora's time in the same round-robin trial."""
    return [v / b for v, b in zip(values, base, strict=True)]


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def clocks_of(device: torch.device) -> tuple[str, ...]:
    """The clocks reported, the judged one first.

    On a CPU with one torch thread, the process CPU time of a step is its cost without the time slices
    other processes take from it (the machine is shared), so the verdict uses it; the wall clock is shown
    beside it. With more threads CPU time adds up the threads, and on CUDA it is no measure of the step:
    the verdict then uses the wall clock.
    """
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return ("cpu", "wall")
    return ("wall", "cpu") if device.type == "cpu" else ("wall",)


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def print_table(variants: list[Variant], target: float, clocks: tuple[str, ...]) -> None:
    """One markdown row per variant; ratios are to the first variant (lora), paired per trial."""
    base = variants[0]
    judged = f"train {clocks[0]}"
    header = ["variant", "trainable params"]
    for kind in ("train", "infer"):
        header.append(f"{kind} s ({' / '.join(clocks)})")
        header += [f"{kind} x lora, {clock}" for clock in clocks]
    header += ["step memory MiB", "saved MiB"]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for v in variants:
        cells = [v.name, f"{sum(p.numel() for p in v.trainable()):,}"]
        for kind in ("train", "infer"):
            cells.append(" / ".join(f"{statistics.median(v.times[f'{kind} {c}']):.4g}" for c in clocks))
            for clock in clocks:
                key = f"{kind} {clock}"
                ratios = paired_ratios(v.times[key], base.times[key])
                flag = " (!)" if key == judged and statistics.median(ratios) > target else ""
                cells.append(_median_range(ratios) + flag)
        cells += [f"{v.step_bytes / MIB:.0f}", f"{v.saved_bytes / MIB:.0f}"]
        print("| " + " | ".join(cells) + " |")
    print(
        f"s = median seconds per step; x lora = each trial's variant time / lora's time in the same trial: "
        f"median [min-max] over the trials; (!) = median {judged} ratio above the target {target:.2f}"
    )


def print_verdict(variants: list[Variant], target: float, device: torch.device, clock: str) -> None:
    """PASS when every PLoRA variant's median paired training ratio (on ``clock``) is at most the target."""
    base = variants[0]
    key = f"train {clock}"
    ratios = {v.name: statistics.median(paired_ratios(v.times[key], base.times[key])) for v in variants[1:]}
    if not ratios:
        return
    worst = max(ratios, key=ratios.get)
    over = {name: r for name, r in ratios.items() if r > target}
    what = f"median paired {clock}-time train-step ratio to lora r={RANK}"
    kind = "CUDA" if device.type == "cuda" else "CPU"
    if over:
        listed = ", ".join(f"{name} {r:.3f}" for name, r in sorted(over.items(), key=lambda kv: -kv[1]))
        print(
            f"MISS: {len(over)} of {len(ratios)} PLoRA variants above the {kind} target {target:.2f} ({what}): {listed}"
        )
    else:
        print(
            f"PASS: all {len(ratios)} PLoRA variants at most the {kind} target {target:.2f} ({what}); "
            f"the largest is {worst} {ratios[worst]:.3f}"
        )


# ------------------------------------------------------------------------------------------ profile


def _aten_calls(ops: dict[str, list[float]]) -> float:
    """Calls of aten operators (nested ones included): a proxy for per-op dispatch and kernel-launch cost."""
    return sum(calls for key, (_, calls) in ops.items() if key.startswith("aten::"))


def profile_ops(variants: list[Variant], batch: Batch, device: torch.device, top: int, steps: int) -> None:
    """Self time per aten op in a training step, each PLoRA variant against lora: where the extra goes.

    Each variant is profiled for ``steps`` single steps, round-robin like the timing, and the per-op
    totals are averaged over its steps (one profiled step under a noisy load is not worth much).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    totals: dict[str, dict[str, list[float]]] = {v.name: {} for v in variants}  # variant -> op -> [ms, calls]
    for _ in range(steps):
        for v in variants:
            with profile(activities=activities) as prof:
                v.train_step(batch)
                synchronize(device)
            for event in prof.key_averages():
                entry = totals[v.name].setdefault(event.key, [0.0, 0.0])
                entry[0] += getattr(event, attr) / 1e3 / steps
                entry[1] += event.count / steps

    where = "device" if device.type == "cuda" else "CPU"
    base = totals[variants[0].name]
    base_sum = sum(ms for ms, _ in base.values())
    print(f"\n## Profile: self {where} ms per op and training step (mean of {steps} profiled steps each)")
    base_calls = _aten_calls(base)
    print(f"lora: {base_sum:.0f} ms over all ops, {base_calls:.0f} aten op calls")
    for v in variants[1:]:
        ops = totals[v.name]
        total = sum(ms for ms, _ in ops.values())
        diff = {k: ops.get(k, [0.0, 0])[0] - base.get(k, [0.0, 0])[0] for k in set(ops) | set(base)}
        calls = _aten_calls(ops)
        print(
            f"\n{v.name}: {total:.0f} ms over all ops ({total - base_sum:+.0f} ms vs lora), {calls:.0f} aten op "
            f"calls ({calls - base_calls:+.0f}); largest differences:"
        )
        print("| op | lora ms | variant ms | diff ms | lora calls | variant calls |")
        print("|---|---:|---:|---:|---:|---:|")
        for key in sorted(diff, key=lambda k: -abs(diff[k]))[:top]:
            b_ms, b_calls = base.get(key, [0.0, 0])
            v_ms, v_calls = ops.get(key, [0.0, 0])
            print(f"| {key} | {b_ms:.1f} | {v_ms:.1f} | {diff[key]:+.1f} | {b_calls:.0f} | {v_calls:.0f} |")


class GroupedGatesExperiment(nn.Module):
    """EXPERIMENT, not the library's code: the G per-layer gates of a model as ONE batched pass.

    Same math as G :class:`PLoRAGate` calls (LayerNorm -> Linear -> ReLU -> Dropout -> Linear ->
    softmax(beta / tp)), with the G gates' parameters stacked on a leading axis, so a forward + backward
    is about 20 operator calls whatever G is, instead of about 20 per gate. Built from copies of the
    model's gate parameters (their values, not the same tensors). Shapes: crm_state [B, d_c] -> [G, B, N].
    """

    def __init__(self, gates: list[PLoRAGate]) -> None:
        super().__init__()
        first = gates[0]
        self.temperature = first.temperature
        self.dropout_p = first.dropout.p
        self.eps = first.norm.eps
        self.crm_dim = first.norm.normalized_shape[0]

        def stack(get: Callable[[PLoRAGate], torch.Tensor]) -> nn.Parameter:
            return nn.Parameter(torch.stack([get(g).detach().clone() for g in gates]))

        self.norm_weight = stack(lambda g: g.norm.weight)  # [G, d_c]
        self.norm_bias = stack(lambda g: g.norm.bias)  # [G, d_c]
        self.w_in = stack(lambda g: g.proj_in.weight)  # [G, d_h, d_c]
        self.b_in = stack(lambda g: g.proj_in.bias)  # [G, d_h]
        self.w_out = stack(lambda g: g.proj_out.weight)  # [G, N, d_h]
        self.b_out = stack(lambda g: g.proj_out.bias)  # [G, N]

    def forward(self, crm_state: torch.Tensor) -> torch.Tensor:
        # the normalisation itself is the same for every gate; only its affine part differs
        normed = F.layer_norm(crm_state.detach(), (self.crm_dim,), eps=self.eps)  # [B, d_c]
        normed = torch.addcmul(
            self.norm_bias[:, None], normed[None], self.norm_weight[:, None]
        )  # [G, B, d_c]
        hidden = torch.baddbmm(self.b_in[:, None], normed, self.w_in.transpose(1, 2)).relu()  # [G, B, d_h]
        hidden = F.dropout(hidden, self.dropout_p, self.training)
        beta = torch.baddbmm(self.b_out[:, None], hidden, self.w_out.transpose(1, 2))  # [G, B, N]
        return torch.softmax(beta / self.temperature, dim=-1)


def check_grouped_gates(
    grouped: GroupedGatesExperiment, gates: list[PLoRAGate], crm_state: torch.Tensor
) -> None:
    """The experiment must compute what the gates compute (checked in eval mode, dropout off)."""
    modes = [g.training for g in gates], grouped.training
    for module in (*gates, grouped):
        module.eval()
    with torch.no_grad():
        expected = torch.stack([g(crm_state) for g in gates])
        got = grouped(crm_state)
    for g, mode in zip(gates, modes[0], strict=True):
        g.train(mode)
    grouped.train(modes[1])
    torch.testing.assert_close(got, expected)


def _adapted_layers(model: nn.Module) -> list[nn.Module]:
    """The PLoRA layers, or peft's LoRA layers, of ``model`` in module order."""
    return [
        m
        for m in model.modules()
        if isinstance(m, PLoRALinear) or (hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    ]


def component_times(variants: list[Variant], batch: Batch, device: torch.device, repeats: int) -> None:
    """Adapter path alone (no base GEMM) and gates alone, fwd + bwd at the model's real shapes, all layers.

    Calls the variant's own modules: ``lora_B(lora_A(x)) * scaling`` for peft, ``PLoRALinear._mix_*`` times
    its scale for PLoRA (with its real gate's weights, detached), and every gate of the model on the CRM
    state. The frozen base projections of the same layers (forward + input gradient) are the reference.
    Variants run round-robin, ``repeats`` times, medians.
    """
    size, seq = batch.input_ids.shape
    adapter_dtype = next(iter(variants[0].trainable())).dtype
    inputs: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # one input per width and dtype, made once

    def input_for(layer: nn.Module, dtype: torch.dtype = adapter_dtype) -> torch.Tensor:
        key = (layer.in_features, dtype)
        if key not in inputs:
            inputs[key] = torch.randn(size, seq, layer.in_features, device=device, dtype=dtype)
        x = inputs[key].requires_grad_(True)
        x.grad = None
        return x

    def base_pass(layers: list[nn.Module]) -> None:
        for layer in layers:  # the frozen projection in its own dtype (bf16 under --dtype bfloat16)
            layer.base_layer(input_for(layer, layer.base_layer.weight.dtype)).sum().backward()

    def adapter_pass(v: Variant, layers: list[nn.Module]) -> None:
        for layer in layers:
            x = input_for(layer)
            if isinstance(layer, PLoRALinear):
                alpha = layer.plora_gate(batch.crm_state).detach()
                mix = layer._mix_products if layer.mixing == "products" else layer._mix_factors
                out = mix(x, alpha) * layer.scale
            else:
                out = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
            out.sum().backward()

    def gate_pass(v: Variant) -> None:
        gates = [m for m in v.model.modules() if isinstance(m, PLoRAGate)]
        if gates:
            torch.stack([g(batch.crm_state).sum() for g in gates]).sum().backward()

    def grouped_gate_pass(grouped: GroupedGatesExperiment, crm_state: torch.Tensor) -> None:
        grouped(crm_state).sum().backward()

    runs: dict[str, Callable[[], None]] = {
        "base q,v projections": lambda: base_pass(_adapted_layers(variants[0].model))
    }
    for v in variants:
        runs[f"{v.name} adapter deltas"] = lambda v=v: adapter_pass(v, _adapted_layers(v.model))
        if v.routed_plora:
            runs[f"{v.name} gates"] = lambda v=v: gate_pass(v)
            gates = [m for m in v.model.modules() if isinstance(m, PLoRAGate)]
            grouped = GroupedGatesExperiment(gates).train(v.model.training)
            check_grouped_gates(grouped, gates, batch.crm_state)
            runs[f"{v.name} gates, grouped (EXPERIMENT)"] = lambda g=grouped: grouped_gate_pass(
                g, batch.crm_state
            )
    times: dict[str, list[float]] = {name: [] for name in runs}
    clock = 1 if clocks_of(device)[0] == "cpu" else 0  # index into timed()'s (wall, cpu)
    for run in runs.values():  # warm-up
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run, device)[clock])
    for v in variants:
        v.optimizer.zero_grad(set_to_none=True)
    layers = len(_adapted_layers(variants[0].model))
    print(
        f"\n## Components: forward + backward ms per training step over all {layers} adapted projections "
        f"(median of {repeats}, {clocks_of(device)[0]} time)"
    )
    print("| component | ms |")
    print("|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.1f} |")


# ------------------------------------------------------------------------------------------- stage 2

STAGE2_CONFIG = "launch/configs/plora_quickstart.yaml"
STAGE2_DS_CONFIG = "ds_configs/zero2_fp32.json"  # the quickstart's
STAGE2_RANKS = 2  # the default of --ranks (the quickstart runs 2 ranks on the 2 cores)
PROBE_SHAPE = (1024, 576, 1536)  # M, K, N: a SmolLM2 MLP projection of 1024 tokens
# (name, overrides): one speed-up switched on at a time, then all of them, then LoRA with all of them
# (the fp32 adapter math and sdpa attention of the first five are the settings before the last speed-ups)
_OLD = ("adapter.compute_dtype=params", "attn_implementation=sdpa", "train_attn_implementation=sdpa")
_ALL = ("dtype=auto", "length_group_size=8", "eval_batch_size=32")
_SDPA = ("attn_implementation=sdpa", "train_attn_implementation=sdpa")
_TRAIN_EAGER = ("attn_implementation=sdpa", "train_attn_implementation=eager")  # what auto picks on a CPU
_BF16_GROUPED = ("dtype=auto", "length_group_size=8", "adapter.compute_dtype=activations")
_EAGER_SMALL_EVAL = (*_BF16_GROUPED, "attn_implementation=eager", "train_attn_implementation=eager")
_FUSED_DOT = ("attn_implementation=eager_fused", "cpu_attention_form=dot")  # "+attnmm": form matmul
_FUSED_SMALL_EVAL = (*_BF16_GROUPED, *_FUSED_DOT, "train_attn_implementation=eager_fused")
_MICRO4_NORM = (*_FUSED_SMALL_EVAL, "eval_batch_size=4", "micro_batch_size=4", "norm_implementation=fused")
STAGE2_VARIANTS: list[tuple[str, tuple[str, ...]]] = [
    ("fp32", ("dtype=float32", "length_group_size=0", "eval_batch_size=8", *_OLD)),
    ("bf16", ("dtype=auto", "length_group_size=0", "eval_batch_size=8", *_OLD)),
    ("bf16+group", ("dtype=auto", "length_group_size=8", "eval_batch_size=8", *_OLD)),
    ("bf16+group+eval32", (*_ALL, *_OLD)),
    ("lora bf16+group+eval32", ("mode=lora", *_ALL, *_OLD)),
    ("bf16+group+eval32+adapter16", (*_ALL, "adapter.compute_dtype=activations", *_SDPA)),
    ("bf16+group+eval32+adapter16+train_eager", (*_ALL, "adapter.compute_dtype=activations", *_TRAIN_EAGER)),
    ("lora bf16+group+eval32+train_eager", ("mode=lora", *_ALL, *_TRAIN_EAGER)),
    (
        "bf16+group+eval32+adapter16+train_eager+micro4",
        (*_ALL, "adapter.compute_dtype=activations", *_TRAIN_EAGER, "micro_batch_size=4"),
    ),
    # scoring with eager attention in batches of 8 or 4 instead of sdpa in batches of 32 (the quickstart's)
    ("bf16+group+adapter16+eager+eval8", (*_EAGER_SMALL_EVAL, "eval_batch_size=8")),
    ("bf16+group+adapter16+eager+eval4", (*_EAGER_SMALL_EVAL, "eval_batch_size=4")),
    ("lora bf16+group+eager+eval4", ("mode=lora", *_EAGER_SMALL_EVAL, "eval_batch_size=4")),
    # micro-batches of 4 without accumulation: one ZeRO-2 gradient reduction per 4 samples instead of per 2
    (
        "bf16+group+adapter16+eager+eval4+micro4",
        (*_EAGER_SMALL_EVAL, "eval_batch_size=4", "micro_batch_size=4"),
    ),
    (
        "lora bf16+group+eager+eval4+micro4",
        ("mode=lora", *_EAGER_SMALL_EVAL, "eval_batch_size=4", "micro_batch_size=4"),
    ),
    # eager_fused attention (the C++ kernel: no [B, H, T, T] tensor, the causal future skipped): for scoring
    # alone (the same training as the variant without "+fused"), then for training too (the quickstart's)
    (
        "bf16+group+adapter16+eager+eval4+fused",
        (*_EAGER_SMALL_EVAL, "eval_batch_size=4", *_FUSED_DOT),
    ),
    (
        "lora bf16+group+eager+eval4+fused",
        ("mode=lora", *_EAGER_SMALL_EVAL, "eval_batch_size=4", *_FUSED_DOT),
    ),
    ("bf16+group+adapter16+fused+eval4", (*_FUSED_SMALL_EVAL, "eval_batch_size=4")),
    ("lora bf16+group+fused+eval4", ("mode=lora", *_FUSED_SMALL_EVAL, "eval_batch_size=4")),
    # eager_fused in micro-batches of 4 without accumulation (no [B, H, T, T] tensor to grow with the batch)
    (
        "bf16+group+adapter16+fused+eval4+micro4",
        (*_FUSED_SMALL_EVAL, "eval_batch_size=4", "micro_batch_size=4"),
    ),
    (
        "lora bf16+group+fused+eval4+micro4",
        ("mode=lora", *_FUSED_SMALL_EVAL, "eval_batch_size=4", "micro_batch_size=4"),
    ),
    # and the backbone's RMSNorm as one op (norm_implementation=fused: the C++ kernel, forward and backward)
    (
        "bf16+group+adapter16+fused+eval4+micro4+norm",
        (*_FUSED_SMALL_EVAL, "eval_batch_size=4", "micro_batch_size=4", "norm_implementation=fused"),
    ),
    (
        "lora bf16+group+fused+eval4+micro4+norm",
        (
            "mode=lora",
            *_FUSED_SMALL_EVAL,
            "eval_batch_size=4",
            "micro_batch_size=4",
            "norm_implementation=fused",
        ),
    ),
    # and the shipped ZeRO-2 config's reduction bucket of 5e6 gradients instead of 5e7: DeepSpeed allocates
    # two bucket buffers per micro-step; 20 MB ones are reused from the heap, 200 MB ones are mapped afresh
    # (page faults on every first write), and the whole adapter's reduction waits for the end of the backward
    (
        "bf16+group+adapter16+fused+eval4+micro4+norm+bucket",
        (*_MICRO4_NORM, f"deepspeed_config={STAGE2_DS_CONFIG}"),
    ),
    (
        "lora bf16+group+fused+eval4+micro4+norm+bucket",
        ("mode=lora", *_MICRO4_NORM, f"deepspeed_config={STAGE2_DS_CONFIG}"),
    ),
    # and ZeRO-2's gradient sums through DeepSpeed's shared-memory kernel instead of gloo's TCP
    (
        "bf16+group+adapter16+fused+eval4+micro4+norm+bucket+shm",
        (*_MICRO4_NORM, f"deepspeed_config={STAGE2_DS_CONFIG}", "cpu_allreduce=shm"),
    ),
    (
        "lora bf16+group+fused+eval4+micro4+norm+bucket+shm",
        ("mode=lora", *_MICRO4_NORM, f"deepspeed_config={STAGE2_DS_CONFIG}", "cpu_allreduce=shm"),
    ),
    # and each rank's malloc preloaded (reclora_ds.malloc_preload) instead of glibc's: mimalloc (the pip
    # wheel, what plora.cpu_allocator=auto takes) or jemalloc (the system's libjemalloc, where installed)
    *(
        (
            f"{mode}bf16+group+{adapter}fused+eval4+micro4+norm+bucket+shm+{malloc}",
            (
                *lora,
                *_MICRO4_NORM,
                f"deepspeed_config={STAGE2_DS_CONFIG}",
                "cpu_allreduce=shm",
                f"cpu_allocator={malloc}",
            ),
        )
        for malloc in ("mimalloc", "jemalloc")
        for mode, adapter, lora in (("", "adapter16+", ()), ("lora ", "", ("mode=lora",)))
    ),
    # and the attention kernel's products as bf16 matrix multiplications (oneDNN: AMX tiles where the CPU
    # has them) instead of AVX512-BF16 dot products (plora.cpu_attention_form=matmul; auto takes it on AMX)
    *(
        (
            f"{mode}bf16+group+{adapter}fused+eval4+micro4+norm+bucket+shm+mimalloc+attnmm",
            (
                *lora,
                *_MICRO4_NORM,
                f"deepspeed_config={STAGE2_DS_CONFIG}",
                "cpu_allreduce=shm",
                "cpu_allocator=mimalloc",
                "cpu_attention_form=matmul",
            ),
        )
        for mode, adapter, lora in (("", "adapter16+", ()), ("lora ", "", ("mode=lora",)))
    ),
]
STAGE2_QUICK = (
    "bf16+group+eval32+adapter16",
    "bf16+group+eval32+adapter16+train_eager",
    "lora bf16+group+eval32+train_eager",
)


def matmul_gflops(dtype: torch.dtype, threads: int, repeats: int = 20) -> float:
    """Best GFLOP/s of a [M, K] @ [K, N] matmul (PROBE_SHAPE) in ``dtype`` on ``threads`` threads."""
    m, k, n = PROBE_SHAPE
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        for _ in range(3):
            a @ b
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return 2 * m * k * n / best / 1e9


BASELINE_REDUCE_BUCKET = 50_000_000  # the shipped ZeRO-2 configs' reduce_bucket_size until they took 5e6


def baseline_ds_config(folder: Path) -> Path:
    """Where the variants' DeepSpeed config lies in the bench's ``folder``: the quickstart's with the baseline
    reduction bucket (``+bucket`` variants run the shipped config itself)."""
    return folder / f"zero2_fp32_bucket{BASELINE_REDUCE_BUCKET}.json"


def write_baseline_ds_config(folder: Path) -> None:
    config = json.loads(find_ds_config(STAGE2_DS_CONFIG).read_text())
    config["zero_optimization"]["reduce_bucket_size"] = BASELINE_REDUCE_BUCKET
    baseline_ds_config(folder).write_text(json.dumps(config, indent=2))


def stage2_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    runs = Path(args.runs)
    steps, eval_n = (2, 32) if args.quick else (args.steps, args.eval_samples)
    return [
        f"data_dir={runs / 'prepare'}", f"retrieval_dir={runs / 'retrieval'}", f"crm_path={runs / 'sim'}",
        f"backbone={args.backbone}", f"output_dir={out}", f"max_steps={steps}", "batch_size=8",
        "micro_batch_size=2", f"eval_max_samples={eval_n}", "eval_splits=[test]", "checkpoint_every=0",
        "log_every=1", "progress=false", "resume=false",
        f"deepspeed_config={baseline_ds_config(out.parent)}",  # "+bucket" variants: the shipped one
        "norm_implementation=transformers",  # the variants' baseline; "+norm" ones fuse the norms
        "cpu_allreduce=gloo",  # the variants' baseline; "+shm" ones sum in shared memory
        "cpu_allocator=system",  # the variants' baseline; "+mimalloc" / "+jemalloc" ones preload theirs
    ]  # fmt: skip


def stage2_worker(overrides: list[str]) -> None:
    """One rank of one variant: the stage-2 recipe as ``launch/train_plora.py`` runs it."""
    from reclora_ds.config import load_config
    from reclora_ds.malloc_preload import declare_process_entry, ensure_allocator
    from reclora_ds.training.plora_config import PLoRATrainConfig

    cfg = load_config(PLoRATrainConfig, STAGE2_CONFIG, overrides, "plora")
    declare_process_entry()  # a rank started by the deepspeed launcher on this file
    ensure_allocator(cfg.cpu_allocator, "plora.cpu_allocator")  # may run this rank again, preloaded
    from reclora_ds.training.plora_recipe import run_plora_training

    run_plora_training(cfg)


def run_stage2_variant(args: argparse.Namespace, name: str, extra: tuple[str, ...], root: Path) -> dict:
    import subprocess
    import sys

    from reclora_ds.distributed import free_port

    out = root / name.replace(" ", "_").replace("+", "_")
    launcher = str(Path(sys.executable).parent / "deepspeed")
    command = [
        launcher, "--num_gpus", str(args.ranks), "--master_port", str(free_port()), __file__,
        "--stage2-worker", *stage2_overrides(args, out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{(run.stdout + run.stderr)[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["launch_s"] = time.perf_counter() - started
    metrics["dtype"] = json.loads((out / "adapter" / "rec_llm.json").read_text())["load"]["dtype"]
    metrics["config"] = yaml.safe_load((out / "config.yaml").read_text())["plora"]
    import pyarrow.parquet as pq

    from reclora_ds.training.plora_recipe import PREDICTIONS_FILE

    predictions = pq.read_table(out / PREDICTIONS_FILE.format(split="test")).to_pydict()
    metrics["test_predictions"] = {
        i: (label, p)
        for i, label, p in zip(predictions["sample_id"], predictions["label"], predictions["p"], strict=True)
    }
    return metrics


def print_prediction_agreement(results: dict[str, dict]) -> None:
    """For each ``...+fused`` variant run beside its base (the same seed and samples; the attention differs):
    how far its p(yes) of the same test ids are from the base's, both AUCs and their paired DeLong test."""
    from reclora_ds.metrics import delong_paired_test

    for name, fused in results.items():
        base = results.get(name.removesuffix("+fused")) if name.endswith("+fused") else None
        if base is None:
            continue
        ids = sorted(base["test_predictions"])
        if sorted(fused["test_predictions"]) != ids:
            print(f"{name}: scored other test ids than its base; no comparison")
            continue
        labels = np.array([base["test_predictions"][i][0] for i in ids])
        a = np.array([base["test_predictions"][i][1] for i in ids])
        b = np.array([fused["test_predictions"][i][1] for i in ids])
        test = delong_paired_test(labels, a, b)
        print(
            f"{name} against {name.removesuffix('+fused')}, the same {test.n} test ids: p(yes) max |diff| "
            f"{np.abs(a - b).max():.4f}, mean |diff| {np.abs(a - b).mean():.4f} (spread of p: sd {a.std():.4f}), "
            f"Pearson r {np.corrcoef(a, b)[0, 1]:.5f}; AUC {test.auc_a:.4f} / {test.auc_b:.4f}, "
            f"paired DeLong p {test.p_value:.2g}"
        )


def print_products_alone(results: dict[str, dict], shape: BackboneProducts, probe: dict) -> None:
    """Each variant against the backbone's matrix products alone (``gemm_replay.py``), replayed at the
    variant's micro-batch and evaluation batch and its mean padded prompt length, one thread, after the
    variants' runs: ``x products`` is how much more than its products a sample costs, ``products x floor``
    how far the products themselves run from the floor."""
    replays: dict[tuple, float] = {}

    def replay(dtype: str, batch: int, tokens: int, train: bool) -> float:
        key = (dtype, batch, tokens, train)
        if key not in replays:
            seconds = replay_seconds(shape, batch, tokens, train=train, dtype=DTYPES[dtype])
            replays[key] = seconds / batch
        return replays[key]

    print(
        "\nthe backbone's matrix products alone (benchmarks/gemm_replay.py: the frozen layers' GEMMs and the "
        "attention's products of one micro-batch, B prompts x T padded tokens, nothing between them, one thread; "
        "no adapter products), per sample:"
    )
    print(
        "| variant | train B x T | train products s/sample | train x products | products x floor | "
        "infer B x T | infer products s/sample | infer x products | products x floor |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for name, metrics in results.items():
        dtype, perf = metrics["dtype"], metrics["perf"]
        if dtype not in ("float32", "bfloat16"):
            continue
        gflops = probe[(dtype, 1)] * 1e9
        cells = []
        for prefix, batch_key, train in (
            ("train", "micro_batch_size", True),
            ("eval_test", "eval_batch_size", False),
        ):
            real = perf[f"{prefix}_tokens_per_sample"]
            padded = round(real / (1 - perf[f"{prefix}_padding_fraction"]))
            batch = metrics["config"][batch_key]
            alone = replay(dtype, batch, padded, train)
            measured = perf["train_s_per_sample" if train else "eval_s_per_sample_test"]
            floor = shape.floor_flops(real, train) / gflops
            cells += [
                f"{batch} x {padded}",
                f"{alone:.3f}",
                f"{measured / alone:.2f}",
                f"{alone / floor:.2f}",
            ]
        print(f"| {name} | " + " | ".join(cells) + " |")


def stage2_main(args: argparse.Namespace) -> None:
    import tempfile

    started = time.perf_counter()
    names = args.variants or (STAGE2_QUICK if args.quick else tuple(n for n, _ in STAGE2_VARIANTS))
    print(
        f"# bench_plora --stage2: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.ranks} DeepSpeed rank(s) x 1 thread, quickstart assets {args.runs}, backbone {args.backbone}"
    )
    print(f"load average before: {loadavg()}")
    m, k, n = PROBE_SHAPE
    probe = {
        (dtype, threads): matmul_gflops(DTYPES[dtype], threads)
        for dtype in ("float32", "bfloat16")
        for threads in (1, os.cpu_count() or 1)
    }
    print(
        f"matmul probe [{m} x {k}] @ [{k} x {n}], best of 20, GFLOP/s: "
        + ", ".join(f"{dtype} {threads} thread(s) {g:.0f}" for (dtype, threads), g in probe.items())
    )
    shape = BackboneProducts.of(args.backbone)
    print(
        f"backbone: {shape.decoder_weights:,} decoder weights (non-embedding), {shape.layers} layers, attention "
        f"width {shape.heads * shape.head_dim}; floor FLOPs per sample = 4 P T + 8 n T^2 d (train), "
        "2 P T + 4 n T^2 d (inference)"
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_stage2_") as tmp:
        write_baseline_ds_config(Path(tmp))
        for name, extra in STAGE2_VARIANTS:
            if name in names:
                results[name] = run_stage2_variant(args, name, extra, Path(tmp))
                perf = results[name]["perf"]
                print(
                    f"{name}: train {perf['train_s_per_sample']:.3f} s/sample per rank, eval "
                    f"{perf['eval_s_per_sample_test']:.3f}; launch {results[name]['launch_s']:.0f} s; "
                    f"load {loadavg()}",
                    flush=True,
                )
    print(f"\nload average after: {loadavg()}\n")
    print(
        "| variant | weights | train s/sample (rank / job) | train tokens/sample | train padding | train floor "
        "s/sample (rank) | train x floor | infer s/sample (rank / job) | infer tokens/sample | infer padding | "
        "infer floor s/sample (rank) | infer x floor | train loss (first / last) | test AUC (n) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name, metrics in results.items():
        perf = metrics["perf"]
        gflops = probe[(metrics["dtype"], 1)] if metrics["dtype"] in ("float32", "bfloat16") else math.nan
        train_tokens, infer_tokens = perf["train_tokens_per_sample"], perf["eval_test_tokens_per_sample"]
        train_floor = shape.floor_flops(train_tokens, True) / (gflops * 1e9)
        infer_floor = shape.floor_flops(infer_tokens, False) / (gflops * 1e9)
        train_s, infer_s = perf["train_s_per_sample"], perf["eval_s_per_sample_test"]
        losses = [loss for _, loss in metrics["train_loss"]]
        print(
            f"| {name} | {metrics['dtype']} | {train_s:.3f} / {train_s / args.ranks:.3f} | "
            f"{train_tokens:.0f} | "
            f"{perf['train_padding_fraction']:.3f} | {train_floor:.3f} | {train_s / train_floor:.1f} | "
            f"{infer_s:.3f} / {infer_s / args.ranks:.3f} | {infer_tokens:.0f} | "
            f"{perf['eval_test_padding_fraction']:.3f} | {infer_floor:.3f} | {infer_s / infer_floor:.1f} | "
            f"{losses[0]:.4f} / {losses[-1]:.4f} | {metrics['test']['auc']:.4f} ({metrics['test']['n']}) |"
        )
    print(
        "\nrank = one rank's seconds per sample of its own samples (metrics.json perf); job = rank / "
        f"{args.ranks} rank(s); floor = FLOPs per sample / the 1-thread probe of the variant's weight dtype"
    )
    print_products_alone(results, shape, probe)
    print("\nwhere a training sample's time goes (rank seconds per sample; the recipe's perf, TRAIN_PHASES):")
    print("| variant | data | forward | backward | optimizer | sum / train s/sample |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, metrics in results.items():
        perf = metrics["perf"]
        parts = [perf.get(f"train_{phase}_s_per_sample", math.nan) for phase in TRAIN_PHASES]
        print(
            f"| {name} | "
            + " | ".join(f"{t:.3f}" for t in parts)
            + f" | {sum(parts) / perf['train_s_per_sample']:.3f} |"
        )
    for plora_name, lora_name in (
        ("bf16+group+eval32", "lora bf16+group+eval32"),
        ("bf16+group+eval32+adapter16+train_eager", "lora bf16+group+eval32+train_eager"),
        ("bf16+group+adapter16+eager+eval4", "lora bf16+group+eager+eval4"),
        ("bf16+group+adapter16+fused+eval4", "lora bf16+group+fused+eval4"),
        ("bf16+group+adapter16+fused+eval4+micro4", "lora bf16+group+fused+eval4+micro4"),
        ("bf16+group+adapter16+fused+eval4+micro4+norm", "lora bf16+group+fused+eval4+micro4+norm"),
        (
            "bf16+group+adapter16+fused+eval4+micro4+norm+bucket",
            "lora bf16+group+fused+eval4+micro4+norm+bucket",
        ),
        (
            "bf16+group+adapter16+fused+eval4+micro4+norm+bucket+shm",
            "lora bf16+group+fused+eval4+micro4+norm+bucket+shm",
        ),
        *(
            (
                f"bf16+group+adapter16+fused+eval4+micro4+norm+bucket+shm+{malloc}",
                f"lora bf16+group+fused+eval4+micro4+norm+bucket+shm+{malloc}",
            )
            for malloc in ("mimalloc", "jemalloc")
        ),
        (
            "bf16+group+adapter16+fused+eval4+micro4+norm+bucket+shm+mimalloc+attnmm",
            "lora bf16+group+fused+eval4+micro4+norm+bucket+shm+mimalloc+attnmm",
        ),
    ):
        plora, lora = results.get(plora_name), results.get(lora_name)
        if plora and lora:
            ratio = plora["perf"]["train_s_per_sample"] / lora["perf"]["train_s_per_sample"]
            print(
                f"PLoRA / LoRA training s/sample ({plora_name} / {lora_name}): {ratio:.3f} (target <= 1.10)"
            )
    print_prediction_agreement(results)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


# --------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="default", help="backbone folder or 'default' (SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama, small batch: smoke run")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="sequences per batch (default 4, stage 2's CPU micro batch; --tiny 2)",
    )
    parser.add_argument(
        "--seq", type=int, default=None, help="tokens per padded prompt (default 256; --tiny 32)"
    )
    parser.add_argument(
        "--trials", type=int, default=None, help="round-robin trials (default 4; --tiny 3; 0: only --profile)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed train + infer steps per variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--attn-implementation",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="the backbone's attention for every step (stage 2's CPU training steps use eager)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1, as each of stage 2's CPU ranks runs; 0: torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=variant_names()[1:],
        help="PLoRA variants (lora always runs)",
    )
    parser.add_argument("--profile", action="store_true", help="per-op and per-component breakdown after")
    parser.add_argument("--profile-top", type=int, default=12, help="ops shown per variant")
    parser.add_argument("--profile-steps", type=int, default=2, help="profiled training steps per variant")
    parser.add_argument("--profile-repeats", type=int, default=5, help="repeats of each component timing")
    parser.add_argument("--stage2", action="store_true", help="the real stage-2 path, 2 DeepSpeed ranks")
    parser.add_argument(
        "--runs", default="runs/quickstart", help="--stage2: run folder with prepare/ retrieval/ sim/"
    )
    parser.add_argument(
        "--quick", action="store_true", help="--stage2: STAGE2_QUICK variants only, 2 steps, 32 test ids"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[n for n, _ in STAGE2_VARIANTS],
        help="--stage2: these variants only (with --steps / --eval-samples; the table keeps its order)",
    )
    parser.add_argument(
        "--ranks",
        type=int,
        default=STAGE2_RANKS,
        choices=(1, 2, 4),
        help="--stage2: DeepSpeed ranks of one thread each (the batch of 8 = 2 per micro-batch x ranks x "
        "accumulation); 1 shows a rank's step without a second rank to wait for",
    )
    parser.add_argument("--steps", type=int, default=8, help="--stage2: optimizer steps (8 samples each)")
    parser.add_argument("--eval-samples", type=int, default=128, help="--stage2: uniform test ids scored")
    args = parser.parse_args()
    if args.stage2:
        runs = Path(args.runs)
        missing = [d for d in ("prepare", "retrieval", "sim") if not (runs / d).is_dir()]
        if missing:
            parser.error(f"--runs {runs}: missing {missing} (run the quickstart pipeline first)")
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (32 if args.tiny else 256)
    args.trials = args.trials if args.trials is not None else (3 if args.tiny else 4)
    if args.seq <= ANSWER_TOKENS + 1:
        parser.error(f"--seq must be above {ANSWER_TOKENS + 1}")
    return args


def main() -> None:
    import sys

    if "--stage2-worker" in sys.argv:  # a rank started by run_stage2_variant; the launcher adds --local_rank
        stage2_worker(
            [a for a in sys.argv[1:] if a != "--stage2-worker" and not a.startswith("--local_rank")]
        )
        return
    args = parse_args()
    if args.stage2:
        stage2_main(args)
        return
    started = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    target = TARGET_RATIO["cuda" if device.type == "cuda" else "cpu"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(
        f"# bench_plora: {where}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}, {args.dtype}, {args.attn_implementation} attention"
    )
    print(f"load average before: {loadavg()}")

    torch.manual_seed(args.seed)
    base = load_base(args, device)
    batch = make_batch(args.batch, args.seq, base.config.vocab_size, device, args.seed)
    default = [name for name in variant_names() if not name.endswith(FP32_MATH)]
    names = default if args.only is None else [BASELINE, *args.only]
    variants = build_variants(base, names)
    lengths = batch.attention_mask.sum(dim=1).tolist()
    print(
        f"model {'tiny random Llama' if args.tiny else args.backbone}: "
        f"{sum(p.numel() for p in base.parameters()):,} params, {base.config.num_hidden_layers} layers; "
        f"batch {args.batch} x {args.seq} tokens (prompt lengths {lengths}, left-padded), LM head on the "
        f"last {batch.keep}; variants: {', '.join(v.name for v in variants)}",
        flush=True,
    )

    for v in variants:  # warm-up, then one untimed training step that measures memory
        for _ in range(args.warmup):
            v.train_step(batch)
            v.infer_step(batch)
        with SavedForBackward(v.model) as saved:
            v.step_bytes = step_memory(lambda v=v: v.train_step(batch), device)
        v.saved_bytes = saved.total

    for trial in range(args.trials):
        start = trial % len(variants)
        for v in variants[start:] + variants[:start]:
            for kind, step in (("train", v.train_step), ("infer", v.infer_step)):
                wall, cpu = timed(lambda step=step: step(batch), device)
                v.times.setdefault(f"{kind} wall", []).append(wall)
                v.times.setdefault(f"{kind} cpu", []).append(cpu)
        times = ", ".join(
            f"{v.name} {v.times['train wall'][-1]:.3f}/{v.times['train cpu'][-1]:.3f}/"
            f"{v.times['infer wall'][-1]:.3f}/{v.times['infer cpu'][-1]:.3f}"
            for v in variants
        )
        print(
            f"trial {trial + 1}/{args.trials} (train wall/cpu, infer wall/cpu s): {times}; load {loadavg()}",
            flush=True,
        )

    print(f"\nload average after: {loadavg()}")
    if args.trials:
        memory = (
            "torch.cuda.max_memory_allocated during one training step - memory_allocated before it"
            if device.type == "cuda"
            else "peak RSS (sampled every 1 ms) during one training step - RSS before it (after malloc_trim)"
        )
        print(
            f"train = forward + backward + AdamW.step on the trainable params; infer = forward, no grad, "
            f"eval mode; {args.trials} round-robin trials; wall = time.perf_counter, cpu = process CPU time "
            f"(time.process_time).\nstep memory = {memory}; saved = bytes autograd "
            f"keeps for backward in one training step (distinct storages, parameters excluded); "
            f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
            f"(all variants together)\n"
        )
        clocks = clocks_of(device)
        print_table(variants, target, clocks)
        print()
        print_verdict(variants, target, device, clocks[0])
        if args.tiny:
            print(
                "(--tiny is a smoke run: on a 64-wide toy model the ratios measure per-operator overhead, "
                "not the setting of the target)"
            )

    if args.profile:
        profile_ops(variants, batch, device, args.profile_top, args.profile_steps)
        component_times(variants, batch, device, args.profile_repeats)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
