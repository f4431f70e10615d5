"""Shared pieces of the stage-1 conventional recommenders (CRM): config, features, DIN unit, tower.

Shape legend:
    B    batch (samples)
    L    history length given to the model (SIM: the lifelong window; DIN: the most recent K)
    K    behaviours kept by SIM's general search unit (``top_k``)
    F    categorical fields of a sample (``metadata["fields"]``: user_id, ..., item_id, genre, ...)
    E    embedding width of one field (``embedding_dim``)
    D    width of an item / behaviour: ``E * len(behaviour_fields)`` when its field embeddings are
         concatenated (``item_merge="concat"``), ``E`` when they are summed (``item_merge="sum"``)
    H    hidden width of the attention MLP (``attention_hidden``)
    d_c  width of the CRM state, the tower's last hidden layer (256), which drives the PLoRA gates

The models (:class:`reclora_ds.models.din.DIN`, :class:`reclora_ds.models.sim.SIM`,
:class:`reclora_ds.models.logreg.LogisticRegression`) take the loader's batch (a dict of tensors, see
:mod:`reclora_ds.data.loader`) and return one :class:`CRMOutput` ``(logit [B], hidden [B, d_c])``.

Embeddings: **one table per field** (:class:`FieldEmbeddings`), plus one table for the rating bucket. The
authors' code uses one shared table with per-field offsets; the two are the same model (each id only ever
reads its own rows), but separate tables keep vocabularies readable in a state dict and let a history
field read the very table its target field reads (``hist_item`` and ``item_id`` share ``item_id``'s rows),
which is what makes ``t - h``, ``t * h`` and SIM's inner-product search meaningful.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from reclora_ds.batch import HIST_AGE, PAD_ID, RATING_BUCKETS, history_key
from reclora_ds.models import ops

SEARCHES = ("soft", "hard", "precomputed")
ITEM_MERGES = ("concat", "sum")
FIELD_SOURCES = ("user", "item")

# Age buckets of ``behaviour_age``: 0 = pad, b = 1 + floor(log2(age)) for age >= 1 (ages 1, 2-3, 4-7, ...),
# every age from 2^(AGE_BUCKETS - 2) on shares the last bucket.
AGE_BUCKETS = 16

# Std of the normal init of every embedding table (small, so the first attention weights and inner
# products start near zero instead of at the O(E) scale nn.Embedding's N(0, 1) gives).
EMBEDDING_INIT_STD = 0.01

# Per-dataset settings of the authors' runs (reclora-facts section 2); everything else keeps its default.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "ml-25m": {"embedding_dim": 64, "attention_layers": 3},
    "ml-1m": {"embedding_dim": 64, "attention_layers": 1},
    "goodreads": {"embedding_dim": 32, "attention_layers": 1},
}


# SIM's settings in checkpoints written before ``short_term_length`` and ``behaviour_age`` existed (the
# long-term-only CRM of the authors' code); :mod:`reclora_ds.training.checkpoint` fills them in.
LEGACY_SIM: dict[str, Any] = {"short_term_length": 0, "behaviour_age": False}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class CRMConfig:
    """Settings of the stage-1 CRM (SIM, DIN, logistic regression); defaults are ML-1M's (paper App. B.1).

    Use :meth:`for_dataset` for the per-dataset settings of the authors' runs.
    """

    embedding_dim: int = 64
    """E, the embedding width of every field (paper search range {32, 64}; GoodReads 32)."""
    attention_layers: int = 1
    """Hidden layers of the DIN attention MLP (authors' ``num_attn_layers``: 1 for ML-1M and GoodReads,
    3 for ML-25M). Each is ``Linear(H) + ReLU + Dropout``; a ``Linear(H -> 1)`` follows."""
    attention_hidden: int = 256
    """H, width of each hidden layer of the attention MLP (the authors' code uses the tower width)."""
    tower: tuple[int, ...] = (256, 256, 256)
    """Widths of the MLP tower's ``Linear + ReLU + Dropout`` layers; the last one is the CRM state d_c."""
    dropout: float = 0.0
    """Dropout after every ReLU of the tower and of the attention MLP (paper range {0, 0.1, 0.2})."""
    behaviour_fields: tuple[str, ...] | None = None
    """Item-side fields that describe an item, target and history alike (their embeddings are
    combined by ``item_merge``). None: ``("item_id", category_field)``, the DIN / FuxiCTR convention
    (item id + category). ``("item_id",)`` is the authors' code (a behaviour = Linear(2E -> E))."""
    item_merge: Literal["concat", "sum"] = "sum"
    """How an item's ``behaviour_fields`` embeddings combine into its vector: ``sum`` (D = E: the item id's
    embedding plus its category's, the usual side-information sum) or ``concat`` (D = E * len, the
    DIN / FuxiCTR convention). With one field the two are the same model. ``sum`` keeps the category in
    every item vector at the per-behaviour cost of the item id alone (the attention's per-behaviour
    product is D x H) and is the default: on the bundled data it scored valid AUC 0.7708 against 0.7671
    over five seeds (docs/CRM_RESULTS.md)."""
    search: Literal["soft", "hard", "precomputed"] = "precomputed"
    """SIM only. The general search unit: ``precomputed`` (the paper's) = no search in the model, the
    batch's history already is the top-K of the Long-Short Modality Retriever (App. B.2: SIM and RecLoRA
    share one retrieval); ``soft`` = top-K behaviours of the given window by inner product with the target
    item's embedding; ``hard`` = the K most recent behaviours of the window in the target's category."""
    top_k: int = 60
    """SIM only. K, the number of behaviours the general search unit keeps (ignored by ``precomputed``)."""
    tower_crosses: bool = False
    """DIN and SIM. Feed the tower the pairwise inner products of its input vectors as well (a dot
    interaction, as DLRM and FM): with the sample's field embeddings ``e_1 .. e_F`` and the interest split
    into E-wide parts, the tower reads ``[e_1; ..; e_F; interest; <v_a, v_b> for a < b]``
    (:class:`PairwiseDots`). An MLP approximates such products poorly; this gives the user / context
    fields a direct second-order path to the logit."""
    short_term_length: int = 10
    """SIM only. S, the most recent behaviours SIM also attends over with a second exact search unit of
    its own (its own behaviour encoder and attention MLP, the shared embedding tables), whose interest
    joins the long-term one in the tower: SIM's split of a user's behaviours into a short-term sequence
    and the long-term ones the search units read (Pi et al. 2020 model the recent behaviours apart from
    the lifelong ones that GSU / ESU search). 0 = long-term only. At most the loader's
    ``recent_length`` (the batch's ``recent_*`` window, 20 by default). The default, 10, was chosen by
    validation AUC on the three bundled datasets (docs/CRM_RESULTS.md section 6); 0 is the long-term-only
    CRM of the authors' code."""
    behaviour_age: bool = True
    """SIM only. Give every behaviour its age: an embedding of ``1 + floor(log2(a))`` (a = how many
    behaviours before the sample it is, the batch's ``hist_age``; :data:`AGE_BUCKETS` buckets) joins the
    item and rating embeddings in the behaviour encoder. This is the time-interval feature of SIM's
    exact search unit (Pi et al. 2020, §4.2): a retrieved top-K in time order no longer tells the model
    how recent each behaviour is. On by default (docs/CRM_RESULTS.md section 6: within noise of off on the
    bundled data, never clearly worse); off is the authors' behaviour encoder."""
    cross_layers: int = 3
    """DCNv2 only. Cross layers of the cross network (paper App. B.1: {3, 6, 9, 12})."""
    interaction_layers: int = 3
    """AutoInt only. Multi-head self-attention layers over the fields (App. B.1: {3, 6, 9, 12})."""
    attention_size: int = 64
    """AutoInt and SASRec. Width of the self-attention (App. B.1: {64, 128, 256})."""
    attention_heads: int = 1
    """AutoInt and SASRec. Attention heads (App. B.1: 1 for AutoInt, {1, 2, 4} for SASRec); must divide
    ``attention_size``."""
    sequence_layers: int = 1
    """GRU4Rec and SASRec. GRU layers / self-attention blocks over the history (App. B.1: {1, 2, 3})."""
    caser_vertical_filters: int = 4
    """Caser only. Vertical convolution kernels (App. B.1: {2, 4, 8})."""
    caser_horizontal_filters: int = 16
    """Caser only. Horizontal convolution kernels per height (App. B.1: {4, 8, 16})."""

    def __post_init__(self) -> None:
        for name in (
            "embedding_dim",
            "attention_layers",
            "attention_hidden",
            "top_k",
            "cross_layers",
            "interaction_layers",
            "attention_size",
            "attention_heads",
            "sequence_layers",
            "caser_vertical_filters",
            "caser_horizontal_filters",
        ):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ValueError(f"CRMConfig.{name} must be a positive int, got {value!r}")
        if type(self.short_term_length) is not int or self.short_term_length < 0:  # bool is no int here
            raise ValueError(
                f"CRMConfig.short_term_length must be an int >= 0, got {self.short_term_length!r}"
            )
        for name in ("behaviour_age", "tower_crosses"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CRMConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.tower, int | str) or not self.tower:
            raise ValueError(f"CRMConfig.tower must be a non-empty sequence of widths, got {self.tower!r}")
        self.tower = tuple(self.tower)
        if not all(_positive_int(width) for width in self.tower):
            raise ValueError(f"CRMConfig.tower must hold positive ints, got {self.tower!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ValueError(f"CRMConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"CRMConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.attention_size % self.attention_heads:
            raise ValueError(
                f"CRMConfig.attention_heads={self.attention_heads} must divide "
                f"attention_size={self.attention_size}"
            )
        if self.item_merge not in ITEM_MERGES:
            raise ValueError(f"CRMConfig.item_merge must be one of {ITEM_MERGES}, got {self.item_merge!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"CRMConfig.search must be one of {SEARCHES}, got {self.search!r}")
        if self.behaviour_fields is not None:
            if isinstance(self.behaviour_fields, str):
                raise ValueError(
                    "CRMConfig.behaviour_fields must be a sequence of field names, "
                    f"got the str {self.behaviour_fields!r}"
                )
            self.behaviour_fields = tuple(self.behaviour_fields)
            names = self.behaviour_fields
            if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
                raise ValueError(
                    f"CRMConfig.behaviour_fields must be distinct non-empty names, got {self.behaviour_fields!r}"
                )

    @property
    def hidden_dim(self) -> int:
        """d_c, the width of the CRM state (the tower's last layer); PLoRAConfig.crm_dim must match it."""
        return self.tower[-1]

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> CRMConfig:
        """The authors' settings for ``dataset`` (ml-25m, ml-1m, goodreads), then ``overrides``."""
        if dataset not in DATASET_DEFAULTS:
            raise ValueError(f"no CRM defaults for dataset {dataset!r}; known: {sorted(DATASET_DEFAULTS)}")
        return cls(**{**DATASET_DEFAULTS[dataset], **overrides})


@dataclass(frozen=True)
class FieldSpec:
    """One categorical field: its name, whether it describes the user or the item, its vocabulary size
    (PAD and OOV included)."""

    name: str
    source: Literal["user", "item"]
    vocab_size: int


@dataclass(frozen=True)
class FeatureSpec:
    """The categorical features a CRM embeds, read from a processed dataset's ``metadata.json``.

    Attributes:
        fields: every field of ``metadata["fields"]``, in its order (one int64 [B] batch tensor each).
        category_field: the item field SIM's hard search matches on (``metadata["category_field"]``).
        rating_vocab_size: number of rating buckets of ``hist_rating`` (11: pad + 10 half stars).
    """

    fields: tuple[FieldSpec, ...]
    category_field: str | None = None
    rating_vocab_size: int = RATING_BUCKETS
    _by_name: dict[str, FieldSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"FeatureSpec.fields has duplicate names: {names}")
        for f in self.fields:
            if f.source not in FIELD_SOURCES:
                raise ValueError(
                    f"FeatureSpec field {f.name!r}: source must be one of {FIELD_SOURCES}, got {f.source!r}"
                )
            if not _positive_int(f.vocab_size):
                raise ValueError(
                    f"FeatureSpec field {f.name!r}: vocab_size must be a positive int, got {f.vocab_size!r}"
                )
        by_name = {f.name: f for f in self.fields}
        if "item_id" not in by_name or by_name["item_id"].source != "item":
            raise ValueError(f"FeatureSpec.fields must hold an item-side 'item_id' field, got {names}")
        if self.category_field is not None and (
            self.category_field not in by_name or by_name[self.category_field].source != "item"
        ):
            raise ValueError(
                f"FeatureSpec.category_field {self.category_field!r} is not an item-side field of {names}"
            )
        if not _positive_int(self.rating_vocab_size):
            raise ValueError(
                f"FeatureSpec.rating_vocab_size must be a positive int, got {self.rating_vocab_size!r}"
            )
        object.__setattr__(self, "_by_name", by_name)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> FeatureSpec:
        """Fields, sources and vocab sizes from ``metadata["fields"]``; ``category_field`` if present."""
        fields = tuple(
            FieldSpec(name, info["source"], int(info["vocab_size"]))
            for name, info in metadata["fields"].items()
        )
        return cls(fields=fields, category_field=metadata.get("category_field"))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def item_fields(self) -> tuple[str, ...]:
        """Item-side field names, in metadata order."""
        return tuple(f.name for f in self.fields if f.source == "item")

    def __getitem__(self, name: str) -> FieldSpec:
        return self._by_name[name]

    def behaviour_fields(self, config: CRMConfig) -> tuple[str, ...]:
        """The item-side fields that describe an item for ``config`` (see ``CRMConfig.behaviour_fields``)."""
        if config.behaviour_fields is None:
            if self.category_field is None or self.category_field == "item_id":
                return ("item_id",)
            return ("item_id", self.category_field)
        for name in config.behaviour_fields:
            if name not in self._by_name or self._by_name[name].source != "item":
                raise ValueError(
                    f"CRMConfig.behaviour_fields: {name!r} is not an item-side field; item fields: {self.item_fields}"
                )
        return config.behaviour_fields


class CRMOutput(NamedTuple):
    """What every CRM's forward returns.

    ``logit`` [B] is the pre-sigmoid score (train with ``BCEWithLogitsLoss``); ``hidden`` [B, d_c] is the
    input of the model's ``head`` (``logit == head(hidden).squeeze(-1)``, except DeepFM, whose logit adds
    its first-order and FM terms): the CRM state for the gates.
    """

    logit: torch.Tensor
    hidden: torch.Tensor


def require(batch: Mapping[str, torch.Tensor], keys: tuple[str, ...] | list[str]) -> None:
    """Raise a KeyError naming the batch keys a model needs but did not get."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"the CRM batch lacks {missing}; it has {sorted(batch)}")


@dataclass
class Behaviours:
    """A history as the attention sees it: item-side ids per behaviour field, rating bucket and mask.

    ``ids[f]`` [B, L] (item field ``f``), ``rating`` [B, L], ``mask`` [B, L] bool (True = real behaviour),
    ``age`` [B, L] age buckets (:func:`age_bucket`) when the model reads ages, else None.
    Ids under a False mask are set to PAD, so whatever a batch holds there can never reach a model.
    """

    ids: dict[str, torch.Tensor]
    rating: torch.Tensor
    mask: torch.Tensor
    age: torch.Tensor | None = None

    @classmethod
    def from_batch(
        cls,
        batch: Mapping[str, torch.Tensor],
        fields: tuple[str, ...],
        age: bool = False,
        prefix: str = "hist_",
    ) -> Behaviours:
        """The batch's history (``hist_item``, ``hist_<f>``, ``hist_rating``, ``hist_mask``; ``hist_age``
        bucketed when ``age``), or with ``prefix=RECENT_PREFIX`` its short-term window (``recent_*``)."""

        def key(name: str) -> str:  # hist_item -> <prefix>item
            return prefix + name[len("hist_") :]

        names = [key(history_key(f)) for f in fields]
        require(batch, [*names, key("hist_rating"), key("hist_mask"), *([key(HIST_AGE)] if age else [])])
        mask = batch[key("hist_mask")].bool()
        return cls(
            ids={f: batch[name].masked_fill(~mask, PAD_ID) for f, name in zip(fields, names, strict=True)},
            rating=batch[key("hist_rating")].masked_fill(~mask, PAD_ID),
            mask=mask,
            age=age_bucket(batch[key(HIST_AGE)]).masked_fill(~mask, PAD_ID) if age else None,
        )

    def last(self, n: int) -> Behaviours:
        """The last (most recent) ``n`` positions: [B, L] -> [B, n] (a ValueError if L < n)."""
        if self.mask.shape[1] < n:
            raise ValueError(f"the batch holds {self.mask.shape[1]} behaviours, {n} are needed")

        def take(x: torch.Tensor) -> torch.Tensor:
            return x[:, x.shape[1] - n :]

        return Behaviours(
            ids={f: take(v) for f, v in self.ids.items()},
            rating=take(self.rating),
            mask=take(self.mask),
            age=None if self.age is None else take(self.age),
        )

    def gather(self, index: torch.Tensor, valid: torch.Tensor) -> Behaviours:
        """The behaviours at positions ``index`` [B, K] of each row; ``valid`` [B, K] is the new mask."""
        valid = valid & self.mask.gather(1, index)

        def take(ids: torch.Tensor) -> torch.Tensor:
            return ids.gather(1, index).masked_fill(~valid, PAD_ID)  # [B, K]

        return Behaviours(
            ids={f: take(v) for f, v in self.ids.items()},
            rating=take(self.rating),
            mask=valid,
            age=None if self.age is None else take(self.age),
        )


def age_bucket(age: torch.Tensor) -> torch.Tensor:
    """Bucket of each age ``a`` (behaviours before the sample, int64 [...]): 0 for ``a <= 0`` (pad), else
    ``min(1 + floor(log2 a), AGE_BUCKETS - 1)``: 1, 2-3, 4-7, ... behaviours ago share a bucket."""
    log2 = torch.log2(age.clamp(min=1).to(torch.float64)).floor().to(torch.int64)  # exact at powers of 2
    return torch.where(age > 0, (1 + log2).clamp(max=AGE_BUCKETS - 1), torch.zeros_like(age))


class FieldEmbeddings(nn.Module):
    """One embedding table per categorical field, plus one for the history's rating buckets.

    A history field reads its target field's table (``hist_item`` reads ``item_id``'s rows), so an item is
    embedded the same way as a target and as a behaviour. Every table is initialised N(0, 0.01^2).

    Args:
        spec: the fields and their vocabulary sizes.
        embedding_dim: E.
        age_buckets: rows of the behaviour-age table ``age`` (0: no such table).

    Shapes:
        ``fields(batch)``: dict of [B] -> dict of [B, E]; ``forward(batch)``: -> [B, F, E].

    Example:
        >>> spec = FeatureSpec((FieldSpec("user_id", "user", 5), FieldSpec("item_id", "item", 9)))
        >>> emb = FieldEmbeddings(spec, embedding_dim=4)
        >>> emb({"user_id": torch.tensor([2, 3]), "item_id": torch.tensor([4, 0])}).shape
        torch.Size([2, 2, 4])
    """

    def __init__(self, spec: FeatureSpec, embedding_dim: int, age_buckets: int = 0) -> None:
        super().__init__()
        self.names = spec.names
        self.embedding_dim = embedding_dim
        self.tables = nn.ModuleDict({f.name: nn.Embedding(f.vocab_size, embedding_dim) for f in spec.fields})
        self.rating = nn.Embedding(spec.rating_vocab_size, embedding_dim)
        self.age = nn.Embedding(age_buckets, embedding_dim) if age_buckets else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for table in (*self.tables.values(), self.rating, *([self.age] if self.age is not None else [])):
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)

    def fields(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every field's embedding of the sample: name -> [B, E], in spec order."""
        require(batch, self.names)
        return {name: self.tables[name](batch[name]) for name in self.names}

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """All fields stacked: [B, F, E]."""
        return torch.stack(list(self.fields(batch).values()), dim=1)  # F x [B, E] -> [B, F, E]


def gather_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]``: the rows of ``weight`` [V, W] at ``ids`` [...] -> [..., W].

    Same values and gradient as ``nn.functional.embedding``, but through ``index_select``, whose backward
    is an ``index_add_``: 2-3x faster on CPU than the embedding's dense backward for the tens of thousands
    of history positions of a CRM batch.
    """
    return weight.index_select(0, ids.reshape(-1)).view(*ids.shape, weight.shape[-1])


def projected_rows(table: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(table @ weight.T)[ids]`` = ``table[ids] @ weight.T``: table [V, E], weight [D, E], ids [...] -> [..., D].

    The projection is applied to rows of the table, not to positions: to the whole table when it has no
    more rows than there are ids (rating buckets, genres, a small catalogue), else to the distinct ids only.
    """
    if table.shape[0] <= ids.numel():
        return gather_rows(table @ weight.T, ids)
    distinct, inverse = torch.unique(ids, return_inverse=True)
    return gather_rows(gather_rows(table, distinct) @ weight.T, inverse)


class BehaviourEncoder(nn.Module):
    """One behaviour = ``ReLU(Linear([item; rating]))`` (``[item; rating; age]`` with ``features=2``):
    the rating, and the age when the model reads it, are features of each behaviour.

    As in the authors' code (``hist_mapping``), the item's vector (D: its fields' embeddings, concatenated
    or summed) and the rating bucket's embedding (E) are concatenated and mapped back to D, so a behaviour
    lives where the target item does.

    Cost: the Linear is linear in each embedding it concatenates. With ``W = [W_1 | ... | W_n]`` split by
    field and ``T_f`` the field's table,

    .. math::

        h = \\mathrm{ReLU}\\Big(b + \\sum_f W_f\\, T_f[\\mathrm{id}_f]\\Big)
          = \\mathrm{ReLU}\\Big(b + \\sum_f (T_f W_f^\\top)[\\mathrm{id}_f]\\Big)

    so each table is projected once per row (:func:`projected_rows`) and a behaviour costs gathers and adds
    instead of a (D + E) x D product. With summed item fields (``merge="sum"``) every item table goes
    through the same block ``W_item`` (``W_item (T_1[id_1] + T_2[id_2]) = W_item T_1[id_1] + W_item T_2[id_2]``).
    The parameters (``proj.weight`` [D, D + E]) and the function are those of the concatenated form;
    only the float rounding differs.

    Args:
        item_dim: D, width of an item's vector.
        rating_dim: E, width of the rating embedding (and of the age embedding).
        merge: ``"concat"`` (the item tables' blocks follow each other in ``proj.weight``) or ``"sum"``
            (one D-wide block shared by every item table).
        features: E-wide per-behaviour feature tables after the item tables: 1 (rating) or 2 (rating, age).

    Shapes:
        tables: the n tables' weights [V_f, E_f] (item fields, then the rating's, then the age's), with
        sum E_f = D + features * E;
        ids: n tensors [B, L] -> [B, L, D].

    Example:
        >>> items, ratings = torch.randn(9, 8), torch.randn(11, 4)
        >>> ids = [torch.randint(0, 9, (2, 5)), torch.randint(0, 11, (2, 5))]
        >>> BehaviourEncoder(8, 4)([items, ratings], ids).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, item_dim: int, rating_dim: int, merge: str = "concat", features: int = 1) -> None:
        super().__init__()
        self.proj = nn.Linear(item_dim + features * rating_dim, item_dim)
        self.act = nn.ReLU()
        self.merge = merge
        self.features = features

    def forward(self, tables: list[torch.Tensor], ids: list[torch.Tensor]) -> torch.Tensor:
        if self.merge == "concat":
            blocks = self.proj.weight.split([table.shape[1] for table in tables], dim=1)  # n x [D, E_f]
        else:
            feature_tables = tables[len(tables) - self.features :]
            item_block, *feature_blocks = self.proj.weight.split(
                [self.proj.out_features, *(t.shape[1] for t in feature_tables)], dim=1
            )
            blocks = (*[item_block] * (len(tables) - self.features), *feature_blocks)
        summed = self.proj.bias
        for table, block, index in zip(tables, blocks, ids, strict=True):
            summed = summed + projected_rows(table, block, index)  # [B, L, D]
        return self.act(summed)


def mlp_layers(in_dim: int, widths: tuple[int, ...], dropout: float) -> nn.Sequential:
    """``[Linear(w) + ReLU + Dropout] for w in widths`` as one nn.Sequential."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    return nn.Sequential(*layers)


class TargetAttention(nn.Module):
    """DIN's activation unit (FuxiCTR ``DIN_Attention`` without softmax, as in the authors' code).

    For target ``t`` [D] and behaviours ``h_j`` [D] with mask ``m_j``:

    .. math::

        w_j = \\mathrm{MLP}([t, h_j, t - h_j, t \\odot h_j]), \\qquad
        \\mathrm{out} = \\sum_j m_j\\, w_j\\, h_j

    The MLP is ``attention_layers`` x (Linear(H) + ReLU + Dropout) then Linear(H -> 1). No softmax: the
    weights are unnormalised, so the output keeps the intensity of the user's interest (DIN paper §4.3).
    The sum is over positions, so the output does not depend on the behaviours' order.

    Cost: the first Linear is linear in each of its four inputs. Splitting its weight
    ``W = [W_1 | W_2 | W_3 | W_4]`` (each [H, D]) gives

    .. math::

        W [t, h, t - h, t \\odot h] + b = \\big((W_1 + W_3)\\, t + b\\big)
            + \\big(W_2 - W_3 + W_4 \\operatorname{diag}(t)\\big)\\, h = u_t + A_t\\, h

    so the target term ``u_t`` [H] is computed once per sample, and so is the matrix ``A_t`` [H, D]; a
    behaviour then costs one D x H product (a batched matmul over the samples) instead of a 4D x H one:
    a quarter of the FLOPs of the layer that dominates a CRM step. The parameters (``mlp.0.weight``
    [H, 4D]) and the function are unchanged; only the float rounding differs from the concatenated form
    (about 1e-6 relative).

    Args:
        dim: D, width of the target and of each behaviour.
        hidden: H, width of the MLP's hidden layers.
        layers: number of hidden layers of the MLP (>= 1).
        dropout: dropout after each hidden ReLU.

    Shapes:
        target: [B, D], behaviours: [B, L, D], mask: [B, L] bool -> [B, D].

    Example:
        >>> unit = TargetAttention(dim=8, hidden=16, layers=1)
        >>> unit(torch.randn(2, 8), torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int, hidden: int, layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = mlp_layers(4 * dim, (hidden,) * layers, dropout)
        self.out = nn.Linear(hidden, 1)

    def first_layer_parts(
        self, target: torch.Tensor, behaviours: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP's first Linear on ``[t, h_j, t - h_j, t * h_j]`` in two parts: ``A_t h_j`` [B, L, H] and
        ``u_t`` [B, H]; their sum (``u_t`` broadcast over L) is the layer's output."""
        first = self.mlp[0]  # Linear(4D -> H), applied in its split form (see the class docstring)
        w_t, w_h, w_diff, w_prod = first.weight.split(target.shape[-1], dim=1)  # 4 x [H, D]
        target_term = torch.addmm(first.bias, target, (w_t + w_diff).T)  # u_t: [B, H]
        per_target = torch.addcmul((w_h - w_diff).T, target.unsqueeze(2), w_prod.T)  # A_t^T: [B, D, H]
        return torch.bmm(behaviours, per_target), target_term  # [B, L, H], [B, H]

    def weights(self, target: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked attention weights ``m_j w_j``: [B, L] (0 where the mask is False)."""
        behaviour_term, target_term = self.first_layer_parts(target, behaviours)
        hidden = self.mlp[1:](behaviour_term + target_term.unsqueeze(1))  # ReLU, Dropout, further layers
        scores = self.out(hidden).squeeze(-1)  # [B, L, 1] -> [B, L]
        # where, not a product: a masked position contributes an exact 0 whatever its score.
        return torch.where(mask, scores, torch.zeros_like(scores))

    def forward(self, target: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dropout_active = self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.mlp)
        if len(self.mlp) == 3 and not dropout_active:
            # one hidden layer: the first layer's sum, ReLU, output layer, mask and weighted sum in one
            # function (ops.attention_pool: PyTorch ops, or an implementation a recipe registered)
            behaviour_term, target_term = self.first_layer_parts(target, behaviours)
            return ops.attention_pool(
                behaviour_term, target_term, self.out.weight[0], self.out.bias, mask, behaviours
            )
        weights = self.weights(target, behaviours, mask)  # [B, L]
        return torch.einsum("bl,bld->bd", weights, behaviours)  # [B, D]


class PairwiseDots(nn.Module):
    """Inner products of every pair of n vectors: the second-order term of FM / DLRM's dot interaction.

    .. math::

        \\mathrm{out} = \\big(\\langle v_a, v_b \\rangle\\big)_{a < b}, \\qquad a, b \\in \\{1, .., n\\}

    in row-major order of the strict upper triangle: (1, 2), (1, 3), ..., (n - 1, n).

    Args:
        (none: the module has no parameters.)

    Shapes:
        vectors: [B, n, E] -> [B, n (n - 1) / 2].

    Example:
        >>> PairwiseDots()(torch.ones(2, 3, 4))
        tensor([[4., 4., 4.],
                [4., 4., 4.]])
    """

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        n = vectors.shape[1]
        gram = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, n, n]
        a, b = torch.triu_indices(n, n, offset=1, device=vectors.device)  # the pairs a < b
        return gram[:, a, b]  # [B, n (n - 1) / 2]


def pair_count(n: int) -> int:
    """Number of pairs a < b among n vectors: the width of :class:`PairwiseDots`' output."""
    return n * (n - 1) // 2


class MLPTower(nn.Module):
    """The CRM's tower: ``Linear + ReLU + Dropout`` per width; its output is the CRM state.

    Args:
        in_dim: width of the tower input.
        widths: output width of each layer; the last one is d_c.
        dropout: dropout after each ReLU (the state is taken after it, which is the identity in eval mode).

    Shapes:
        x: [B, in_dim] -> [B, d_c].

    Example:
        >>> MLPTower(10, (256, 256, 256))(torch.randn(3, 10)).shape
        torch.Size([3, 256])
    """

    def __init__(self, in_dim: int, widths: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = mlp_layers(in_dim, widths, dropout)
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
