"""Typed stage configs: YAML files plus dotted command-line overrides, validated before any heavy work.

Every stage has one dataclass. A YAML file gives its fields (nested dataclasses are nested mappings);
``key.sub=value`` overrides on the command line are parsed as YAML scalars and applied on top. All
problems (unknown keys, wrong types, failed ``__post_init__`` checks) are collected and reported together,
with the valid keys, in one :class:`ConfigError`. The resolved config is written beside every output with
:func:`save_config`.

Example::

    cfg = load_config(PrepareConfig, "launch/configs/quickstart.yaml", ["prepare.min_history=10"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from reclora_ds.models.crm import CRMConfig
from reclora_ds.models.plora import PLoRAConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """All problems found in a config, reported at once."""

    def __init__(self, problems: list[str], source: str):
        self.problems = problems
        super().__init__(f"invalid config ({source}):\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------------------------------------
# Stage dataclasses
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GoodreadsOptions:
    """Options of the GoodReads reader."""

    interactions_glob: str = "goodreads_interactions*.json.gz"
    """Interaction files (json.gz lines) relative to ``raw_dir``; the csv variant is used when none match."""
    books_glob: str = "goodreads_books*.json.gz"
    """Book metadata files (json.gz lines) relative to ``raw_dir``; optional for the csv variant."""
    timestamp_field: str = "date_added"
    """Which interaction date orders the rows: ``date_added`` (default) or ``date_updated``."""

    def __post_init__(self) -> None:
        if self.timestamp_field not in ("date_added", "date_updated"):
            raise ValueError(
                f"timestamp_field must be 'date_added' or 'date_updated', got {self.timestamp_field!r}"
            )


@dataclasses.dataclass
class PrepareConfig:
    """Stage 0: raw files -> processed, time-ordered samples (see ``reclora_ds.data.prepare``)."""

    dataset: str = "ml-25m"
    """Raw layout: ``ml-25m`` (ratings.csv + movies.csv; also ml-latest-small), ``ml-1m`` (*.dat), ``goodreads``."""
    raw_dir: str = ""
    """Folder holding the unchanged raw files. Empty = the bundled ml-latest-small sample."""
    output_dir: str = "outputs/processed"
    """Where the processed dataset (shards + metadata.json + config.yaml) is written."""
    min_history: int = 5
    """A row becomes a sample only if its user has at least this many earlier rows (the authors' filter)."""
    kcore: int = 0
    """If > 0, iteratively keep only users and items with at least this many rows (the paper's '5-core')."""
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train/valid/test fractions of the samples, in global (timestamp, user, item) order."""
    few_shot_size: int = 70_000
    """Size of the fixed, seeded uniform subset of train that stage 2 tunes on (all of train when fewer)."""
    seed: int = 42
    """Seed of the few-shot subset."""
    shards_per_split: int = 8
    """Parquet shards per split (a multiple of the world size lets ``split_dataset_by_node`` split by file)."""
    batch_rows: int = 1_000_000
    """Rows per Arrow batch while streaming raw files (bounds memory of the reading step)."""
    strict: bool = False
    """Turn every counted drop into an error that names the file and line."""
    goodreads: GoodreadsOptions = dataclasses.field(default_factory=GoodreadsOptions)
    """Options of the GoodReads reader (used only with ``dataset=goodreads``)."""

    def __post_init__(self) -> None:
        from reclora_ds.data.specs import DATASET_SPECS

        if self.dataset not in DATASET_SPECS:
            raise ValueError(f"dataset must be one of {sorted(DATASET_SPECS)}, got {self.dataset!r}")
        if self.min_history < 0:
            raise ValueError(f"min_history must be >= 0, got {self.min_history}")
        if self.kcore < 0:
            raise ValueError(f"kcore must be >= 0, got {self.kcore}")
        if len(self.split) != 3 or any(f <= 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"split must be three positive fractions summing to 1, got {list(self.split)}")
        if self.few_shot_size < 1:
            raise ValueError(f"few_shot_size must be >= 1, got {self.few_shot_size}")
        if self.shards_per_split < 1:
            raise ValueError(f"shards_per_split must be >= 1, got {self.shards_per_split}")
        if self.batch_rows < 1000:
            raise ValueError(f"batch_rows must be >= 1000, got {self.batch_rows}")


# ----------------------------------------------------------------------------------------------------------
# Loading, overriding, validating, saving
# ----------------------------------------------------------------------------------------------------------


def field_paths(cls: type) -> list[str]:
    """All dotted keys of a config dataclass, nested ones included (``goodreads.books_glob``)."""
    paths: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            paths.extend(f"{f.name}.{sub}" for sub in field_paths(tp))
        else:
            paths.append(f.name)
    return paths


def parse_overrides(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``["a.b=3", "c=[1, 2]"]`` -> nested dict; values are parsed as YAML scalars/flow collections."""
    tree: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} is not of the form key.sub=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problems.append(f"override {item!r}: value is not valid YAML ({exc.__class__.__name__})")
            continue
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {part!r} is set to a value and used as a section")
                break
        else:
            node[parts[-1]] = value
    return tree, problems


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge, ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        problems.append(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, arg, key, trial)
            if not trial:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
            return value
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                problems.append(f"{key}: expected {len(args)} items, got {len(value)}")
                return value
            items = [_coerce(v, a, f"{key}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{key}: expected a mapping, got {value!r}")
        return dict(value) if isinstance(value, Mapping) else value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. raw_dir=2024 is still a path
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    problems.append(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, problems: list[str]) -> T | None:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            problems.append(f"unknown key {dotted!r}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                problems.append(f"{dotted}: expected a section (mapping), got {value!r}")
                continue
            sub = _build(tp, value, f"{dotted}.", problems)
            if sub is not None:
                kwargs[key] = sub
        else:
            kwargs[key] = _coerce(value, tp, dotted, problems)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        problems.append(f"{prefix or ''}{exc}" if not prefix else f"{prefix.rstrip('.')}: {exc}")
        return None


def config_from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Build and validate ``cls`` from a nested mapping; raise one ConfigError listing every problem."""
    problems: list[str] = []
    cfg = _build(cls, data, "", problems)
    if problems or cfg is None:
        problems.append("valid keys: " + ", ".join(field_paths(cls)))
        raise ConfigError(problems, source)
    return cfg


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (empty file: ``{}``); ConfigError when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"], str(path))
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from exc
    if not isinstance(loaded, Mapping):
        raise ConfigError([f"top level must be a mapping, got {type(loaded).__name__}"], str(path))
    return dict(loaded)


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), section: str | None = None
) -> T:
    """Load ``cls`` from a YAML file (optionally one ``section`` of it) with dotted overrides on top.

    Overrides may be written with or without the section prefix (``min_history=3`` or
    ``prepare.min_history=3`` when ``section="prepare"``).
    """
    source = str(path) if path else "<defaults>"
    data = read_yaml_mapping(path) if path is not None else {}
    if section is not None and path is not None:
        data = dict(data.get(section, {}) or {})
    tree, problems = parse_overrides(overrides)
    if section is not None and section in tree and isinstance(tree[section], dict):
        tree = merge({k: v for k, v in tree.items() if k != section}, tree[section])
    if problems:
        raise ConfigError(problems + ["valid keys: " + ", ".join(field_paths(cls))], source)
    return config_from_dict(cls, merge(data, tree), source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain (YAML/JSON-safe) dict of a config dataclass; tuples become lists."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (sorted as declared) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------------------
# Stage 1: the CRM
# ----------------------------------------------------------------------------------------------------------

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
    """``sim`` (the paper's CRM), ``din`` or ``logreg`` (baseline). The paper's "w/o long retriever" CRM
    is the default SIM with ``history_mode=recent``: a SIM without a search unit over the most recent 60
    is DIN on them."""
    crm: CRMConfig = dataclasses.field(default_factory=CRMConfig)
    """Model settings of the CRM (``reclora_ds.models.crm.CRMConfig``): sizes, dropout, SIM's search."""
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
    on one node; a 2-rank SIM step took 11.7 ms with it against 17.8 ms through gloo here), ``gloo`` (TCP),
    or ``auto`` (``shm`` when it can be used, else ``gloo``). See ``reclora_ds.shm_allreduce``."""
    cpu_kernels: bool = True
    """On the CPU, build (once, cached) and use the C++ kernels of SIM's soft search and DIN's attention;
    PyTorch ops are used when they cannot be built. Later readers of the checkpoint (``load_crm``) load them
    whatever this says. See ``reclora_ds.cpu_kernels``."""
    progress: bool = True
    """tqdm progress bars on rank 0."""

    def __post_init__(self) -> None:
        from reclora_ds.data.loader import HISTORY_MODES
        from reclora_ds.models.registry import CRM_MODELS

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


# ----------------------------------------------------------------------------------------------------------
# Stage 2: RecLLM (frozen LLM + frozen CRM + PLoRA), section ``plora`` of launch/configs/plora_*.yaml
# ----------------------------------------------------------------------------------------------------------

PLORA_MODES = ("plora", "lora", "zero_shot")
SHORT_HISTORIES = ("recent", "retrieved")
LONG_HISTORIES = ("auto", "recent", "retrieved")


@dataclasses.dataclass
class PLoRATrainConfig:
    """Stage 2: tune PLoRA (or LoRA) on the few-shot split with DeepSpeed ZeRO-2 (``training.plora_recipe``).

    Defaults are the paper's (reclora-facts sections 1 and 6): N_m = 16, r = 8, alpha = 16 on q_proj/v_proj,
    AdamW without weight decay, linear schedule, global batch 256, retrieved histories (10 in the prompt,
    the CRM's own for the CRM). ``launch/configs/plora_<dataset>.yaml`` hold each dataset's settings.
    """

    data_dir: str = "runs/quickstart/prepare"
    """Processed dataset (``reclora-ds prepare``)."""
    output_dir: str = "runs/quickstart/plora"
    """Run folder: config.yaml, ds_config.json, checkpoints/, adapter/, tb/, metrics.json."""
    crm_path: str = "runs/quickstart/sim"
    """Stage-1 run folder (its checkpoints/best) or checkpoint folder; mode ``plora`` only."""
    backbone: str = "default"
    """``default`` (SmolLM2-135M-Instruct) or a local Hugging Face causal-LM folder (e.g. Vicuna-7B)."""
    mode: str = "plora"
    """``plora`` (RecLoRA), ``lora`` (peft LoRA: "w/o meta-LoRA") or ``zero_shot`` (evaluation only)."""
    adapter: PLoRAConfig = dataclasses.field(default_factory=PLoRAConfig)
    """Bank and gate settings of mode ``plora`` (``reclora_ds.models.plora.PLoRAConfig``); ``crm_dim`` is
    replaced by the loaded CRM's state width."""
    lora_rank: int = 8
    """Rank of mode ``lora`` (8; 128 for "w/o meta-LoRA, same params")."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator of mode ``lora`` (peft ``lora_alpha``; the update is scaled by alpha / rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input of mode ``lora`` (peft ``lora_dropout``)."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Module-name suffixes of the nn.Linear layers that mode ``lora`` adapts (peft ``target_modules``)."""
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
    crm_train_mode: bool = False
    """Keep the frozen CRM's dropout active (the authors' code); default eval mode."""
    train_split: str = "fewshot"
    """The split the LLM is tuned on (the few-shot subset of train)."""
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
    gradient_checkpointing: bool = False
    """Activation checkpointing of the LLM's layers (the paper uses it for N_m = 16)."""
    load_in_8bit: bool = False
    """Load the frozen LLM in 8 bits with bitsandbytes (CUDA only), as the paper does on V100s."""
    attn_implementation: str = "sdpa"
    """``sdpa`` or ``eager``."""
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
    progress: bool = True
    """tqdm progress bars on rank 0."""

    def __post_init__(self) -> None:
        if self.mode not in PLORA_MODES:
            raise ValueError(f"mode must be one of {PLORA_MODES}, got {self.mode!r}")
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
        if self.lora_rank < 1 or not self.lora_alpha > 0:
            raise ValueError(
                f"need lora_rank >= 1 and lora_alpha > 0, got {self.lora_rank}, {self.lora_alpha}"
            )
        if not self.eval_splits or any(
            s not in ("valid", "test", "train", "fewshot") for s in self.eval_splits
        ):
            raise ValueError(f"eval_splits must name splits (valid, test, ...), got {list(self.eval_splits)}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be sdpa or eager, got {self.attn_implementation!r}")
        self.lora_target_modules = tuple(self.lora_target_modules)
        self.eval_splits = tuple(self.eval_splits)
