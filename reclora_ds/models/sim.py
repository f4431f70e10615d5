"""SIM (search-based user interest model): a general search unit over the lifelong history, then DIN,
beside a short-term unit over the most recent behaviours.

Shape legend:
    B    batch (samples)
    L    behaviours given to the model: the retrieved top-K (precomputed) or a recent window (soft, hard)
    K    behaviours the general search unit keeps (``top_k``, 60 in the paper)
    S    behaviours of the short-term window (``short_term_length``; the batch's ``recent_*`` holds R >= S)
    F    categorical fields of a sample
    E    embedding width of one field
    D    width of an item / behaviour (``E * len(behaviour_fields)``, or ``E`` with ``item_merge="sum"``)
    d_c  width of the CRM state

Two stages (Pi et al., CIKM 2020), as the paper's CRM (§3.2, §3.4):

1. **General search unit** (GSU) picks K of the L behaviours before the sample:

   - ``soft``: the K with the largest inner product ``<e(target), e(h_j)>`` between the item embeddings
     (the concatenated ``behaviour_fields`` embeddings, the ones the exact search unit also reads; the
     rating is not part of the query);
   - ``hard``: the K most recent behaviours whose category (``spec.category_field``) equals the target's;
     PAD / OOV categories match nothing, so a sample may keep fewer than K (or none);
   - ``precomputed`` (default): no search; the batch's history already is the retrieved top-K (the loader's
     ``history_mode="retrieved"``: the semantic retrieval of :mod:`reclora_ds.retrieval`, the same rows as
     the prompts', which is what the paper's "retrieval consistent with RecLoRA" means).

   :meth:`SIM.search` returns the kept positions in chronological order (the loader's histories are oldest
   first); the forward skips that sort, since the exact search unit sums over positions.
2. **Exact search unit** (ESU): DIN's target attention over the K kept behaviours, then the tower
   (:class:`reclora_ds.models.din.DIN`; SIM is a DIN subclass with the same parameters).
3. **Short-term interest** (``short_term_length`` S > 0): SIM splits a user's behaviours into the short-term
   sequence, modelled apart (Pi et al. model the recent behaviours with their own target-attention model),
   and the long-term ones that the search units read. A second exact search unit (its own behaviour encoder ``short_term_encoder``
   and attention MLP ``short_term_attention``; the embedding tables are shared) attends over the S most
   recent behaviours (the batch's ``recent_*`` window, whatever ``history_mode`` is).

With target ``t`` [D], long-term behaviours ``h_j`` (the K kept ones, mask ``m_j``) and short-term ones
``s_i`` (mask ``n_i``), each encoded as ``ReLU(W [item; rating (; age)] + b)`` by its unit's encoder::

    u_long  = sum_j m_j MLP_long([t, h_j, t - h_j, t * h_j]) h_j        [B, D]
    u_short = sum_i n_i MLP_short([t, s_i, t - s_i, t * s_i]) s_i       [B, D]   (S > 0 only)
    hidden  = tower([e_1; ..; e_F; u_long; u_short (; crosses)])         [B, d_c]
    logit   = head(hidden)                                               [B]

``behaviour_age`` adds an embedding of ``1 + floor(log2 a)`` (a = behaviours between the behaviour and the
sample) to both encoders: SIM's time-interval feature. ``tower_crosses`` appends the inner products of every
pair of the F field embeddings and the E-wide parts of the interests (:class:`~reclora_ds.models.crm.PairwiseDots`).
Why the short-term unit: on the bundled data the retrieved top-60 alone (the long-term unit) scored below
DIN on the most recent 60; the retrieval keeps the most *similar* behaviours, which for most users are
not the recent ones, and on these splits recency carries much of the signal (docs/CRM_RESULTS.md, section 6).

Default search: ``precomputed``, the paper's wiring (App. B.2: "the retrieval methods in SIM, ReLLa and
RecLoRA maintain the same"): the Long-Short Modality Retriever picks each sample's top-K from its *whole*
prior history offline, the loader gives those K behaviours in time order (``CRMTrainConfig.history_mode =
"retrieved"``), and the model attends over them; it is then DIN's exact search unit on the retrieved
behaviours, and DIN on the most recent K with ``history_mode="recent"`` (the "w/o long retriever" ablation).
``soft`` and ``hard`` are SIM's own search units over a window of the most recent L behaviours (L is the
loader's ``history_length``; the training run logs how many samples have a longer history and lose its
start): ``soft`` needs nothing but the ids in the batch and, with ``top_k >= L``, is exactly DIN on the
whole window; ``hard`` leaves a sample an empty sub-history when no behaviour shares the target's category.

Gradients: the selection (``topk`` indices, then ``gather`` of integer ids) is not differentiable and
the search scores are computed under ``no_grad``: no gradient flows through which behaviours were
chosen. The soft search reads the shared item embeddings, which the CTR loss trains through the target
item (every item is some sample's target) and through the kept behaviours, so the search sharpens as the
model trains. No auxiliary GSU loss is used (the SIM paper's is optional); a training recipe that wants
one can put a loss on :meth:`SIM.search_scores`, which is differentiable outside :meth:`SIM.search`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from reclora_ds.batch import FIRST_KNOWN_ID, RECENT_PREFIX, history_key
from reclora_ds.models import ops
from reclora_ds.models.crm import (
    BehaviourEncoder,
    Behaviours,
    CRMConfig,
    CRMOutput,
    FeatureSpec,
    TargetAttention,
    gather_rows,
    require,
)
from reclora_ds.models.din import DIN


class SIM(DIN):
    """SIM: general search unit (soft / hard / precomputed) over the history, then DIN's exact search unit.

    Args:
        config: the DIN settings plus ``search`` and ``top_k``.
        spec: the categorical fields; ``hard`` search needs ``spec.category_field``.

    Shapes:
        batch: each field [B]; ``hist_item``, ``hist_<item field>``, ``hist_rating`` [B, L] int64;
        ``hist_mask`` [B, L] bool -> ``CRMOutput(logit [B], hidden [B, d_c])``.

    Example:
        >>> spec = FeatureSpec.from_metadata({"category_field": "genre", "fields": {
        ...     "user_id": {"source": "user", "vocab_size": 10},
        ...     "item_id": {"source": "item", "vocab_size": 20},
        ...     "genre": {"source": "item", "vocab_size": 6}}})
        >>> model = SIM(CRMConfig(embedding_dim=8, search="soft", top_k=3, short_term_length=4), spec).eval()
        >>> batch = {"user_id": torch.tensor([2, 3]), "item_id": torch.tensor([4, 5]),
        ...     "genre": torch.tensor([2, 3]), "hist_item": torch.randint(2, 20, (2, 9)),
        ...     "hist_genre": torch.randint(2, 6, (2, 9)), "hist_rating": torch.randint(1, 11, (2, 9)),
        ...     "hist_mask": torch.ones(2, 9, dtype=torch.bool),
        ...     "hist_age": torch.arange(9, 0, -1).repeat(2, 1)}  # behaviours back: the last is 1
        >>> # the short-term window (the loader's recent_*): here the 5 most recent of the same history
        >>> batch |= {"recent_" + k[5:]: v[:, -5:] for k, v in list(batch.items()) if k.startswith("hist_")}
        >>> index, valid = model.search(batch)
        >>> index.shape
        torch.Size([2, 3])
        >>> model(batch).hidden.shape
        torch.Size([2, 256])
    """

    def __init__(self, config: CRMConfig, spec: FeatureSpec) -> None:
        super().__init__(config, spec)
        self.search_mode = config.search
        self.top_k = config.top_k
        if self.search_mode == "hard" and spec.category_field is None:
            raise ValueError("CRMConfig.search='hard' needs a category field; the FeatureSpec has none")
        self.short_term_length = config.short_term_length
        if self.short_term_length:
            # the short-term unit: DIN's exact search unit with its own parameters, on the same embeddings
            self.short_term_encoder = BehaviourEncoder(
                self.item_dim, config.embedding_dim, self.item_merge, features=2 if self.behaviour_age else 1
            )
            self.short_term_attention = TargetAttention(
                self.item_dim, config.attention_hidden, config.attention_layers, config.dropout
            )

    @staticmethod
    def reads_age(config: CRMConfig) -> bool:
        """``behaviour_age``: both units embed each behaviour's age (SIM's time-interval feature)."""
        return config.behaviour_age

    @staticmethod
    def interest_count(config: CRMConfig) -> int:
        """The long-term interest, and the short-term one when ``short_term_length > 0``."""
        return 2 if config.short_term_length else 1

    def extra_interests(self, batch: Mapping[str, torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        """The short-term interest [B, D] over the ``short_term_length`` most recent behaviours
        (``recent_*``), or nothing."""
        if not self.short_term_length:
            return []
        recent = self.read_behaviours(batch, prefix=RECENT_PREFIX).last(self.short_term_length)  # [B, S]
        history = self.encode(recent, self.short_term_encoder)  # [B, S, D]
        return [self.short_term_attention(target, history, recent.mask)]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> CRMOutput:
        """Logit [B] and CRM state [B, d_c]: search the history, then attend over the kept behaviours."""
        behaviours = self.read_behaviours(batch)
        if self.search_mode != "precomputed":
            # Any order will do: the exact search unit sums over positions.
            index, valid = self.search(batch, behaviours, chronological=False)
            behaviours = behaviours.gather(index, valid)  # [B, L] -> [B, K]
        return self.forward_behaviours(batch, behaviours)

    def search_scores(
        self, batch: Mapping[str, torch.Tensor], behaviours: Behaviours | None = None
    ) -> torch.Tensor:
        """Soft-search relevance ``<e(target), e(h_j)>`` [B, L] (``-inf`` where the mask is False).

        The item vector concatenates or sums the ``behaviour_fields`` embeddings, so the inner product is a
        sum over fields: ``sum_f <T_f[target_f], T_f[h_j,f]>`` (concat) or ``sum_f <t, T_f[h_j,f]>`` with
        ``t = sum_g T_g[target_g]`` (sum). A field whose table has no more rows than the window (a genre)
        is scored against its whole table once and its scores gathered per position; a larger one row by
        row (:func:`reclora_ds.models.ops.gather_dot`).

        Differentiable (an auxiliary loss may use it); :meth:`search` calls it under ``no_grad``.
        ``behaviours``: the batch's history when the caller already has it (else read from ``batch``).
        """
        if behaviours is None:
            behaviours = Behaviours.from_batch(batch, self.behaviour_fields)
        tables = {name: self.embeddings.tables[name].weight for name in self.behaviour_fields}  # [V_f, E]
        targets = {name: gather_rows(table, batch[name]) for name, table in tables.items()}  # [B, E] each
        if self.item_merge == "sum":
            # every field is scored against the summed target t = sum_g T_g[target_g]: [B, E]
            targets = dict.fromkeys(targets, self.target_items(targets))
        scores = torch.zeros(
            behaviours.mask.shape, dtype=self.head.weight.dtype, device=behaviours.mask.device
        )
        for name, table in tables.items():
            target = targets[name]  # [B, E]
            ids = behaviours.ids[name]  # [B, L]
            if table.shape[0] <= ids.shape[1]:
                scores = scores + (target @ table.T).gather(1, ids)  # [B, V] -> [B, L]
            else:
                scores = scores + ops.gather_dot(table, ids, target)  # [B, L]
        return scores.masked_fill(~behaviours.mask, float("-inf"))

    @torch.no_grad()
    def search(
        self,
        batch: Mapping[str, torch.Tensor],
        behaviours: Behaviours | None = None,
        chronological: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The general search unit: positions ``index`` [B, K'] of the kept behaviours, in chronological
        order, and ``valid`` [B, K'] (False on slots with nothing kept); ``K' = min(top_k, L)``.

        ``soft``: the top-K by :meth:`search_scores`. ``hard``: the K most recent (largest position)
        behaviours of the target's category. Not available for ``precomputed``. ``behaviours``: the
        batch's history when the caller already has it (else read from ``batch``). ``chronological=False``
        skips putting the K positions in order (the forward does not need it).
        """
        if self.search_mode == "precomputed":
            raise RuntimeError("SIM(search='precomputed') has no search unit: the batch history is the top-K")
        if behaviours is None:
            behaviours = Behaviours.from_batch(batch, self.behaviour_fields)
        mask = behaviours.mask
        k = min(self.top_k, mask.shape[1])
        if self.search_mode == "soft":
            scores = self.search_scores(batch, behaviours)  # [B, L]
            keep = mask
        else:
            category = self.spec.category_field
            require(batch, [category, history_key(category)])
            target = batch[category]  # [B]
            keep = (
                mask & (batch[history_key(category)] == target[:, None]) & (target >= FIRST_KNOWN_ID)[:, None]
            )
            position = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32)  # 0 = oldest
            scores = torch.where(keep, position, torch.full_like(position, -1.0))  # [B, L], recent = large
        index = scores.topk(k, dim=1, sorted=False).indices  # [B, K]
        if chronological:
            index = index.sort(dim=1).values
        return index, keep.gather(1, index)
