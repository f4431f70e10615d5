"""The settings of stage 2 (``launch/train_plora.py``): PLoRA (or LoRA) of a frozen LLM on the few-shot split."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from reclora_ds.malloc_preload import ALLOCATORS as CPU_ALLOCATORS
from reclora_ds.models.rec_llm import RecLLMConfig
from reclora_ds.training.crm_config import CPU_ALLREDUCES

CPU_ATTENTION_FORMS = ("auto", "dot", "matmul")
"""``cpu_attention_form``'s choices (``reclora_ds.cpu.kernels.ATTENTION_FORM_CHOICES``)."""

SHORT_HISTORIES = ("recent", "retrieved")
LONG_HISTORIES = ("auto", "recent", "retrieved")
DTYPE_SETTINGS = ("auto", "float32", "bfloat16", "float16")
ATTENTION_KERNELS = ("sdpa", "eager", "eager_fused")
NORM_IMPLEMENTATIONS = ("transformers", "fused")


@dataclasses.dataclass
class PLoRATrainConfig(RecLLMConfig):
    """Stage 2: tune PLoRA (or LoRA) on the few-shot split with DeepSpeed ZeRO-2 (``training.plora_recipe``).

    The model settings (mode, adapter, LoRA, frozen-CRM mode, activation checkpointing) are the fields of
    :class:`reclora_ds.models.rec_llm.RecLLMConfig`, inherited once (not copied): :func:`model_config`
    gives the model's own config. Below them: where the model is loaded from, the data, the training.

    Defaults are the paper's (reclora-facts sections 1 and 6): N_m = 16, r = 8, alpha = 16 on q_proj/v_proj,
    AdamW without weight decay, linear schedule, global batch 256, retrieved histories (10 in the prompt,
    the CRM's own for the CRM). ``launch/configs/plora_<dataset>.yaml`` hold each dataset's settings.
    """

    CONFIG_SECTION: ClassVar[str] = "plora"
    """The section of a YAML file this config is read from and saved under (``plora:``)."""

    data_dir: str = "runs/quickstart/prepare"
    """Processed dataset (``reclora-ds prepare``)."""
    output_dir: str = "runs/quickstart/plora"
    """Run folder: config.yaml, ds_config.json, checkpoints/, adapter/, tb/, metrics.json."""
    crm_path: str = "runs/quickstart/sim"
    """Stage-1 run folder (its checkpoints/best) or checkpoint folder; mode ``plora`` only."""
    backbone: str = "default"
    """``default`` (SmolLM2-135M-Instruct) or a local Hugging Face causal-LM folder (e.g. Vicuna-7B)."""
    short_history: str = "retrieved"
    """Prompt history: ``retrieved`` (the K most similar to the target) or ``recent`` (w/o short retriever)."""
    short_history_length: int = 10
    """K of the prompt history."""
    long_history: str = "auto"
    """CRM history: ``auto`` (what the CRM was trained on, from its crm.json), ``recent`` (w/o long
    retriever) or ``retrieved`` (``rows_k<long_history_length>`` of the retrieval output)."""
    long_history_length: int = 0
    """L of the CRM history; 0 = the CRM checkpoint's."""
    retrieval_dir: str = ""
    """Retrieval output folder (tools/retrieve_histories.py); empty = ``<data_dir>/retrieved/similarity``."""
    train_split: str = "fewshot"
    """The split the LLM is tuned on (the few-shot subset of train)."""
    few_shot_size: int = 0
    """Train on a seeded subset of this many samples of ``train_split``; 0 = the whole split. The subsets are
    nested (for one ``few_shot_seed`` the 2,048 ids lie inside the 4,096 ids) and do not depend on the number
    of ranks (:func:`reclora_ds.training.plora_data.nested_sample_ids`), so one prepared few-shot split serves
    every size of the paper's Fig. 6."""
    few_shot_seed: int = 0
    """Seed of the ``few_shot_size`` subset (kept apart from ``seed``: runs of several training seeds then
    train on the same samples)."""
    length_group_size: int = 0
    """Micro-batches whose samples are sorted by prompt length together, so a micro-batch holds prompts of
    similar length and pads less; the order of the groups' micro-batches is then shuffled (seeded). It only
    regroups this rank's samples inside windows of ``length_group_size x micro_batch_size`` consecutive
    samples of the epoch: every epoch sees the same samples. 0 or 1 = off."""
    epochs: int = 1
    """Passes over the training split."""
    max_steps: int = 0
    """Stop after this many optimizer steps in all; 0 = no limit."""
    batch_size: int = 256
    """Global batch (all ranks, all accumulation micro-steps): DeepSpeed's train_batch_size."""
    micro_batch_size: int = 8
    """Samples per rank per forward (train_micro_batch_size_per_gpu); accumulation makes up the rest."""
    eval_batch_size: int = 16
    """Samples per rank per forward in evaluation."""
    eval_max_samples: int = 0
    """Final evaluation of each split on a seeded uniform sample of this many sample ids (the same ids for
    any number of ranks and for every model with the same ``eval_subset_seed``); 0 = the whole split."""
    eval_subset_seed: int = 0
    """Seed of the uniform evaluation subsets (kept apart from ``seed``, so runs of several training seeds
    are compared on the same samples)."""
    eval_every: int = 0
    """Validate every this many optimizer steps (and at the end); 0 = at the end only."""
    periodic_eval_samples: int = 0
    """Samples of the periodic validation (``eval_every``): a seeded uniform subset of the first eval split,
    fixed for the whole run, that keeps validation affordable at full-dataset size; 0 = the same set as the
    final evaluation (``eval_max_samples``)."""
    eval_splits: tuple[str, ...] = ("valid", "test")
    """Splits evaluated at the end (the first one is also the periodic validation split)."""
    lr: float = 1e-3
    """AdamW peak learning rate (paper: ML-1M 1e-3, ML-25M 5e-4, GoodReads 3e-4)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (DeepSpeed ``optimizer.params.weight_decay``; paper: none)."""
    warmup_steps: int = 0
    """Linear warm-up steps before the linear decay to 0 at the last step."""
    grad_clip: float = 0.0
    """DeepSpeed gradient_clipping; 0 disables it."""
    seed: int = 42
    """Seed of the adapter init, the data order and the dropout masks (dropout also gets the rank)."""
    deepspeed_config: str = "ds_configs/zero2_bf16.json"
    """DeepSpeed JSON without batch sizes ("auto" values are resolved from this config and the world size);
    a relative path is looked up in the working directory, then in the repository."""
    dtype: str = "auto"
    """Weights of the frozen LLM: ``auto``, ``float32``, ``bfloat16`` or ``float16``. With a DeepSpeed config
    that enables ``bf16`` / ``fp16`` the engine casts the whole model to it, and ``auto`` follows it; with a
    float32 config (``zero2_fp32.json``) the adapter's parameters, its gradients and AdamW stay float32 (its math
    follows ``adapter.compute_dtype``) and ``auto`` loads
    the frozen LLM in bfloat16 where the device computes it natively (a CUDA GPU, or a CPU with
    ``avx512_bf16`` / AMX: :func:`reclora_ds.llm_loader.native_bf16`), else float32. An explicit value the
    device cannot compute natively (bfloat16 / float16 on such a CPU) is an error."""
    load_in_8bit: bool = False
    """Load the frozen LLM's linear layers in 8 bits with bitsandbytes (as the paper does on V100s); on a
    CUDA GPU, or on a CPU through bitsandbytes' CPU backend."""
    attn_implementation: str = "sdpa"
    """Attention kernel of the backbone when it scores (evaluation, ``reclora-ds score``): ``sdpa``,
    ``eager``, or ``eager_fused``: eager's function as one op (:mod:`reclora_ds.models.attention`), which
    on a CPU with AVX512-BF16 and bf16 activations runs one C++ kernel that writes no [B, H, T, T] tensor
    and skips the causal future (cheaper per sample: docs/PLORA_BENCH.md), and elsewhere eager's PyTorch
    ops; the one recorded with the exported adapter."""
    train_attn_implementation: str = "auto"
    """Attention kernel of the training steps: ``sdpa``, ``eager``, ``eager_fused``, or ``auto``:
    ``eager_fused`` on a CPU (eager's function; a bf16 training step measured cheaper with eager than with
    sdpa, and cheaper again with eager_fused's C++ forward and backward: docs/PLORA_BENCH.md), else
    ``attn_implementation``. The kernels compute the same attention; the run switches between them."""
    cpu_attention_form: str = "auto"
    """How ``eager_fused``'s C++ kernel computes the attention on a CPU (the same function, rounded the same
    way; it differs in the order of the float sums): ``dot`` (AVX512-BF16 dot products in the core's
    caches, skipping the causal future; for scoring no [B, H, T, T] tensor), ``matmul`` (the four products
    as batched bf16 matrix multiplications over every key, which oneDNN runs on AMX tiles where the CPU has
    them, and the softmax and its backward as row passes), or ``auto`` (``matmul`` on a CPU with AMX-BF16,
    else ``dot``). Measured in docs/PLORA_BENCH.md, "The attention's products on AMX". An explicit form a
    training run cannot use (no ``eager_fused`` attention, a GPU, a CPU without AVX512-BF16) is an error;
    scoring a trained run follows its config (the form where its scoring attention is ``eager_fused`` on a
    CPU, an error only where that CPU lacks AVX512-BF16) and logs which form ran; see
    ``reclora_ds.training.plora_recipe.check_attention_form``."""
    norm_implementation: str = "fused"
    """The backbone's RMSNorm layers: ``transformers`` (its modules as they are) or ``fused``
    (:mod:`reclora_ds.models.norms`: the same function as one op, which on a CPU with AVX512-BF16 and bf16
    activations runs one C++ kernel per layer, forward and backward, instead of six ops with float32
    copies: docs/PLORA_BENCH.md). Norms of other kinds than Llama's are left as they are. Recorded with the
    exported adapter, so scoring rebuilds the backbone the same way."""
    max_length: int = 1024
    """Most tokens of prompt + answer; a longer prompt loses its start (counted in the log)."""
    checkpoint_every: int = 100
    """Optimizer steps between DeepSpeed checkpoints (one is also written at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept in ``checkpoints/`` (the oldest are deleted)."""
    log_every: int = 10
    """Optimizer steps between train/loss, train/lr and gate/* records."""
    resume: bool = True
    """Continue from ``checkpoints/latest`` in output_dir when it exists."""
    num_threads: int = 0
    """torch intra-op threads per process; 0 keeps torch's default (OMP_NUM_THREADS)."""
    cpu_allreduce: str = "auto"
    """How ZeRO-2 sums gradients between CPU ranks: ``shm`` (DeepSpeed's shared-memory kernel, all ranks on
    one node under the deepspeed launcher), ``gloo`` (TCP), or ``auto`` (``shm`` when it can be used, else
    ``gloo``). The same sums either way on two ranks; measured in docs/PLORA_BENCH.md. See
    ``reclora_ds.cpu.shm_allreduce.route_deepspeed_all_reduce``."""
    cpu_allocator: str = "auto"
    """The ``malloc`` of each stage-2 process on a CPU: ``mimalloc``, ``jemalloc`` (preloaded: the command
    runs itself again with ``LD_PRELOAD``, same pid), ``system`` (the C library's), or ``auto`` (mimalloc
    where installed, as on Linux with this package, else jemalloc where the system has it, else the
    system's; on a CUDA machine ``auto`` keeps the system's). The same results, bit for bit; what it buys:
    docs/PLORA_BENCH.md, "A faster malloc". Applied by the ``train_plora`` and ``score``
    commands' processes; see ``reclora_ds.malloc_preload``."""
    progress: bool = True
    """tqdm progress bars on rank 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.short_history not in SHORT_HISTORIES:
            raise ValueError(f"short_history must be one of {SHORT_HISTORIES}, got {self.short_history!r}")
        if self.long_history not in LONG_HISTORIES:
            raise ValueError(f"long_history must be one of {LONG_HISTORIES}, got {self.long_history!r}")
        if self.mode == "plora" and not self.crm_path:
            raise ValueError("mode=plora needs crm_path (the stage-1 run folder)")
        for name in ("short_history_length", "epochs", "batch_size", "micro_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "long_history_length",
            "max_steps",
            "eval_max_samples",
            "eval_subset_seed",
            "few_shot_size",
            "few_shot_seed",
            "length_group_size",
            "eval_every",
            "periodic_eval_samples",
            "warmup_steps",
            "checkpoint_every",
            "num_threads",
            "seed",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1 or self.log_every < 1 or self.max_length < 8:
            raise ValueError(
                f"need keep_checkpoints >= 1, log_every >= 1, max_length >= 8; got "
                f"{self.keep_checkpoints}, {self.log_every}, {self.max_length}"
            )
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size} "
                "(times the world size, checked at launch)"
            )
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, grad_clip >= 0; got {self.lr}, {self.weight_decay}, {self.grad_clip}"
            )
        if not self.eval_splits or any(
            s not in ("valid", "test", "train", "fewshot") for s in self.eval_splits
        ):
            raise ValueError(f"eval_splits must name splits (valid, test, ...), got {list(self.eval_splits)}")
        if self.cpu_allreduce not in CPU_ALLREDUCES:
            raise ValueError(f"cpu_allreduce must be one of {CPU_ALLREDUCES}, got {self.cpu_allreduce!r}")
        if self.cpu_allocator not in CPU_ALLOCATORS:
            raise ValueError(f"cpu_allocator must be one of {CPU_ALLOCATORS}, got {self.cpu_allocator!r}")
        if self.dtype not in DTYPE_SETTINGS:
            raise ValueError(f"dtype must be one of {DTYPE_SETTINGS}, got {self.dtype!r}")
        if self.attn_implementation not in ATTENTION_KERNELS:
            raise ValueError(
                f"attn_implementation must be one of {ATTENTION_KERNELS}, got {self.attn_implementation!r}"
            )
        if self.train_attn_implementation not in ("auto", *ATTENTION_KERNELS):
            raise ValueError(
                f"train_attn_implementation must be auto or one of {ATTENTION_KERNELS}, "
                f"got {self.train_attn_implementation!r}"
            )
        if self.cpu_attention_form not in CPU_ATTENTION_FORMS:
            raise ValueError(
                f"cpu_attention_form must be one of {CPU_ATTENTION_FORMS}, got {self.cpu_attention_form!r}"
            )
        if self.norm_implementation not in NORM_IMPLEMENTATIONS:
            raise ValueError(
                f"norm_implementation must be one of {NORM_IMPLEMENTATIONS}, got {self.norm_implementation!r}"
            )
        self.eval_splits = tuple(self.eval_splits)


def model_config(cfg: RecLLMConfig) -> RecLLMConfig:
    """The model's own :class:`RecLLMConfig` (its fields, nothing of the training) of a stage-2 config."""
    return RecLLMConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RecLLMConfig)})
