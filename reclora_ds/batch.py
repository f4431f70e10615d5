"""The batch contract between the data layer and the models: ids, buckets and key names, defined once.

The loaders (:mod:`reclora_ds.data.loader`, :mod:`reclora_ds.training.plora_data`) build batches with these
names and values, and the models (:mod:`reclora_ds.models`) read them. Shape legend: B batch, L history
length, T tokens.

Encoded categorical ids (every ``<field>`` and ``hist_<field>`` tensor): :data:`PAD_ID` (0) = no value /
padding, :data:`OOV_ID` (1) = a value unseen in the training era, known values from :data:`FIRST_KNOWN_ID` (2).

Keys of a CRM batch (dict of tensors)::

    sample_id   int64   [B]      joins the ID view with the text view
    label       float32 [B]
    <field>     int64   [B]      one per categorical field (user_id, item_id, genre, ...)
    hist_item   int64   [B, L]   item_id of each history behaviour (history_key("item_id"))
    hist_<f>    int64   [B, L]   item field f of each history behaviour (history_key(f))
    hist_rating int64   [B, L]   rating bucket round(RATING_SCALE * rating): 1..10 for 0.5..5 stars, 0 = pad
    hist_mask   bool    [B, L]   True on real behaviours
    hist_len    int64   [B]      number of real behaviours
    hist_age    int64   [B, L]   how many behaviours before the sample each one is (1 = the previous), 0 = pad
    recent_*    ...     [B, R]   the R most recent behaviours as recent_item, recent_<f>, recent_rating,
                                 recent_mask, recent_age (the short-term window, in both history modes)

A stage-2 batch adds ``input_ids``, ``attention_mask`` [B, T], ``labels`` [B, T] (answer tokens, else
:data:`IGNORE_INDEX`), ``answer_position`` [B] and ``user_index`` [B].
"""

from __future__ import annotations

from dataclasses import dataclass

PAD_ID = 0
OOV_ID = 1
FIRST_KNOWN_ID = 2

RATING_SCALE = 2  # hist_rating = round(RATING_SCALE * rating): half stars become integers
RATING_BUCKETS = 11  # 0 = pad, 1..10 = 0.5..5 stars (1..5 star scales use the even buckets)

HIST_MASK = "hist_mask"
HIST_LEN = "hist_len"
HIST_RATING = "hist_rating"
HIST_AGE = "hist_age"  # each behaviour's age in behaviours (1 = the previous interaction, 0 = pad)
RECENT_PREFIX = "recent_"  # keys of the short-term window: recent_item, recent_<f>, recent_rating, ...

IGNORE_INDEX = -100  # label of every token that is not an answer token (torch cross_entropy's default)


def history_key(field_name: str) -> str:
    """Batch key of an item-side field over the history: ``hist_item`` for item_id, else ``hist_<field>``."""
    return "hist_item" if field_name == "item_id" else f"hist_{field_name}"


@dataclass(frozen=True)
class AnswerTokens:
    """Token ids of the two answers as they follow the assistant prompt.

    Attributes:
        yes_ids, no_ids: the ids of ``"Yes."`` and ``"No."`` (what the loss is computed on).
        yes_id, no_id: their first tokens, whose logits give the score (Eq. 4 / 16).
    """

    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]

    @property
    def yes_id(self) -> int:
        return self.yes_ids[0]

    @property
    def no_id(self) -> int:
        return self.no_ids[0]

    def ids(self, label: float | int | bool) -> tuple[int, ...]:
        return self.yes_ids if float(label) > 0.5 else self.no_ids
