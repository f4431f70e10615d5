"""Stage 2 recipe: tune PLoRA (or LoRA) of a frozen LLM on the few-shot split with DeepSpeed ZeRO-2.

::

    recipe = PLoRARecipe(cfg)    # cfg: reclora_ds.training.plora_config.PLoRATrainConfig
    recipe.setup()               # process group, RecLLM, loaders, DeepSpeed engine, logger, auto-resume
    recipe.train()               # micro-steps with accumulation; logs, validation, checkpoints
    metrics = recipe.finish()    # adapter export, evaluation of the eval splits -> metrics.json
    recipe.cleanup()

or :func:`run_plora_training` (what ``launch/train_plora.py`` calls). One code path for ``deepspeed``,
``torchrun`` and a plain ``python`` process (a 1-rank gloo group is created then: DeepSpeed needs one).

Model: :class:`~reclora_ds.models.rec_llm.RecLLM` (frozen LLM + frozen CRM + PLoRA, or peft LoRA, or nothing
for ``zero_shot``). Only the trainable parameters go to ``deepspeed.initialize``; the optimizer is the
DeepSpeed JSON's AdamW (weight decay 0 by default) and the schedule a linear warm-up + linear decay to 0
(:func:`reclora_ds.training.crm_recipe.lr_factor`) stepped at every optimizer step. Precision
(:func:`stage2_dtype`): a DeepSpeed JSON with ``bf16`` / ``fp16`` casts the whole model; under
``zero2_fp32.json`` the adapter's parameters, gradients and AdamW stay float32 and the frozen LLM takes ``dtype``
(``auto``: bfloat16 on a GPU or a CPU with avx512_bf16 / AMX, else float32); PLoRA's bank then computes in the
LLM's dtype on cast copies of its float32 parameters (``adapter.compute_dtype``). ``load_in_8bit`` keeps the LLM's linear weights int8
(bitsandbytes, CUDA or its CPU backend) under a float32 engine. Attention: the training steps run the
backbone with :func:`train_attention`'s kernel and evaluation with ``attn_implementation``
(:func:`set_attention` switches between them).

Batches: :class:`~reclora_ds.training.plora_data.PLoRABatchLoader` on the few-shot split, per rank by file,
shuffled per epoch with the seed; every rank runs the same number of micro-batches. ``batch_size`` is the
global batch: ``gradient_accumulation_steps = batch_size / (micro_batch_size * world_size)``. An epoch uses
``steps_per_epoch * gradient_accumulation_steps`` micro-batches (a trailing partial accumulation is dropped).

Evaluation: p(yes) on prompt-only batches of the whole split (or a seeded uniform subset of
``eval_max_samples`` sample ids, the same for any world size: :func:`reclora_ds.data.loader.uniform_sample_ids`),
predictions gathered across ranks and de-duplicated by sample_id, AUC with its 95% DeLong interval, log loss
and GAUC computed once (:func:`reclora_ds.metrics.evaluate_predictions`). The periodic validation
(``eval_every``) scores a fixed uniform subset of ``periodic_eval_samples`` validation ids.

Run folder (rank 0 writes everything but DeepSpeed's per-rank optimizer shards)::

    config.yaml           the resolved PLoRATrainConfig
    ds_config.json        the resolved DeepSpeed config (batch sizes, lr, clipping filled in)
    checkpoints/latest    the tag of the newest complete checkpoint (written atomically, after all ranks)
    checkpoints/step00000100/   DeepSpeed checkpoint: trainable parameters only (frozen ones and a tied
                          lm_head are filtered), ZeRO optimizer shards, lr schedule, and a client state
                          with the data position, every rank's RNG states and the trainer state;
                          config.yaml + ds_config.json beside it
    adapter/              the trained adapter: PLoRA (adapter_model.safetensors + plora_config.json,
                          reclora_ds.training.adapter_io) or peft LoRA (+ adapter_config.json), and
                          rec_llm.json (mode, RecLLM settings, the CRM checkpoint's description)
    tb/                   TensorBoard: train/loss, train/lr, gate/entropy, gate/expert_usage/<k>,
                          eval/auc, eval/logloss, eval/gauc, test/*, the config as text
    metrics.json          train losses, validation history, final metrics per split, timings (``perf``:
                          seconds per sample of the timed training steps and of each evaluation, each
                          optimizer step's seconds, prompt tokens per sample and padding fraction)
    predictions_<split>.parquet   the evaluated samples of each split: sample_id, user_index, label, p

Resume: with ``resume=true`` a run whose ``checkpoints/latest`` exists continues from it: trainable
weights, optimizer, schedule, step, data position (the remaining micro-batches of the epoch, in order) and
RNG states. On CPU in fp32 a run killed with SIGKILL and started again ends with the same adapter as an
uninterrupted one (``tests/training/test_plora_recipe.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from reclora_ds import distributed as dist_utils
from reclora_ds.config import config_to_dict, save_config
from reclora_ds.cpu import enable_cpu_extras
from reclora_ds.data.loader import uniform_sample_ids
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.data.prompts import PromptEncoder
from reclora_ds.files import (
    DiskFullError,
    atomic_dir,
    atomic_file,
    free_bytes,
    is_disk_full,
    write_text_atomic,
)
from reclora_ds.llm_loader import bitsandbytes_problem, native_bf16, resolve_dtype
from reclora_ds.malloc_preload import loaded_allocator
from reclora_ds.metrics import (
    Predictions,
    evaluate_predictions,
    expert_usage,
    gate_entropy,
    gather_predictions,
)
from reclora_ds.models.attention import EAGER_FUSED
from reclora_ds.package_data import find_ds_config  # the working directory's, else the packaged copy
from reclora_ds.training.checkpoint import CheckpointError, rng_state, set_rng_state
from reclora_ds.training.crm_recipe import lr_factor
from reclora_ds.training.logger import MetricLogger, build_logger
from reclora_ds.training.plora_config import PLoRATrainConfig
from reclora_ds.training.plora_data import PLoRABatchLoader, history_settings, nested_sample_ids
from reclora_ds.training.rec_llm_io import build_rec_llm, describe, write_description

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
ADAPTER_DIR = "adapter"
CLIENT_STATE_KEY = "reclora"
AUTO = "auto"
# Settings that fix the model or the order of the data: a resume with other values would not continue the
# same run, so it is refused.
PLORA_RESUME_MUST_MATCH = (
    "mode",
    "backbone",
    "crm_path",
    "adapter",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "short_history",
    "short_history_length",
    "long_history",
    "long_history_length",
    "train_split",
    "few_shot_size",
    "few_shot_seed",
    "length_group_size",
    "dtype",
    "load_in_8bit",
    "batch_size",
    "micro_batch_size",
    "max_length",
    "seed",
)


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed config
# ----------------------------------------------------------------------------------------------------------


def ds_precision(ds_config: Mapping[str, Any]) -> str:
    """The dtype name the config trains in: ``bfloat16``, ``float16`` or ``float32``."""
    if ds_config.get("bf16", {}).get("enabled", False):
        return "bfloat16"
    if ds_config.get("fp16", {}).get("enabled", False):
        return "float16"
    return "float32"


def stage2_dtype(cfg: PLoRATrainConfig, ds_config: Mapping[str, Any], device: torch.device) -> str:
    """The dtype name of the frozen LLM's weights for ``cfg.dtype`` under the DeepSpeed config, on ``device``.

    A config that enables ``bf16`` / ``fp16`` makes DeepSpeed cast the whole model (adapter included) to it:
    ``auto`` follows it, another explicit value is an error. Under a float32 config the adapter, its
    gradients and the optimizer stay float32 and only the frozen LLM takes ``cfg.dtype``: ``auto`` is
    bfloat16 where ``device`` computes it natively (:func:`reclora_ds.llm_loader.native_bf16`), else float32.

    Raises:
        ValueError: ``error: <key>: <reason>`` for a dtype the device cannot compute natively, a dtype that
            contradicts the DeepSpeed config, or ``load_in_8bit`` without a usable bitsandbytes; raised
            before any model is loaded.
    """
    engine = ds_precision(ds_config)
    if cfg.load_in_8bit:
        problem = bitsandbytes_problem(device)
        if problem is not None:
            raise ValueError(f"error: load_in_8bit: {problem}; or set load_in_8bit=false")
        if engine != "float32":
            raise ValueError(
                f"error: load_in_8bit: {cfg.deepspeed_config} enables {engine}, and DeepSpeed's cast of the "
                "model would also cast the 8-bit layers' float scales; use ds_configs/zero2_fp32.json (the "
                "adapter trains in float32, the int8 weights stay int8) with dtype=auto"
            )
    if engine != "float32":
        if cfg.dtype not in ("auto", engine):
            raise ValueError(
                f"error: dtype: {cfg.dtype} but {cfg.deepspeed_config} enables {engine}, and DeepSpeed casts the "
                "whole model to it; set dtype=auto, or use ds_configs/zero2_fp32.json to keep the adapter in "
                f"float32 and the frozen LLM in {cfg.dtype}"
            )
        if not native_bf16(device.type) and device.type == "cpu":
            raise ValueError(
                f"error: {cfg.deepspeed_config}: {'bf16' if engine == 'bfloat16' else 'fp16'}.enabled: this CPU "
                "computes no 16-bit float natively (no avx512_bf16 / AMX); use ds_configs/zero2_fp32.json"
            )
        return engine
    if cfg.dtype in ("bfloat16", "float16") and not native_bf16(device.type):
        raise ValueError(
            f"error: dtype: {cfg.dtype} is not computed natively on this {device.type} (a CPU needs "
            "avx512_bf16 or AMX); use dtype=auto or float32"
        )
    if cfg.dtype == "float16" and device.type == "cpu":
        raise ValueError(
            "error: dtype: float16 matmuls are emulated on a CPU; use dtype=auto (bf16) or float32"
        )
    return str(resolve_dtype(cfg.dtype, device, auto_cpu_bf16=True)).removeprefix("torch.")


def resolve_ds_config(raw: Mapping[str, Any], cfg: PLoRATrainConfig, world_size: int) -> dict[str, Any]:
    """Fill the ``"auto"`` values of a DeepSpeed config from the stage config and the world size.

    Batch sizes: ``train_micro_batch_size_per_gpu = micro_batch_size``, ``train_batch_size = batch_size``,
    ``gradient_accumulation_steps = batch_size / (micro_batch_size * world_size)``; optimizer ``lr`` and
    ``weight_decay``; ``gradient_clipping = grad_clip``. A value given as a number must agree with them.

    Raises:
        ValueError: the global batch does not split into whole micro-batches over the ranks, a given value
            disagrees, or an ``"auto"`` is left that the recipe does not know.
    """
    per_step = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_step:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size x world_size = "
            f"{cfg.micro_batch_size} x {world_size}"
        )
    resolved = json.loads(json.dumps(raw))  # a deep copy
    wanted = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.batch_size // per_step,
        "gradient_clipping": cfg.grad_clip,
    }
    problems = []
    for key, value in wanted.items():
        given = resolved.get(key, AUTO)
        if given != AUTO and given != value:
            problems.append(f"{key}={given} but the stage config gives {value}")
        resolved[key] = value
    params = resolved.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    for key, value in (("lr", cfg.lr), ("weight_decay", cfg.weight_decay)):
        given = params.get(key, AUTO)
        if given != AUTO and given != value:
            problems.append(f"optimizer.params.{key}={given} but the stage config gives {value}")
        params[key] = value
    left = [path for path, value in _walk(resolved) if value == AUTO]
    if left:
        problems.append(f"'auto' values the recipe cannot resolve: {left}")
    if problems:
        raise ValueError("DeepSpeed config: " + "; ".join(problems))
    return resolved


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


# ----------------------------------------------------------------------------------------------------------
# Checkpoint helpers
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def only_trainable_state(module: nn.Module) -> Iterator[None]:
    """Inside the block ``module.state_dict()`` holds the trainable parameters only.

    DeepSpeed's ``exclude_frozen_parameters`` drops frozen *parameters* by name, but a tied ``lm_head.weight``
    is not a separate parameter name and would be saved (121 MB for SmolLM2). The state-dict hook is
    removed on exit.
    """
    keep = {name for name, p in module.named_parameters() if p.requires_grad}

    def drop_frozen(_module: nn.Module, state_dict: dict, prefix: str, _metadata: Any) -> None:
        for key in [k for k in state_dict if k[len(prefix) :] not in keep]:
            del state_dict[key]

    handle = module.register_state_dict_post_hook(drop_frozen)
    try:
        yield
    finally:
        handle.remove()


def checked_trainable_load(expected: set[str]) -> Callable[..., None]:
    """A DeepSpeed ``custom_load_fn``: the checkpoint's module state must hold exactly the trainable names."""

    def load(src: Mapping[str, torch.Tensor], dst: nn.Module) -> None:
        got = set(src)
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"the checkpoint's trainable tensors do not match the model: missing {missing[:10]}, "
                f"unexpected {unexpected[:10]}"
            )
        # every key is checked above; the frozen weights (not in the checkpoint) come from the backbone/CRM
        dst.load_state_dict(dict(src), strict=False)

    return load


PREDICTIONS_FILE = "predictions_{split}.parquet"


def write_predictions(path: Path, pred: Predictions) -> None:
    """The gathered predictions of one split as Parquet (sample_id, user_index, label, p), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "sample_id": np.asarray(pred.sample_ids, dtype=np.int64),
            "user_index": np.asarray(pred.users, dtype=np.int64),
            "label": np.asarray(pred.labels, dtype=np.int8),
            "p": np.asarray(pred.probs, dtype=np.float64),
        }
    )
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def _checkpoint_disk_full(folder: Path, reason: str) -> DiskFullError:
    """The :class:`~reclora_ds.files.DiskFullError` of a checkpoint write: ``<folder>: <reason>``."""
    error = DiskFullError(folder, None)
    error.strerror = reason  # the generic text speaks of a replaced file; a checkpoint keeps `latest`
    return error


TRAIN_PHASES = ("data", "forward", "backward", "optimizer")
"""How ``perf`` splits a timed step: the batch (loader, tokenisation, copy to the device), the forward (CRM
and LM), the backward, DeepSpeed's step (ZeRO-2 reduction and AdamW, or only the gradient accumulation).
Host wall times: on a GPU, whose kernels run asynchronously, a phase holds the time the host waited in it."""


def train_attention(cfg: PLoRATrainConfig, device: torch.device) -> str:
    """The attention kernel of the training steps: ``train_attn_implementation``, where ``auto`` is
    ``eager_fused`` on a CPU and ``attn_implementation`` on a GPU."""
    if cfg.train_attn_implementation != "auto":
        return cfg.train_attn_implementation
    return EAGER_FUSED if device.type == "cpu" else cfg.attn_implementation


class AttentionFormError(ValueError):
    """``plora.cpu_attention_form`` names a form this run cannot use; the message names the key and why."""


ATTENTION_FORM_HINT = "cpu_attention_form=auto takes what this machine can run"


def check_attention_form(cfg: PLoRATrainConfig, device: torch.device, attentions: tuple[str, ...]) -> None:
    """Fail early (:class:`AttentionFormError`) where ``cpu_attention_form`` is explicit and no CPU kernel
    will run: a GPU, or none of ``attentions`` (the kernels the run uses) is ``eager_fused``."""
    form = cfg.cpu_attention_form
    if form == "auto":
        return
    if device.type != "cpu":
        raise AttentionFormError(
            f"plora.cpu_attention_form={form}: a {device.type} run has no CPU kernel ({ATTENTION_FORM_HINT})"
        )
    if EAGER_FUSED not in attentions:
        raise AttentionFormError(
            f"plora.cpu_attention_form={form}: the form is {EAGER_FUSED}'s, and this run's attention is "
            f"{' / '.join(sorted(set(attentions)))} ({ATTENTION_FORM_HINT})"
        )


def enable_backbone_kernels(cfg: PLoRATrainConfig, attentions: tuple[str, ...]) -> str | None:
    """Switch on the backbone's CPU kernels in this process: the attention kernel in ``cpu_attention_form``
    where one of ``attentions`` (the kernels the run uses) is ``eager_fused``, the RMSNorm kernel under
    ``norm_implementation=fused``. Returns the attention kernel's form the run uses (None: no kernel for
    it, or eager's ops). An explicit form whose kernel cannot run here: :class:`AttentionFormError`."""
    fused = EAGER_FUSED in attentions
    try:
        extras = enable_cpu_extras(
            attention=fused,
            attention_form=cfg.cpu_attention_form,
            rms_norm=cfg.norm_implementation == "fused",
        )
    except RuntimeError as exc:  # only an explicit form makes the kernel required
        form = cfg.cpu_attention_form
        raise AttentionFormError(f"plora.cpu_attention_form={form}: {exc} ({ATTENTION_FORM_HINT})") from exc
    return extras.attention_form if fused else None  # a kernel registered earlier in the process is not ours


def set_attention(model: nn.Module, implementation: str) -> None:
    """Make the backbone inside ``model`` run ``implementation`` (``sdpa`` / ``eager`` / ``eager_fused``)
    from its next forward.

    transformers' Llama picks its attention function and its mask format from
    ``config._attn_implementation`` at every forward; ``set_attn_implementation`` changes it on the
    outermost pretrained model (its sub-models share the config).
    """
    from transformers import PreTrainedModel

    backbone = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if backbone is None:
        raise TypeError(f"{type(model).__name__} holds no transformers model whose attention can be set")
    if backbone.config._attn_implementation != implementation:
        backbone.set_attn_implementation(implementation)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PLoRATrainerState:
    """Training position saved in every checkpoint's client state."""

    epoch: int = 0
    """The epoch in progress."""
    step: int = 0
    """Optimizer steps done."""
    done: bool = False
    """Training is over (a resume goes straight to the final evaluation)."""
    losses: list[list[float]] = dataclasses.field(default_factory=list)
    """``[step, mean train loss over the log window and all ranks]`` at every log step."""
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Periodic validation metrics."""


class PLoRARecipe:
    """The stage-2 recipe (see the module docstring). Collective methods must run on every rank."""

    def __init__(self, cfg: PLoRATrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / CHECKPOINT_DIR
        self.state = PLoRATrainerState()
        self.engine: Any = None
        self.logger: MetricLogger | None = None
        self.resumed_from: int | None = None
        self._saved_step = -1
        self._perf: dict[str, float] = {}
        self.attention_form: str | None = None  # the CPU attention kernel's form, None where none runs

    # ------------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.info = dist_utils.init_distributed(single_process_group=True)
        self.is_main = self.info.is_main
        self.raw_ds_config = json.loads(find_ds_config(cfg.deepspeed_config).read_text())
        self.ds_config = resolve_ds_config(self.raw_ds_config, cfg, self.info.world_size)
        self.gas = self.ds_config["gradient_accumulation_steps"]
        dtype = stage2_dtype(cfg, self.ds_config, self._device())

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)  # noqa: NPY002 (the legacy global RNG, for any library that reads it)
        # the same adapter init on every rank (DeepSpeed broadcasts rank 0's weights anyway)
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer, self.crm_info = build_rec_llm(cfg, dtype)
        self.dtype = dtype
        self.train_attention = train_attention(cfg, self._device())
        # the attention kernels this run uses: zero-shot only scores
        self.attentions = (cfg.attn_implementation,) + (
            (self.train_attention,) if cfg.mode != "zero_shot" else ()
        )
        check_attention_form(cfg, self._device(), self.attentions)
        torch.manual_seed(cfg.seed + self.info.rank)  # dropout masks differ between ranks

        self.dataset = ProcessedDataset(cfg.data_dir)
        self.encoder = PromptEncoder(self.tokenizer, self.dataset.metadata["dataset"], cfg.max_length)
        self._build_loaders()

        self.trainable = self.model.trainable_parameters()
        if cfg.mode != "zero_shot":
            self._build_engine()
        else:
            self.device = self._device()
            if not cfg.load_in_8bit:  # an 8-bit model is placed on its GPU when it is loaded
                self.model.to(self.device)
            if self.device.type == "cpu":  # scoring alone: the backbone's kernels, as _build_engine's
                self.attention_form = enable_backbone_kernels(cfg, self.attentions)
        resumed = self._maybe_resume()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            write_text_atomic(self.out / "ds_config.json", json.dumps(self.ds_config, indent=2) + "\n")
        self.logger = build_logger(self.out / "tb", purge_step=self.state.step if resumed else None)
        self.logger.log_text(
            "config", "```yaml\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False) + "```"
        )
        self.logger.log_text("deepspeed", "```json\n" + json.dumps(self.ds_config, indent=2) + "\n```")
        n_trainable = sum(p.numel() for p in self.trainable.values())
        log.info(
            "mode %s on %s: %s trainable parameters, %d rank(s), global batch %d = %d micro x %d ranks x %d "
            "accumulation, %d steps/epoch (%d in all), %s, attention %s (training) / %s (scoring), CPU attention "
            "kernel %s, malloc %s",
            cfg.mode,
            self.device,
            f"{n_trainable:,}",
            self.info.world_size,
            cfg.batch_size,
            cfg.micro_batch_size,
            self.info.world_size,
            self.gas,
            self.steps_per_epoch,
            self.total_steps,
            dtype,
            self.train_attention,
            cfg.attn_implementation,
            self.attention_form or "none",
            loaded_allocator(),
        )
        dist_utils.barrier()

    def _device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.info.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def _build_loaders(self) -> None:
        cfg, info = self.cfg, self.info
        common = {
            "rank": info.rank,
            "world_size": info.world_size,
            "seed": cfg.seed,
            "even_batches": True,
            **history_settings(cfg, self.crm_info),
        }
        train_ids = None
        if cfg.few_shot_size:  # a nested seeded subset: the same ids for any world size
            train_ids = nested_sample_ids(self.dataset, cfg.train_split, cfg.few_shot_size, cfg.few_shot_seed)
        self.train_loader = PLoRABatchLoader(
            self.dataset,
            cfg.train_split,
            cfg.micro_batch_size,
            self.encoder,
            with_answer=True,
            shuffle=True,
            drop_last=True,
            sample_ids=train_ids,
            length_group_size=cfg.length_group_size,
            **common,
        )

        def eval_loader(split: str, max_samples: int) -> PLoRABatchLoader:
            ids = None
            if max_samples:  # a seeded uniform subset: the same ids for any world size and any model
                ids = uniform_sample_ids(self.dataset, split, max_samples, cfg.eval_subset_seed)
            return PLoRABatchLoader(
                self.dataset,
                split,
                cfg.eval_batch_size,
                self.encoder,
                with_answer=False,
                shuffle=False,
                drop_last=False,
                sample_ids=ids,
                length_group_size=cfg.length_group_size,  # the order of evaluation does not matter
                **common,
            )

        self.eval_loaders = {split: eval_loader(split, cfg.eval_max_samples) for split in cfg.eval_splits}
        self.periodic_loader = None
        if cfg.eval_every:
            self.periodic_loader = eval_loader(
                cfg.eval_splits[0], cfg.periodic_eval_samples or cfg.eval_max_samples
            )
        self.steps_per_epoch = len(self.train_loader) // self.gas
        if cfg.mode != "zero_shot" and self.steps_per_epoch == 0:
            raise ValueError(
                f"split {cfg.train_split!r} gives {len(self.train_loader)} micro-batches per rank, fewer than one "
                f"optimizer step ({self.gas} accumulation steps)"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)

    def _build_engine(self) -> None:
        import deepspeed

        cfg = self.cfg
        total = self.total_steps

        def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: lr_factor(step, "linear", cfg.warmup_steps, total)
            )

        if not torch.cuda.is_available():
            enable_cpu_extras(
                prebuild_deepspeed_comm=True
            )  # build/load the shm op under the stale-lock guard
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            model_parameters=[p for p in self.model.parameters() if p.requires_grad],
            config=self.ds_config,
            lr_scheduler=schedule,
        )
        self.device = self.engine.device
        if self.device.type == "cpu":
            # Under the deepspeed launcher (LOCAL_SIZE set) DeepSpeed's CPU comm maps a 66 MB shared-memory
            # segment per rank and never unlinks it: once every rank has mapped them all, drop our name. The
            # frozen CRM keeps its PyTorch forms, as every reader of a trained CRM does (reclora_ds.cpu); the
            # backbone's eager_fused attention and fused norms get their CPU kernels.
            enable_cpu_extras(kernels=False, deepspeed_comm=True, allreduce=self.cfg.cpu_allreduce)
            self.attention_form = enable_backbone_kernels(self.cfg, self.attentions)

    def _maybe_resume(self) -> bool:
        latest = self.ckpt_dir / LATEST_FILE
        if not self.cfg.resume or self.engine is None or not latest.is_file():
            return False
        tag = latest.read_text().strip()
        path, client = self.engine.load_checkpoint(
            str(self.ckpt_dir),
            tag=tag,
            custom_load_fn=checked_trainable_load(set(self.trainable)),
        )
        if path is None:
            raise CheckpointError(f"{self.ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
        saved = client[CLIENT_STATE_KEY]
        current = config_to_dict(self.cfg)
        # a key an older checkpoint lacks had its default then (settings are added with the old behaviour)
        defaults = config_to_dict(PLoRATrainConfig())
        saved_config = {**defaults, **saved["config"]}
        differ = [k for k in PLORA_RESUME_MUST_MATCH if saved_config.get(k) != current.get(k)]
        if differ or saved["world_size"] != self.info.world_size:
            raise ValueError(
                f"{self.ckpt_dir / tag} was written by a run with other {differ or ['world_size']}: resume it "
                "with the same settings, or set resume=false / another output_dir"
            )
        self.state = PLoRATrainerState(**saved["trainer"])
        self.state.done = self.state.step >= self.total_steps  # a larger max_steps / epochs continues a run
        self.train_loader.load_state_dict(saved["loader"])
        set_rng_state(saved["rng"][self.info.rank])
        self.resumed_from = self._saved_step = self.state.step
        log.info(
            "resumed from %s at step %d (epoch %d)", self.ckpt_dir / tag, self.state.step, self.state.epoch
        )
        return True

    # ------------------------------------------------------------------------------------------------------
    # train
    # ------------------------------------------------------------------------------------------------------

    def train(self) -> None:
        """Micro-steps until ``total_steps`` optimizer steps are done; logs, validates and checkpoints."""
        cfg, state, loader = self.cfg, self.state, self.train_loader
        if self.engine is None or state.done:
            return
        per_epoch = self.steps_per_epoch * self.gas  # micro-batches an epoch uses
        self.engine.train()
        set_attention(self.model, self.train_attention)
        bar = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc="train",
            disable=not (self.is_main and cfg.progress),
            dynamic_ncols=True,
            leave=False,
        )
        window = _Window()  # the loss since the last log record
        train_seconds, train_samples = 0.0, 0
        tokens = _Tokens()
        step_seconds: list[float] = []  # each optimizer step's time (data, forward, backward, step)
        phases = dict.fromkeys(TRAIN_PHASES, 0.0)  # the timed steps' seconds by phase
        while not state.done:
            loader.set_epoch(state.epoch)  # keeps a resumed position inside this epoch
            micro = loader.state_dict()["batches_yielded"]
            batches = iter(loader) if micro < per_epoch else iter(())
            tick = fetch = time.perf_counter()
            for batch in batches:
                batch = to_device(batch, self.device)
                fetched = time.perf_counter()
                with self.model.routing(batch):  # open through backward: checkpointed layers need the gates
                    loss = self.engine(batch).loss
                    forward = time.perf_counter()
                    self.engine.backward(loss)
                backward = time.perf_counter()
                self.engine.step()
                stepped = time.perf_counter()
                for name, seconds in zip(
                    TRAIN_PHASES,
                    (fetched - fetch, forward - fetched, backward - forward, stepped - backward),
                ):
                    phases[name] += seconds
                micro += 1
                window.add(loss.detach())
                train_samples += len(batch["label"])
                tokens.add(batch["attention_mask"])
                if self.engine.global_steps == state.step:
                    fetch = time.perf_counter()
                    continue  # inside a gradient accumulation
                state.step = self.engine.global_steps
                bar.update(1)
                step_seconds.append(time.perf_counter() - tick)
                train_seconds += step_seconds[-1]
                if self._after_step(batch, window):
                    window = _Window()
                    bar.set_postfix(loss=f"{state.losses[-1][1]:.4f}")
                tick = fetch = time.perf_counter()  # logging, validation and checkpoints are not step time
                if state.done or micro >= per_epoch:
                    break
            if not state.done:
                state.epoch += 1
        bar.close()
        self._perf["train_s_per_sample"] = train_seconds / max(1, train_samples)
        self._perf["train_step_seconds"] = step_seconds
        self._perf |= {f"train_{name}_s_per_sample": t / max(1, train_samples) for name, t in phases.items()}
        self._perf |= tokens.perf("train", train_samples)

    def _after_step(self, batch: dict[str, torch.Tensor], window: _Window) -> bool:
        """Log, validate and checkpoint after optimizer step ``state.step``; True when it logged."""
        cfg, state = self.cfg, self.state
        last = state.step >= self.total_steps
        if last:
            state.done = True
        logged = state.step % cfg.log_every == 0 or last
        if logged:
            self._log_train(batch, window)
        if cfg.eval_every and state.step % cfg.eval_every == 0 and not last:
            metrics = self.evaluate(cfg.eval_splits[0], periodic=True)
            state.evals.append({"step": state.step, "split": cfg.eval_splits[0], **metrics})
        if last or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
            self.save_checkpoint()
        return logged

    def _log_train(self, batch: dict[str, torch.Tensor], window: _Window) -> None:
        """train/loss (mean over the window's micro-batches and all ranks), train/lr and gate statistics."""
        totals = dist_utils.all_gather_variable(
            torch.tensor([[window.loss_sum, window.count]], dtype=torch.float64)
        )  # [W, 2]
        loss = float(totals[:, 0].sum() / totals[:, 1].sum())
        values = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0]}
        if self.cfg.mode == "plora":
            alpha = self.model.gate_weights(batch).float()  # [G, B, N]
            stats = torch.stack([torch.stack([gate_entropy(a), *expert_usage(a)]) for a in alpha]).mean(0)
            stats = dist_utils.all_gather_variable(stats.cpu()[None].double()).mean(0)  # [1 + N], rank mean
            values["gate/entropy"] = float(stats[0])
            values |= {f"gate/expert_usage/{k:02d}": float(u) for k, u in enumerate(stats[1:])}
        self.logger.log_dict(values, self.state.step)
        self.state.losses.append([self.state.step, loss])
        log.info("step %d/%d: loss %.4f lr %.3g", self.state.step, self.total_steps, loss, values["train/lr"])

    # ------------------------------------------------------------------------------------------------------
    # evaluate
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: str, periodic: bool = False) -> dict[str, float]:
        """Exact AUC (with its 95% DeLong interval) / log loss / GAUC of p(yes), gathered from all ranks.

        Final evaluations (``periodic=False``) cover ``split`` whole, or the seeded uniform subset of
        ``eval_max_samples`` ids, and write ``predictions_<split>.parquet``; the periodic validation covers
        its ``periodic_eval_samples`` subset and writes no file.
        """
        loader = self.periodic_loader if periodic else self.eval_loaders[split]
        was_training = self.model.training
        self.model.eval()
        set_attention(self.model, self.cfg.attn_implementation)
        ids, labels, probs, users = [], [], [], []
        tokens = _Tokens()
        start = time.perf_counter()
        bar = tqdm(
            total=len(loader),
            desc=f"eval {split}",
            leave=False,
            disable=not (self.is_main and self.cfg.progress),
        )
        for batch in loader:
            probs.append(self.model.score(to_device(batch, self.device)).double().cpu())
            ids.append(batch["sample_id"])
            labels.append(batch["label"])
            users.append(batch["user_index"])
            tokens.add(batch["attention_mask"])
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - start
        if not periodic:  # this rank's seconds over this rank's samples, as the training figures
            samples = sum(len(i) for i in ids)
            self._perf |= tokens.perf(f"eval_{split}", samples)
            self._perf[f"eval_s_per_sample_{split}"] = seconds / max(1, samples)
        self.model.train(was_training)
        if was_training:
            set_attention(self.model, self.train_attention)
        pred = gather_predictions(
            _cat(labels, torch.float32),
            _cat(probs, torch.float64),
            _cat(users, torch.int64),
            _cat(ids, torch.int64),
        )
        metrics = evaluate_predictions(pred.labels, pred.probs, pred.users, pred.sample_ids, gather=False)
        metrics["seconds"] = seconds
        if self.is_main and not periodic:
            write_predictions(self.out / PREDICTIONS_FILE.format(split=split), pred)
        prefix = "eval" if split == self.cfg.eval_splits[0] else split
        self.logger.log_dict(
            {f"{prefix}/{k}": metrics[k] for k in ("auc", "logloss", "gauc")}, self.state.step
        )
        log.info(
            "%s at step %d: auc %.4f [%.4f, %.4f] logloss %.4f gauc %.4f (%d samples)",
            split,
            self.state.step,
            metrics["auc"],
            metrics["auc_low"],
            metrics["auc_high"],
            metrics["logloss"],
            metrics["gauc"],
            metrics["n"],
        )
        return metrics

    # ------------------------------------------------------------------------------------------------------
    # save
    # ------------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Collective: a DeepSpeed checkpoint of the trainable state, then ``latest`` once every rank is done.

        ``checkpoints/<tag>/`` is written in place by DeepSpeed (every rank its optimizer shard), then rank 0
        adds ``config.yaml`` and ``ds_config.json`` and only then replaces ``latest`` (atomically): a kill or
        an error before that leaves ``latest`` on the previous complete checkpoint. A full disk anywhere in
        that sequence (:func:`reclora_ds.files.is_disk_full`, ``torch.save``'s errno-less error included)
        removes the partial ``<tag>`` folder (never the one ``latest`` names) and raises
        :class:`~reclora_ds.files.DiskFullError` naming it; a run with ``resume=true`` continues from the
        previous checkpoint once space is freed. Rank 0's own writes are shared with the other ranks
        (broadcast), so every rank raises the same error; a rank that fails inside DeepSpeed's save ends
        the others through the peer watch (:mod:`reclora_ds.distributed`).
        """
        if self._saved_step == self.state.step:
            return
        rngs = [dist_utils.broadcast_object(rng_state(), src=r) for r in range(self.info.world_size)]
        client = {
            CLIENT_STATE_KEY: {
                "loader": self.train_loader.state_dict(),
                "trainer": dataclasses.asdict(self.state),
                "rng": rngs,
                "world_size": self.info.world_size,
                "config": config_to_dict(self.cfg),
            }
        }
        tag = f"step{self.state.step:08d}"
        folder = self.ckpt_dir / tag
        try:
            with only_trainable_state(self.model):
                self.engine.save_checkpoint(
                    str(self.ckpt_dir),
                    tag=tag,
                    client_state=client,
                    save_latest=False,
                    exclude_frozen_parameters=True,
                )  # ends with a barrier: every rank's optimizer shard is written
        except Exception as exc:
            if not is_disk_full(exc, self.ckpt_dir):
                raise
            raise _checkpoint_disk_full(folder, self._discard_partial(folder)) from exc
        failed: str | None = None  # rank 0's reason when its writes ran out of space
        cause: BaseException | None = None
        if self.is_main:
            try:
                save_config(self.cfg, folder / "config.yaml")
                write_text_atomic(folder / "ds_config.json", json.dumps(self.ds_config, indent=2) + "\n")
                write_text_atomic(self.ckpt_dir / LATEST_FILE, tag)  # the commit: the checkpoint is complete
            except Exception as exc:
                if not is_disk_full(exc, self.ckpt_dir):
                    raise
                failed, cause = self._discard_partial(folder), exc
            else:
                self._prune_checkpoints(keep=tag)
        failed = dist_utils.broadcast_object(failed, src=0)  # also the barrier after rank 0's writes
        if failed is not None:
            raise _checkpoint_disk_full(folder, failed) from cause
        self._saved_step = self.state.step

    def _discard_partial(self, folder: Path) -> str:
        """After a full disk while writing checkpoint ``folder``: remove it (unless ``latest`` names it) and
        return the reason for :class:`~reclora_ds.files.DiskFullError` (space left, what ``latest`` names)."""
        free = free_bytes(self.ckpt_dir)  # as the write saw it, before the partial folder gives space back
        latest_file = self.ckpt_dir / LATEST_FILE
        previous = latest_file.read_text().strip() if latest_file.is_file() else None
        if folder.name != previous:
            shutil.rmtree(folder, ignore_errors=True)
        free_text = "unknown" if free is None else f"{free / 2**20:.1f} MiB"
        if previous is None:
            kept = "the partial folder was removed; there is no earlier checkpoint"
        elif previous == folder.name:
            kept = (
                f"{latest_file} names this folder, a checkpoint of an earlier run that this write was "
                "replacing: it may be incomplete now"
            )
        else:
            kept = (
                f"the partial folder was removed and {latest_file} still names the previous checkpoint "
                f"{previous}, which a run with resume=true continues from"
            )
        return (
            f"no space left on the device while writing this checkpoint ({free_text} free there); {kept}: "
            "free some space and run again"
        )

    def _prune_checkpoints(self, keep: str) -> None:
        """Remove the oldest ``step*`` folders beyond ``keep_checkpoints`` (never ``keep``, the new latest)."""
        tags = sorted(p for p in self.ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[: -self.cfg.keep_checkpoints]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def export_adapter(self) -> Path | None:
        """Rank 0: the trained adapter in a standard folder, plus ``rec_llm.json`` (what rebuilds the RecLLM).

        ``plora``: :func:`reclora_ds.training.adapter_io.save_plora_adapter` (``adapter_model.safetensors`` +
        ``plora_config.json``, names as the backbone has them; strict loading with ``load_plora_adapter``).
        ``lora``: peft's ``save_pretrained`` (``adapter_model.safetensors`` + ``adapter_config.json``).
        Written through :func:`reclora_ds.files.atomic_dir`: a full disk raises
        :class:`~reclora_ds.files.DiskFullError` naming ``adapter/`` and leaves the previous folder as it was.
        """
        if not self.trainable:
            return None
        folder = self.out / ADAPTER_DIR
        if self.is_main:
            description = describe(
                self.model, self.cfg, self.dtype, self.crm_info, self.encoder.answers, self.state.step,
                self.dataset.metadata["dataset"],
            )  # fmt: skip
            with atomic_dir(folder) as tmp:
                if self.cfg.mode == "plora":
                    from reclora_ds.training.adapter_io import save_plora_adapter

                    extra = {"base_model_name_or_path": self.cfg.backbone, "step": self.state.step}
                    save_plora_adapter(self.model.llm, self.model.config.adapter, tmp, extra)
                else:
                    self.model.llm.save_pretrained(str(tmp))
                write_description(tmp, description)
        dist_utils.barrier()
        return folder

    # ------------------------------------------------------------------------------------------------------
    # finish / cleanup
    # ------------------------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Export the adapter, evaluate every eval split, write metrics.json (rank 0); return its content."""
        self.export_adapter()
        final = {}
        for split in self.cfg.eval_splits:
            final[split] = self.evaluate(split)
        result = {
            "mode": self.cfg.mode,
            "steps": self.state.step,
            "epochs": self.cfg.epochs,
            "world_size": self.info.world_size,
            "trainable_parameters": sum(p.numel() for p in self.trainable.values()),
            "resumed_from": self.resumed_from,
            "train_loss": self.state.losses,
            "periodic_eval": self.state.evals,
            **final,
            "perf": self._perf,
            "truncated_prompts": self.encoder.truncated,
            "malloc": loaded_allocator(),  # this rank's (plora.cpu_allocator)
            "cpu_attention_form": self.attention_form,  # plora.cpu_attention_form, resolved; None: no kernel
        }
        if self.is_main:
            write_text_atomic(self.out / "metrics.json", json.dumps(result, indent=2) + "\n")
        dist_utils.barrier()
        return result

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()
        dist_utils.barrier()
        if self.engine is not None:
            import deepspeed.comm

            self.engine.destroy()
            # through DeepSpeed, which also forgets the groups it cached (a later run in this process
            # would otherwise reach for groups of the destroyed world)
            deepspeed.comm.destroy_process_group()
        dist_utils.destroy()


def _cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


class _Tokens:
    """Real and padded prompt tokens of this rank's batches (for tokens per sample and the padding share)."""

    def __init__(self) -> None:
        self.real = 0
        self.padded = 0

    def add(self, attention_mask: torch.Tensor) -> None:
        self.real += int(attention_mask.sum())
        self.padded += attention_mask.numel()

    def perf(self, prefix: str, samples: int) -> dict[str, float]:
        return {
            f"{prefix}_samples": samples,  # this rank's
            f"{prefix}_tokens_per_sample": self.real / max(1, samples),
            f"{prefix}_padding_fraction": 1 - self.real / max(1, self.padded),
        }


class _Window:
    """Micro-batch losses since the last log record (this rank's)."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += float(loss)
        self.count += 1


def run_plora_training(cfg: PLoRATrainConfig) -> dict[str, Any]:
    """Train (unless zero_shot), export the adapter, evaluate: the whole stage-2 recipe. Returns metrics."""
    recipe = PLoRARecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
        return recipe.finish()
    finally:
        recipe.cleanup()
