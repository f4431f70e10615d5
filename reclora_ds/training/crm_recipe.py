"""Stage 1 recipe: train the CRM (SIM, DIN or logistic regression) on the full training split, with DDP.

::

    recipe = CRMRecipe(cfg)     # cfg: reclora_ds.training.crm_config.CRMTrainConfig
    recipe.setup()              # process group, data, model (+ DDP), AdamW, schedule, logger, auto-resume
    recipe.train()              # epochs of train_step; validate each epoch; early stopping; checkpoints
    metrics = recipe.test()     # the best checkpoint on the test split -> metrics.json
    recipe.cleanup()

or :func:`run_crm_training` (what ``launch/train_sim.py`` calls). The same code runs as one plain process
(no process group) or under ``torchrun`` / ``srun`` (one process per rank; gloo on CPU, NCCL on GPU, set
up by :mod:`reclora_ds.distributed`, the only module that reads the launcher's variables).

Data: the processed parquet shards of each split are read by :class:`~reclora_ds.data.loader.CRMBatchLoader`
per rank **by file**, rank r taking files r, r + W, ... — the split ``datasets.distributed.split_dataset_by_node``
makes of the streamed shards (:meth:`ProcessedDataset.stream`) when the number of files is a multiple of
the world size (``tests/training/test_crm_ddp.py`` checks both give each rank the same samples). The loader
assembles whole batches with numpy gathers instead of streaming row by row (two orders of magnitude
faster; ``benchmarks/bench_crm.py`` reports the data-loading share of a step). ``batch_size`` is global:
each rank takes ``batch_size / world_size`` (an error if it does not divide), every rank runs the same
number of steps (``drop_last`` + even batches), so DDP's gradient average is the gradient of the mean BCE
over the global batch.

Training: AdamW, BCE on the logit, optional warm-up + linear/cosine decay and gradient clipping; one
validation per epoch (exact AUC / log loss / GAUC over the whole split, predictions gathered across ranks,
:func:`reclora_ds.metrics.evaluate_predictions`); early stopping on validation AUC after ``patience``
epochs without improvement; the best model is kept in ``checkpoints/best`` and scored on the test split
at the end.

Run folder (written by rank 0 only)::

    config.yaml           the resolved CRMTrainConfig
    checkpoints/last/     model.safetensors + crm.json + trainer_state.pt, every checkpoint_every steps
                          and at every epoch end (atomic); a rerun resumes from it exactly
    checkpoints/best/     model.safetensors + crm.json of the best validation AUC (stage 2 loads it)
    tb/                   one TensorBoard event file per run (plus one per resume)
    metrics.json          per-epoch validation metrics, the best epoch, test metrics of the best model
    train_log.jsonl       one JSON record per log step, validation, resume and test

Resume: with ``resume=true`` (default) a run whose ``checkpoints/last`` exists continues from it: model,
optimizer, scheduler, epoch, step, best metric and patience counter, every rank's torch / numpy / Python
RNG state and the loader's position inside the epoch (the remaining batches, in the same order). On CPU
a run killed at any point and resumed ends with the same weights as an uninterrupted one
(``tests/training/test_crm_resume.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from reclora_ds import distributed as dist_utils
from reclora_ds.config import config_to_dict, save_config
from reclora_ds.cpu import enable_cpu_extras
from reclora_ds.data.histories import RetrievedHistories, load_retrieved
from reclora_ds.data.loader import DEFAULT_RECENT_LENGTH, CRMBatchLoader
from reclora_ds.data.processed import ProcessedDataset, metadata_sha256
from reclora_ds.files import write_json_atomic
from reclora_ds.metrics import evaluate_predictions
from reclora_ds.models.crm import CRMConfig, FeatureSpec
from reclora_ds.models.registry import build_crm
from reclora_ds.training.checkpoint import (
    WEIGHTS_FILE,
    CRMCheckpointInfo,
    checkpoint_exists,
    load_trainer_state,
    load_weights,
    resolve_checkpoint,
    rng_state,
    save_crm_checkpoint,
    set_rng_state,
)
from reclora_ds.training.crm_config import CRMTrainConfig
from reclora_ds.training.logger import MetricLogger, build_logger

log = logging.getLogger(__name__)

# Settings that fix the model or the order of the data: a resume with other values would not continue
# the same run, so it is refused.
CRM_RESUME_MUST_MATCH = (
    "model",
    "crm",
    "history_mode",
    "history_length",
    "retrieval_dir",
    "batch_size",
    "seed",
)
EVAL_SPLITS = ("valid", "test")


# ----------------------------------------------------------------------------------------------------------
# Reusable pieces (the benchmark and the DDP test use them too)
# ----------------------------------------------------------------------------------------------------------


def bce_loss(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of logits [B] against 0/1 labels [B]."""
    return F.binary_cross_entropy_with_logits(logit, label.to(logit.dtype))


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float = 0.0,
) -> torch.Tensor:
    """One optimizer step on ``batch`` (already on the model's device); returns the detached loss.

    ``model`` may be DDP-wrapped: its backward then averages the gradients over the ranks.
    """
    model.train()
    loss = bce_loss(model(batch).logit, batch["label"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def build_optimizer(
    model: nn.Module, cfg: CRMTrainConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over every parameter and its LambdaLR schedule (:func:`lr_factor`).

    The fused implementation (one kernel over all parameters) when the parameters live on the CPU or a GPU:
    the same update as the default one, 1.2-1.3 ms less per 128-sample step of the quickstart SIM on one
    CPU core (``benchmarks/bench_crm_forms.py``, "unfused AdamW"; docs/CRM_RESULTS.md, section 4).
    """
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, cfg.lr_schedule, cfg.warmup_steps, total_steps),
    )
    return optimizer, scheduler


def crm_config(cfg: CRMTrainConfig) -> CRMConfig:
    """The plain CRMConfig of a training config (the YAML section is a CRMConfig subclass)."""
    return CRMConfig(**dataclasses.asdict(cfg.crm))


def per_rank_batch(global_batch: int, world_size: int, what: str = "batch_size") -> int:
    """``global_batch / world_size``; an error when it does not divide."""
    if global_batch % world_size:
        raise ValueError(
            f"{what}={global_batch} is global and must be divisible by the world size {world_size}"
        )
    return global_batch // world_size


def open_retrieval(cfg: CRMTrainConfig) -> RetrievedHistories | None:
    """The retrieval folder of ``history_mode=retrieved`` (checked against the dataset and L), else None."""
    if cfg.history_mode != "retrieved":
        return None
    retrieved = load_retrieved(cfg.retrieval_dir, cfg.data_dir)
    retrieved.require_k(cfg.history_length)
    return retrieved


def history_coverage(dataset: ProcessedDataset, length: int) -> dict[str, dict[str, float]]:
    """Per split, how many samples have more prior behaviours than the ``length`` the CRM is given.

    ``{split: {"samples", "longer", "longer_fraction", "max_hist_len"}}``: with recent histories the older
    behaviours of the ``longer`` samples are cut off (truncated); with retrieved ones they are the samples
    whose L behaviours are a selection out of more.
    """
    out = {}
    for split in ("train", *EVAL_SPLITS):
        h = dataset.read_split(split, ["hist_len"]).column("hist_len").to_numpy()
        longer = int((h > length).sum())
        out[split] = {
            "samples": len(h),
            "longer": longer,
            "longer_fraction": longer / max(1, len(h)),
            "max_hist_len": int(h.max()) if len(h) else 0,
        }
    return out


def build_loader(
    cfg: CRMTrainConfig,
    dataset: ProcessedDataset,
    split: str,
    info: dist_utils.DistInfo,
    retrieved: RetrievedHistories | None = None,
) -> CRMBatchLoader:
    """This rank's loader of ``split``: shuffled with full batches for train, in order with padding for eval.

    ``retrieved``: the opened retrieval folder for ``history_mode=retrieved`` (:func:`open_retrieval`)."""
    train = split == "train"
    batch = (
        per_rank_batch(cfg.batch_size, info.world_size)
        if train
        else max(1, cfg.eval_batch_size // info.world_size)
    )
    return CRMBatchLoader(
        dataset,
        split,
        batch,
        history_length=cfg.history_length,
        history_mode=cfg.history_mode,
        retrieved=retrieved if retrieved is not None else open_retrieval(cfg),
        rank=info.rank,
        world_size=info.world_size,
        shuffle=train,
        seed=cfg.seed,
        drop_last=train,
        even_batches=True,
        recent_length=DEFAULT_RECENT_LENGTH if reads_short_term(cfg) else 0,
    )


def reads_short_term(cfg: CRMTrainConfig) -> bool:
    """Whether the CRM reads the batch's short-term window (``recent_*``): SIM with ``short_term_length``.
    Other models' training batches leave it out (it costs a gather); readers of a checkpoint always
    build it (the loader's default), so any CRM scores from their batches."""
    return cfg.model == "sim" and cfg.crm.short_term_length > 0


def unwrap(model: nn.Module) -> nn.Module:
    """The CRM inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, device: torch.device, cpu_allreduce: str = "auto") -> nn.Module:
    """DDP-wrap ``model`` when a multi-rank process group exists (rank 0's weights are broadcast).

    On the CPU, ``cpu_allreduce`` picks the gradient transport (``CRMTrainConfig.cpu_allreduce``): ``shm``
    or ``auto`` register DeepSpeed's shared-memory all-reduce (:mod:`reclora_ds.cpu.shm_allreduce`; ``auto``
    falls back to gloo when it cannot be used), ``gloo`` keeps DDP's own.
    """
    if not dist_utils.is_distributed():
        return model
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )
    if device.type == "cpu" and cpu_allreduce != "gloo":
        enable_cpu_extras(ddp_model=ddp, allreduce=cpu_allreduce)
    return ddp


def resolve_device(name: str, info: dist_utils.DistInfo) -> torch.device:
    """``auto``: the rank's GPU when CUDA is available, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available")
    return torch.device("cuda", info.local_rank % torch.cuda.device_count())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict(
    model: nn.Module, loader: CRMBatchLoader, device: torch.device, progress: bool = False
) -> dict[str, np.ndarray]:
    """Eval-mode predictions of ``model`` on this rank's part of ``loader``'s split.

    Returns numpy ``sample_id`` int64 [n], ``label`` float64 [n], ``prob`` float64 [n] (padding repeats
    included; the metrics de-duplicate by sample_id).
    """
    model.eval()
    ids, labels, probs = [], [], []
    for batch in tqdm(loader, desc=f"eval {loader.split}", leave=False, disable=not progress):
        logit = model(to_device(batch, device)).logit
        ids.append(batch["sample_id"].numpy())
        labels.append(batch["label"].numpy())
        probs.append(torch.sigmoid(logit.double()).cpu().numpy())
    return {
        "sample_id": np.concatenate(ids) if ids else np.zeros(0, np.int64),
        "label": np.concatenate(labels).astype(np.float64) if labels else np.zeros(0),
        "prob": np.concatenate(probs) if probs else np.zeros(0),
    }


# ----------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CRMTrainerState:
    """The training position and early-stopping state saved in ``trainer_state.pt``."""

    epoch: int = 0
    """The epoch in progress (or the next one once an epoch has ended)."""
    step: int = 0
    """Optimizer steps done."""
    best_auc: float = -math.inf
    best_epoch: int = -1
    best_step: int = 0
    bad_epochs: int = 0
    """Epochs since the last improvement of validation AUC."""
    stopped: bool = False
    """Training is over (early stop, max_steps or all epochs done): a resume goes straight to the test."""
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Validation metrics of every epoch so far."""


class CRMRecipe:
    """Stage-1 training of one CRM: ``setup -> train -> test -> cleanup`` (module docstring).

    Args:
        cfg: the resolved training config.
    """

    def __init__(self, cfg: CRMTrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.state = CRMTrainerState()
        self.logger: MetricLogger | None = None

    # ------------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        backend = "gloo" if cfg.device == "cpu" else None
        self.info = dist_utils.init_distributed(backend=backend)
        self.is_main = self.info.is_main
        self.device = resolve_device(cfg.device, self.info)
        if self.device.type == "cpu":
            enable_cpu_extras(kernels=cfg.cpu_kernels, allocator=True)
        self.dataset = ProcessedDataset(cfg.data_dir)
        self.spec = FeatureSpec.from_metadata(self.dataset.metadata)

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)  # noqa: NPY002 (the legacy global RNG, for any library that reads it)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        self.model = build_crm(cfg.model, crm_config(cfg), self.spec).to(self.device)
        torch.manual_seed(cfg.seed + self.info.rank)  # dropout masks differ between ranks

        self.retrieved = open_retrieval(cfg)
        self.train_loader = build_loader(cfg, self.dataset, "train", self.info, self.retrieved)
        self.eval_loaders = {
            split: build_loader(cfg, self.dataset, split, self.info, self.retrieved) for split in EVAL_SPLITS
        }
        self.coverage = history_coverage(self.dataset, cfg.history_length)
        train = self.coverage["train"]
        log.info(
            "%s histories of length %d%s: %s of %s training samples (%.1f%%) have a longer history%s",
            cfg.history_mode,
            cfg.history_length,
            f" from {cfg.retrieval_dir}" if self.retrieved is not None else "",
            f"{train['longer']:,}",
            f"{train['samples']:,}",
            100 * train["longer_fraction"],
            " (the retrieval selects from their whole history)"
            if self.retrieved is not None
            else " and are truncated to their most recent behaviours",
        )
        self._users = {split: self._user_lookup(split) for split in EVAL_SPLITS}
        steps_per_epoch = len(self.train_loader)
        if steps_per_epoch == 0:
            raise ValueError(
                f"the training split has fewer samples per rank than one batch of {self.train_loader.batch_size}"
            )
        self.total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.ddp_model = wrap_ddp(self.model, self.device, cfg.cpu_allreduce)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, self.total_steps)

        self.last_dir = self.out / "checkpoints" / "last"
        self.best_dir = self.out / "checkpoints" / "best"
        resumed = cfg.resume and checkpoint_exists(self.last_dir)
        if resumed:
            self._resume()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self.logger = build_logger(self.out / "tb", purge_step=self.state.step if resumed else None)
        self.logger.log_text(
            "config", "```yaml\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False) + "```"
        )
        if resumed:
            self._record({"event": "resume", "step": self.state.step, "epoch": self.state.epoch})
            log.info(
                "resumed from %s at step %d (epoch %d)", self.last_dir, self.state.step, self.state.epoch
            )
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            "%s: %s params on %s, %d rank(s), global batch %d (%d per rank), %d steps/epoch, train %d samples",
            cfg.model,
            f"{n_params:,}",
            self.device,
            self.info.world_size,
            cfg.batch_size,
            self.train_loader.batch_size,
            steps_per_epoch,
            self.dataset.metadata["splits"]["train"]["rows"],
        )
        dist_utils.barrier()

    def _user_lookup(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(sorted sample ids, their user_index) of a split, for GAUC (OOV user ids would merge users)."""
        table = self.dataset.read_split(split, ["sample_id", "user_index"])
        ids = table.column("sample_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        return ids[order], table.column("user_index").to_numpy()[order].astype(np.int64)

    def _resume(self) -> None:
        trainer = load_trainer_state(self.last_dir)
        saved = trainer["config"]
        current = config_to_dict(self.cfg)
        differ = [k for k in CRM_RESUME_MUST_MATCH if saved.get(k) != current.get(k)]
        if differ or trainer["world_size"] != self.info.world_size:
            raise ValueError(
                f"{self.last_dir} was written by a run with other {differ or ['world_size']}: "
                "resume it with the same settings, or set resume=false / another output_dir"
            )
        load_weights(self.model, resolve_checkpoint(self.last_dir) / WEIGHTS_FILE)
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.train_loader.load_state_dict(trainer["loader"])
        self.state = CRMTrainerState(**trainer["trainer"])
        set_rng_state(trainer["rng"][self.info.rank])

    # ------------------------------------------------------------------------------------------------------
    # train
    # ------------------------------------------------------------------------------------------------------

    def train(self) -> None:
        cfg, state = self.cfg, self.state
        loader = self.train_loader
        while not state.stopped and state.epoch < cfg.epochs:
            epoch = state.epoch
            loader.set_epoch(epoch)  # keeps a resumed position inside this epoch
            bar = tqdm(
                total=len(loader),
                initial=loader.state_dict()["batches_yielded"],
                desc=f"epoch {epoch}",
                disable=not (self.is_main and cfg.progress),
                dynamic_ncols=True,
                leave=False,
            )
            window = _PerfWindow()
            hit_max = False
            for batch in loader:
                window.data_done()
                loss = train_step(
                    self.ddp_model,
                    to_device(batch, self.device),
                    self.optimizer,
                    self.scheduler,
                    cfg.grad_clip,
                )
                state.step += 1
                window.step_done(loss, len(batch["label"]))
                bar.update(1)
                if state.step % cfg.log_every == 0:
                    self._log_train(window, bar)
                    window = _PerfWindow()
                hit_max = bool(cfg.max_steps) and state.step >= cfg.max_steps
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and not hit_max:
                    self.save_last()
                    window.restart()
                if hit_max:
                    break
            bar.close()
            self._end_epoch(epoch, last_epoch=hit_max or epoch + 1 >= cfg.epochs)

    def _end_epoch(self, epoch: int, last_epoch: bool) -> None:
        """Validate, keep the best, count patience, then checkpoint the position after this epoch."""
        state = self.state
        metrics = self.validate("valid")
        record = {"epoch": epoch, "step": state.step, **metrics}
        state.history.append(record)
        self.logger.log_dict({f"eval/{k}": metrics[k] for k in ("auc", "logloss", "gauc", "ece")}, state.step)
        improved = metrics["auc"] > state.best_auc or state.best_epoch < 0  # nan AUC: keep the first
        if improved:
            state.best_auc = metrics["auc"] if not math.isnan(metrics["auc"]) else -math.inf
            state.best_epoch, state.best_step, state.bad_epochs = epoch, state.step, 0
            self.save_best(metrics)
        else:
            state.bad_epochs += 1
        self._record({"event": "valid", **record, "best_epoch": state.best_epoch})
        log.info(
            "epoch %d step %d: valid auc %.4f logloss %.4f gauc %.4f%s",
            epoch,
            state.step,
            metrics["auc"],
            metrics["logloss"],
            metrics["gauc"],
            " (best)" if improved else f" (best {state.best_auc:.4f} at epoch {state.best_epoch})",
        )
        state.epoch = epoch + 1
        if state.bad_epochs >= self.cfg.patience:
            log.info("early stopping: no better validation AUC for %d epoch(s)", state.bad_epochs)
            state.stopped = True
        if last_epoch:
            state.stopped = True
        self.save_last()
        self._write_metrics()

    def _log_train(self, window: _PerfWindow, bar: tqdm) -> None:
        # the mean loss over the window and all ranks (every rank reaches this at the same step)
        totals = dist_utils.all_gather_variable(
            torch.tensor([[window.loss_sum, window.steps]], dtype=torch.float64)
        )
        loss = float(totals[:, 0].sum() / totals[:, 1].sum())
        values = {
            "train/loss": loss,
            "train/lr": self.scheduler.get_last_lr()[0],
            "perf/samples_per_s": window.samples * self.info.world_size / max(window.elapsed, 1e-9),
            "perf/data_share": window.data_time / max(window.elapsed, 1e-9),
        }
        self.logger.log_dict(values, self.state.step)
        self._record({"step": self.state.step, "epoch": self.state.epoch, **values})
        bar.set_postfix(loss=f"{loss:.4f}", sps=f"{values['perf/samples_per_s']:,.0f}")

    # ------------------------------------------------------------------------------------------------------
    # validate / test
    # ------------------------------------------------------------------------------------------------------

    def validate(self, split: str = "valid") -> dict[str, float]:
        """Exact metrics of the current model over the whole ``split`` (gathered across ranks)."""
        pred = predict(
            self.model, self.eval_loaders[split], self.device, progress=self.is_main and self.cfg.progress
        )
        ids, users = self._users[split]
        user = users[np.searchsorted(ids, pred["sample_id"])]
        return evaluate_predictions(pred["label"], pred["prob"], user, pred["sample_id"])

    def test(self) -> dict[str, Any]:
        """Load the best checkpoint on every rank, score it on the test split, write metrics.json."""
        dist_utils.barrier()
        load_weights(self.model, resolve_checkpoint(self.best_dir) / WEIGHTS_FILE)
        metrics = self.validate("test")
        self.logger.log_dict({f"test/{k}": metrics[k] for k in ("auc", "logloss", "gauc")}, self.state.step)
        self._record({"event": "test", "best_epoch": self.state.best_epoch, **metrics})
        log.info(
            "test (best epoch %d): auc %.4f logloss %.4f gauc %.4f",
            self.state.best_epoch,
            metrics["auc"],
            metrics["logloss"],
            metrics["gauc"],
        )
        return self._write_metrics(test=metrics)

    # ------------------------------------------------------------------------------------------------------
    # save
    # ------------------------------------------------------------------------------------------------------

    def checkpoint_info(self, metrics: dict[str, float] | None = None) -> CRMCheckpointInfo:
        cfg = self.cfg
        return CRMCheckpointInfo(
            model=cfg.model,
            config=crm_config(cfg),
            feature_spec=self.spec,
            hidden_dim=self.model.hidden_dim,
            history_mode=cfg.history_mode,
            history_length=cfg.history_length,
            retrieval_dir=str(Path(cfg.retrieval_dir).resolve()) if self.retrieved is not None else "",
            retrieval_sha256=self.retrieved.sidecar_sha256 if self.retrieved is not None else "",
            dataset={
                "name": self.dataset.metadata["dataset"],
                "data_dir": str(Path(cfg.data_dir).resolve()),
                "metadata_sha256": metadata_sha256(cfg.data_dir),
            },
            step=self.state.step,
            epoch=self.state.epoch,
            metrics=dict(metrics or {}),
            train_config=config_to_dict(cfg),
        )

    def save_last(self) -> None:
        """Collective: every rank's RNG state goes to rank 0, which writes checkpoints/last atomically."""
        rngs = [dist_utils.broadcast_object(rng_state(), src=r) for r in range(self.info.world_size)]
        if self.is_main:
            trainer = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "loader": self.train_loader.state_dict(),
                "trainer": dataclasses.asdict(self.state),
                "rng": rngs,
                "world_size": self.info.world_size,
                "config": config_to_dict(self.cfg),
            }
            save_crm_checkpoint(self.last_dir, self.model, self.checkpoint_info(), trainer)
        dist_utils.barrier()

    def save_best(self, metrics: dict[str, float]) -> None:
        if self.is_main:
            save_crm_checkpoint(self.best_dir, self.model, self.checkpoint_info(metrics))
        dist_utils.barrier()

    def _record(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.out / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def _write_metrics(self, test: dict[str, float] | None = None) -> dict[str, Any]:
        state = self.state
        result: dict[str, Any] = {
            "model": self.cfg.model,
            "steps": state.step,
            "epochs_run": len(state.history),
            "stopped_early": state.bad_epochs >= self.cfg.patience,
            "best": {"epoch": state.best_epoch, "step": state.best_step, "valid_auc": state.best_auc},
            "valid": state.history,
            "history": {
                "mode": self.cfg.history_mode,
                "length": self.cfg.history_length,
                "retrieval_dir": self.cfg.retrieval_dir if self.retrieved is not None else "",
                "samples_with_longer_history": self.coverage,
            },
        }
        if test is not None:
            result["test"] = test
        if self.is_main:
            write_json_atomic(self.out / "metrics.json", result)
        return result

    # ------------------------------------------------------------------------------------------------------
    # cleanup
    # ------------------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()
        dist_utils.destroy()  # after a barrier


class _PerfWindow:
    """Wall time split into data loading and compute over the steps since the last log record."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.steps = 0
        self.samples = 0
        self.data_time = 0.0
        self.elapsed = 0.0
        self._mark = time.perf_counter()

    def restart(self) -> None:
        """Start timing afresh (after a checkpoint write, which is neither data nor compute)."""
        self._mark = time.perf_counter()

    def data_done(self) -> None:
        now = time.perf_counter()
        self.data_time += now - self._mark
        self.elapsed += now - self._mark
        self._mark = now

    def step_done(self, loss: torch.Tensor, samples: int) -> None:
        now = time.perf_counter()
        self.loss_sum += float(loss)
        self.steps += 1
        self.samples += samples
        self.elapsed += now - self._mark
        self._mark = now


def run_crm_training(cfg: CRMTrainConfig) -> dict[str, Any]:
    """Train, validate, keep the best and test it: the whole stage-1 recipe. Returns metrics.json's content."""
    recipe = CRMRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
        return recipe.test()
    finally:
        recipe.cleanup()
