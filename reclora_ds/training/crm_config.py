"""The settings of stage 1 (``launch/train_sim.py``): the CRM trained on the full training split."""

from __future__ import annotations

import dataclasses

from reclora_ds.data.loader import DEFAULT_RECENT_LENGTH, HISTORY_MODES
from reclora_ds.models.crm import CRMConfig
from reclora_ds.models.registry import CRM_MODELS

LR_SCHEDULES = ("constant", "linear", "cosine")
CPU_ALLREDUCES = ("auto", "shm", "gloo")


@dataclasses.dataclass
class CRMTrainConfig:
    """Stage 1: train the CRM on the full training split (``reclora_ds.training.crm_recipe``).

    Defaults are the bundled-data / ML-1M choices inside the paper's search ranges (Appendix B.1:
    embedding {32, 64}, dropout {0, 0.1, 0.2}, lr {1e-3, 5e-4, 1e-4}, AdamW, batch 64..1024, attention /
    DNN layers {1, 2, 3} of {64, 128, 256}); ``launch/configs/sim_<dataset>.yaml`` hold each dataset's.
    """

    data_dir: str = "runs/quickstart/prepare"
    """Processed dataset (the output of ``reclora-ds prepare``)."""
    output_dir: str = "runs/quickstart/sim"
    """Run folder: config.yaml, checkpoints/{last,best}, tb/, metrics.json, train_log.jsonl."""
    model: str = "sim"
    """A registry CRM (``reclora_ds.models.registry.CRM_MODELS``): ``sim`` (the paper's CRM), ``din``,
    ``logreg`` or a Table 2 baseline. The paper's "w/o long retriever" CRM is the default SIM with
    ``history_mode=recent``: its long-term unit then reads the most recent 60 instead of the retrieved
    top-60 (its short-term unit reads the most recent ``crm.short_term_length`` either way)."""
    crm: CRMConfig = dataclasses.field(default_factory=CRMConfig)
    """Model settings of the CRM (``reclora_ds.models.crm.CRMConfig``): sizes, dropout, SIM's search.
    SIM's defaults include its short-term unit over the last 10 behaviours and behaviour ages."""
    history_mode: str = "retrieved"
    """The behaviours each sample gives the CRM. ``retrieved`` (the paper, App. B.2): the ``history_length``
    behaviours of the sample's *whole* prior history most similar to the target, re-sorted into time
    order, from the retrieval folder ``retrieval_dir`` (the same retrieval as the prompts'); pair it with
    ``crm.search=precomputed``. ``recent``: the last ``history_length`` behaviours (the "w/o long
    retriever" ablation with 60; or the window SIM's own ``soft`` / ``hard`` search scans, e.g. 256)."""
    history_length: int = 60
    """L, behaviours per sample given to the model: K_long = 60 retrieved (a K the retrieval folder holds),
    or the length of the recent window. The run logs how many samples have a longer history."""
    retrieval_dir: str = "runs/quickstart/retrieval"
    """Retrieval folder (``tools/retrieve_histories.py``: ``rows_k<L>.npy``...) for ``history_mode=retrieved``;
    the pipeline sets it to its retrieval stage's output."""
    epochs: int = 10
    """Maximum number of passes over the training split (early stopping usually ends sooner)."""
    batch_size: int = 256
    """Global batch size (all ranks together); each rank takes batch_size / world_size (range 64..1024)."""
    eval_batch_size: int = 1024
    """Global batch size of validation and test (no gradients, so larger)."""
    lr: float = 5e-4
    """AdamW peak learning rate (paper range {1e-3, 5e-4, 1e-4})."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (applied to every parameter, embeddings included)."""
    lr_schedule: str = "constant"
    """``constant``, ``linear`` (to 0 at the last step) or ``cosine``, after ``warmup_steps`` of linear warm-up."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to ``lr``."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    patience: int = 2
    """Early stopping: stop after this many epochs without a better validation AUC."""
    seed: int = 42
    """Seed of the model init, the data order and dropout (dropout also gets the rank)."""
    checkpoint_every: int = 500
    """Steps between overwrites of checkpoints/last (it is also written at every epoch end)."""
    log_every: int = 50
    """Steps between train/loss, train/lr and perf/* records."""
    max_steps: int = 0
    """Stop after this many optimizer steps in all (then validate and test); 0 = no limit."""
    resume: bool = True
    """Continue from checkpoints/last in ``output_dir`` when it exists."""
    device: str = "auto"
    """``auto`` (the rank's GPU when CUDA is available, else CPU), ``cpu`` or ``cuda``."""
    num_threads: int = 0
    """torch intra-op threads per process; 0 keeps torch's default (OMP_NUM_THREADS, 1 under torchrun)."""
    cpu_allreduce: str = "auto"
    """How DDP averages gradients between CPU ranks: ``shm`` (DeepSpeed's shared-memory kernel, all ranks
    on one node; measured against gloo in docs/CRM_RESULTS.md section 4), ``gloo`` (TCP), or ``auto``
    (``shm`` when it can be used, else ``gloo``). See ``reclora_ds.cpu.shm_allreduce``."""
    cpu_kernels: bool = True
    """On the CPU, build (once, cached) and use the C++ kernels of SIM's soft search and DIN's attention
    in stage 1; PyTorch ops are used when they cannot be built, and by every later reader of the checkpoint
    (same values up to float rounding). See ``reclora_ds.cpu``."""
    progress: bool = True
    """tqdm progress bars on rank 0."""

    def __post_init__(self) -> None:
        if self.model not in CRM_MODELS:
            raise ValueError(f"model must be one of {sorted(CRM_MODELS)}, got {self.model!r}")
        if self.history_mode not in HISTORY_MODES:
            raise ValueError(f"history_mode must be one of {HISTORY_MODES}, got {self.history_mode!r}")
        if self.history_mode == "retrieved" and not self.retrieval_dir:
            raise ValueError(
                "history_mode=retrieved needs retrieval_dir (the retrieval stage's output folder)"
            )
        if self.model == "sim" and self.history_mode == "retrieved" and self.crm.search != "precomputed":
            raise ValueError(
                f"crm.search={self.crm.search} is SIM's own search over a window of the history, but "
                "history_mode=retrieved already gives the retrieved top-K: use crm.search=precomputed, or "
                "history_mode=recent with history_length = the window the search scans (e.g. 256)"
            )
        if self.model == "sim" and self.crm.short_term_length > DEFAULT_RECENT_LENGTH:
            raise ValueError(
                f"crm.short_term_length={self.crm.short_term_length}: at most {DEFAULT_RECENT_LENGTH}, the "
                "short-term window every CRM batch carries (reclora_ds.data.loader.DEFAULT_RECENT_LENGTH; "
                "stage 2 and the CRM-state readers build their batches with it)"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        for name in ("history_length", "epochs", "batch_size", "eval_batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "max_steps", "num_threads", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, grad_clip >= 0; got {self.lr}, {self.weight_decay}, {self.grad_clip}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.cpu_allreduce not in CPU_ALLREDUCES:
            raise ValueError(f"cpu_allreduce must be one of {CPU_ALLREDUCES}, got {self.cpu_allreduce!r}")
