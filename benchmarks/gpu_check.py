"""GPU check of stage 2 (issue #16): what ``benchmarks/gpu_check.sh`` runs on a CUDA machine, in three parts.

    python benchmarks/gpu_check.py                       # CUDA: all parts at their GPU sizes
    python benchmarks/gpu_check.py --device cpu --tiny   # the same code on a CPU at toy size (tests)

Parts (each prints seconds per sample for training and for inference, and the peak memory):

``zero2``       a bf16 DeepSpeed ZeRO-2 stage-2 step over the process group (NCCL on CUDA, gloo on a CPU):
                :class:`reclora_ds.models.rec_llm.RecLLM` in mode ``plora`` (PLoRA N=4, r=8 on q/v) over a
                Llama built from its config with random weights, gated by a random SIM, engine from
                ``ds_configs/zero2_bf16.json`` resolved by the recipe's :func:`resolve_ds_config`
                (``zero2_fp32.json`` on a CPU without native bf16);
``int8``        the same RecLLM over a backbone loaded 8-bit by :func:`reclora_ds.llm_loader.load_causal_lm`
                (bitsandbytes), under a ZeRO-2 fp32-adapter engine; checks the int8 weights survive a step;
``throughput``  a Llama-7B-shaped model (hidden 4096, 32 layers, MLP 11008, vocab 32000: Vicuna-7B's
                config) with random bf16 weights (nothing is downloaded) and PLoRA N=4, r=8: training steps
                (forward, backward, AdamW on the adapter) and inference (``logits_to_keep=1``) at batch
                ``--batch`` of ``--seq``-token prompts.

Goals of the issue on one H100: <= 0.05 s/sample training and <= 0.01 s/sample inference for a 7B backbone.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from reclora_ds.batch import IGNORE_INDEX, AnswerTokens
from reclora_ds.models.crm import CRMConfig, FeatureSpec
from reclora_ds.models.plora import PLoRAConfig
from reclora_ds.models.rec_llm import RecLLM, RecLLMConfig
from reclora_ds.models.registry import build_crm

PARTS = ("zero2", "int8", "throughput")
CRM_HISTORY = 20
META = {  # the ID view of the random SIM: user, item, category (as an ML-25M-like dataset's metadata)
    "category_field": "genre",
    "fields": {
        "user_id": {"source": "user", "vocab_size": 1000},
        "item_id": {"source": "item", "vocab_size": 2000},
        "genre": {"source": "item", "vocab_size": 20},
    },
}
# Llama shapes, by name: (hidden, intermediate, layers, heads, kv heads, vocab)
SHAPES = {
    "tiny": (64, 128, 2, 4, 2, 512),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama-7b": (4096, 11008, 32, 32, 32, 32000),
}
ANSWER = (3, 4)  # token ids standing for "Yes" / "No" in the random vocabulary


@dataclass
class PartResult:
    part: str
    model: str
    dtype: str
    batch: int
    seq: int
    train_s_per_sample: float
    infer_s_per_sample: float
    peak_memory_gib: float
    note: str = ""

    def line(self) -> str:
        return (
            f"{self.part}: {self.model} {self.dtype}, batch {self.batch} x {self.seq} tokens: train "
            f"{self.train_s_per_sample:.4f} s/sample, inference {self.infer_s_per_sample:.4f} s/sample, peak "
            f"memory {self.peak_memory_gib:.2f} GiB{'; ' + self.note if self.note else ''}"
        )


def llama(shape: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A Llama of the named shape with seeded random weights, built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return model


def rec_llm(llm: nn.Module, device: torch.device) -> RecLLM:
    """RecLLM mode plora over ``llm``: PLoRA N=4, r=8 on q/v (float32 banks), gated by a random SIM."""
    spec = FeatureSpec.from_metadata(META)
    long_only = {"short_term_length": 0, "behaviour_age": False}  # the toy batch has no recent window or ages
    crm = build_crm(
        "sim", CRMConfig(embedding_dim=16, attention_hidden=32, tower=(64, 64), top_k=10, **long_only), spec
    )
    config = RecLLMConfig(adapter=PLoRAConfig(num_experts=4, rank=8, crm_dim=crm.hidden_dim))
    model = RecLLM(llm, AnswerTokens((ANSWER[0],), (ANSWER[1],)), crm, config)
    model.crm.to(device)
    for param in model.trainable_parameters().values():
        param.data = param.data.to(device)
    return model


def make_batch(
    size: int, seq: int, vocab: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A stage-2 batch: left-padded random prompts ending with an answer token, and the SIM's ID view."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(0.8 * seq), seq + 1, (size,), generator=g)
    mask = (torch.arange(seq)[None] >= seq - lengths[:, None]).long()  # [B, T]
    input_ids = torch.randint(5, vocab, (size, seq), generator=g) * mask
    label = torch.randint(0, 2, (size,), generator=g).float()
    input_ids[:, -1] = torch.where(label > 0, ANSWER[0], ANSWER[1])  # the answer token
    labels = torch.full((size, seq), IGNORE_INDEX)
    labels[:, -1] = input_ids[:, -1]
    hist = torch.arange(CRM_HISTORY)[None] >= torch.randint(1, CRM_HISTORY, (size, 1), generator=g)
    batch = {
        "sample_id": torch.arange(size),
        "label": label,
        "user_id": torch.randint(2, 1000, (size,), generator=g),
        "item_id": torch.randint(2, 2000, (size,), generator=g),
        "genre": torch.randint(2, 20, (size,), generator=g),
        "hist_item": torch.randint(2, 2000, (size, CRM_HISTORY), generator=g) * hist,
        "hist_genre": torch.randint(2, 20, (size, CRM_HISTORY), generator=g) * hist,
        "hist_rating": torch.randint(1, 11, (size, CRM_HISTORY), generator=g) * hist,
        "hist_mask": hist,
        "hist_len": hist.sum(1),
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "answer_position": torch.full((size,), seq - 2),
    }
    return {k: v.to(device) for k, v in batch.items()}


def prompt_only(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inference batch: the prompt without its answer token, ``answer_position`` at its last token."""
    out = {k: v for k, v in batch.items() if k != "labels"}
    out["input_ids"], out["attention_mask"] = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
    out["answer_position"] = batch["answer_position"].clone().fill_(batch["input_ids"].shape[1] - 2)
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def median_seconds(step: Callable[[], None], device: torch.device, steps: int) -> float:
    """Median wall seconds of ``steps`` calls after one untimed warm-up call."""
    step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine_for(model: RecLLM, ds_json: str, batch: int) -> object:
    """A DeepSpeed ZeRO-2 engine over the trainable parameters, the JSON resolved as the recipe does it."""
    import deepspeed

    from reclora_ds.package_data import find_ds_config
    from reclora_ds.training.plora_config import PLoRATrainConfig
    from reclora_ds.training.plora_recipe import resolve_ds_config

    world = torch.distributed.get_world_size()
    cfg = PLoRATrainConfig(batch_size=batch * world, micro_batch_size=batch, lr=1e-4)
    ds_config = resolve_ds_config(json.loads(find_ds_config(ds_json).read_text()), cfg, world)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=list(model.trainable_parameters().values()), config=ds_config
    )
    return engine


def timed_engine(engine, model: RecLLM, batch: dict, device: torch.device, steps: int) -> tuple[float, float]:
    """Seconds per sample of a ZeRO-2 training micro-step (routing, forward, backward, step) and of scoring."""
    size = len(batch["label"])

    def train() -> None:
        with model.routing(batch):
            loss = engine(batch).loss
            engine.backward(loss)
        engine.step()

    infer_batch = prompt_only(batch)

    def infer() -> None:
        model.eval()
        model.score(infer_batch)
        model.train()

    return median_seconds(train, device, steps) / size, median_seconds(infer, device, steps) / size


def part_zero2(args: argparse.Namespace, device: torch.device) -> PartResult:
    from reclora_ds.llm_loader import native_bf16

    bf16 = native_bf16(device.type)
    model = rec_llm(llama(args.small_shape, torch.float32, device), device)
    engine = engine_for(
        model, "ds_configs/zero2_bf16.json" if bf16 else "ds_configs/zero2_fp32.json", args.batch
    )
    reset_peak(device)
    vocab = SHAPES[args.small_shape][-1]
    batch = make_batch(args.batch, args.seq, vocab, device)
    if bf16:  # the engine cast the whole model: the CRM's ID view stays integer, nothing else to do
        assert next(model.llm.parameters()).dtype == torch.bfloat16
    train, infer = timed_engine(engine, model, batch, device, args.steps)
    backend = torch.distributed.get_backend()
    engine.destroy()
    return PartResult(
        "zero2", args.small_shape, "bfloat16" if bf16 else "float32", args.batch, args.seq, train, infer,
        peak_gib(device), f"ZeRO-2 over {backend}, {torch.distributed.get_world_size()} rank(s)",
    )  # fmt: skip


def part_int8(args: argparse.Namespace, device: torch.device) -> PartResult:
    from reclora_ds.llm_loader import bitsandbytes_problem, load_causal_lm

    problem = bitsandbytes_problem(device)
    if problem is not None:
        raise SystemExit(f"error: int8 part: {problem}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_int8_") as tmp:
        llama(args.small_shape, torch.float32, torch.device("cpu")).save_pretrained(tmp)
        llm, _ = load_causal_lm(tmp, dtype="float32", device=device, load_in_8bit=True, with_tokenizer=False)
    model = rec_llm(llm, device)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.int8}
    if not before:
        raise SystemExit("error: int8 part: the backbone has no int8 weight after load_in_8bit=true")
    engine = engine_for(model, "ds_configs/zero2_fp32.json", args.batch)
    reset_peak(device)
    batch = make_batch(args.batch, args.seq, SHAPES[args.small_shape][-1], device)
    train, infer = timed_engine(engine, model, batch, device, args.steps)
    after = {n: p for n, p in model.named_parameters() if p.dtype == torch.int8}
    if after.keys() != before.keys() or not all(torch.equal(before[n], after[n]) for n in before):
        raise SystemExit("error: int8 part: DeepSpeed changed the int8 weights")
    engine.destroy()
    return PartResult(
        "int8", args.small_shape, "int8 + float32 adapter", args.batch, args.seq, train, infer, peak_gib(device),
        f"{len(before)} int8 weights unchanged after {args.steps + 1} steps",
    )  # fmt: skip


def part_throughput(args: argparse.Namespace, device: torch.device) -> PartResult:
    from reclora_ds.llm_loader import native_bf16

    dtype = torch.bfloat16 if native_bf16(device.type) else torch.float32
    model = rec_llm(llama(args.big_shape, dtype, device), device)
    if args.gradient_checkpointing:
        from reclora_ds.models.rec_llm import enable_activation_checkpointing

        enable_activation_checkpointing(model.llm)
    optimizer = torch.optim.AdamW(list(model.trainable_parameters().values()), lr=1e-4)
    reset_peak(device)
    batch = make_batch(args.batch, args.seq, SHAPES[args.big_shape][-1], device)

    def train() -> None:
        with model.routing(batch):
            model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    infer_batch = prompt_only(batch)

    def infer() -> None:
        model.eval()
        model.score(infer_batch)
        model.train()

    train_s = median_seconds(train, device, args.steps) / args.batch
    infer_s = median_seconds(infer, device, args.steps) / args.batch
    n = sum(p.numel() for p in model.llm.parameters())
    return PartResult(
        "throughput", f"{args.big_shape} ({n / 1e9:.2f} B params, random)", str(dtype).removeprefix("torch."),
        args.batch, args.seq, train_s, infer_s, peak_gib(device),
        "activation checkpointing" if args.gradient_checkpointing else "",
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (--tiny tests)")
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    parser.add_argument("--tiny", action="store_true", help="toy shapes for every part (CPU tests)")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default 16; --tiny 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per prompt (default 256; --tiny 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per part (default 10; --tiny 2)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="throughput part: recompute")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = parser.parse_args(argv)
    args.small_shape = "tiny" if args.tiny else "smollm2-135m"
    args.big_shape = "tiny" if args.tiny else "llama-7b"
    args.batch = args.batch or (2 if args.tiny else 16)
    args.seq = args.seq or (16 if args.tiny else 256)
    args.steps = args.steps or (2 if args.tiny else 10)
    return args


def main(argv: list[str] | None = None) -> list[PartResult]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: --device cuda: torch.cuda.is_available() is False (no CUDA GPU or a CPU-only torch); "
            "run on a CUDA machine, or --device cpu --tiny for the CPU smoke run"
        )
    from reclora_ds.distributed import init_distributed

    init_distributed(single_process_group=True)  # NCCL on CUDA, gloo on a CPU
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"# gpu_check: {where}, torch {torch.__version__}, parts {', '.join(args.parts)}", flush=True)
    runners = {"zero2": part_zero2, "int8": part_int8, "throughput": part_throughput}
    results = []
    for part in args.parts:
        results.append(runners[part](args, device))
        print(results[-1].line(), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
    return results


if __name__ == "__main__":
    from reclora_ds.distributed import run_and_exit

    run_and_exit(lambda: (main(), 0)[1])
