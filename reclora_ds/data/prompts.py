"""Prompts of stage 2: a sample's text view -> the hard prompt of paper §2.3 / Figure 2 -> token ids.

Shape legend: B batch (samples), T tokens (prompt + answer, left-padded), A answer tokens.

The body follows the authors' wording (reclora-facts section 4). ML-1M::

    The user is a woman. Her job is K-12 student. Her age is under 18.
    She watched the following movies in order in the past, and rated them:
    ['0. Toy Story (1995) (4 stars)', '1. Heat (1995) (1 star)']
    Based on the movies she has watched, deduce if she will like the movie ***Jumanji (1995)***.
    Note that more stars the user rated the movie, the more the user liked the movie.
    You should ONLY tell me yes or no.

ML-25M (and ml-latest-small) has no profile line and says "The user watched ..." and "the user"; its ratings
are half stars ("3.5 stars"). GoodReads says "read" and "books". Pure ID fields (user id, item id, zipcode,
book id) never appear: a :class:`TextView` has no field for them. The history list is the Python ``repr``
of a list of strings, as in the authors' prompts (titles with an apostrophe get double quotes).

The body is wrapped in the tokenizer's chat template when it has one (one user turn,
``add_generation_prompt=True``), else in Vicuna's ``USER: ... ASSISTANT:``. The answer is ``"Yes."`` for a
positive sample and ``"No."`` for a negative one; its token ids are resolved from the tokenizer *as they
follow the assistant prompt* (:func:`resolve_answer_tokens`), never hard-coded, and the score of a sample is
the softmax over the logits of the first ``Yes`` and the first ``No`` token at the position right before
the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reclora_ds.batch import IGNORE_INDEX, AnswerTokens
from reclora_ds.data.text import stars

log = logging.getLogger(__name__)

ANSWER_YES = "Yes."
ANSWER_NO = "No."
# The prompt of a backbone without a chat template (Vicuna's format, as in the authors' code).
FALLBACK_TEMPLATE = "USER: {body} ASSISTANT:"
DEFAULT_MAX_LENGTH = 1024
_PROBE_BODY = "Answer yes or no."  # any body: it only fixes the text the answer follows


@dataclass(frozen=True)
class PromptTemplate:
    """The words that differ between datasets.

    Attributes:
        item_noun: "movie" or "book".
        verb: what the user did with items: "watched" or "read" (the same form serves "has ...").
        profile: whether the prompt starts with the user's profile sentence (ML-1M only).
    """

    item_noun: str
    verb: str
    profile: bool


TEMPLATES: dict[str, PromptTemplate] = {
    "ml-1m": PromptTemplate("movie", "watched", profile=True),
    "ml-25m": PromptTemplate("movie", "watched", profile=False),
    "goodreads": PromptTemplate("book", "read", profile=False),
}

# subject pronoun, as it starts a sentence and inside one, by ML-1M gender code
_PRONOUNS = {"M": ("He", "he"), "F": ("She", "she")}
_NO_PRONOUN = ("The user", "the user")


@dataclass(frozen=True)
class TextView:
    """What a prompt shows of one sample (no ID field).

    Attributes:
        target: title of the target item.
        history: ``(title, rating)`` of the short history, oldest first (K = 10 most recent or retrieved).
        profile: the profile sentence (ML-1M: :func:`reclora_ds.data.text.ml1m_profile`), else empty.
        gender: ``"M"`` / ``"F"`` picks he / she (ML-1M); anything else says "the user".
    """

    target: str
    history: tuple[tuple[str, float], ...] = ()
    profile: str = ""
    gender: str = ""


def template_for(dataset: str) -> PromptTemplate:
    """The template of a dataset name (``metadata.json: dataset``)."""
    if dataset not in TEMPLATES:
        raise ValueError(f"no prompt template for dataset {dataset!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[dataset]


def history_list(history: Sequence[tuple[str, float]]) -> str:
    """``['0. Title (4 stars)', '1. Title (1 star)']``: the repr of the numbered list, oldest first."""
    return repr([f"{i}. {title} ({stars(rating)})" for i, (title, rating) in enumerate(history)])


def prompt_body(dataset: str, view: TextView) -> str:
    """The instruction text of one sample (before any chat wrapping)."""
    template = template_for(dataset)
    noun = template.item_noun
    subject, pronoun = _PRONOUNS.get(view.gender, _NO_PRONOUN) if template.profile else _NO_PRONOUN
    lines = []
    if template.profile and view.profile:
        lines.append(view.profile)
    lines += [
        f"{subject} {template.verb} the following {noun}s in order in the past, and rated them:",
        history_list(view.history),
        f"Based on the {noun}s {pronoun} has {template.verb}, deduce if {pronoun} will like the {noun} "
        f"***{view.target}***.",
        f"Note that more stars the user rated the {noun}, the more the user liked the {noun}.",
        "You should ONLY tell me yes or no.",
    ]
    return "\n".join(lines)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def wrap_prompt(tokenizer: Any, body: str) -> str:
    """``body`` as the user turn of the tokenizer's chat template, ready for the assistant's answer."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
    return FALLBACK_TEMPLATE.format(body=body)


def build_prompt(dataset: str, view: TextView, tokenizer: Any | None = None) -> str:
    """The full prompt text of one sample; chat-wrapped when a tokenizer is given."""
    body = prompt_body(dataset, view)
    return body if tokenizer is None else wrap_prompt(tokenizer, body)


def answer_text(label: float | int | bool) -> str:
    """``"Yes."`` for a positive label, ``"No."`` for a negative one."""
    return ANSWER_YES if float(label) > 0.5 else ANSWER_NO


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # A chat template writes its own special tokens (BOS included, where it has one): adding them again
    # would double them. A plain prompt gets the tokenizer's usual ones (a Llama BOS).
    return tokenizer(texts, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def resolve_answer_tokens(tokenizer: Any) -> AnswerTokens:
    """Tokenize ``"Yes."`` / ``"No."`` as they appear after the assistant prompt.

    The answer's ids are the tail of ``tokenize(prompt + answer)`` after ``tokenize(prompt)`` (checked to be a
    prefix: no token merges across the boundary). The score uses the first token of each answer; the two
    first tokens must differ, and each must decode to the yes / no word.

    Raises:
        ValueError: the tokenizer merges the answer into the prompt, or cannot tell yes from no.
    """
    prompt = wrap_prompt(tokenizer, _PROBE_BODY)
    (prompt_ids,) = _encode(tokenizer, [prompt])
    answers = []
    for answer in (ANSWER_YES, ANSWER_NO):
        (full,) = _encode(tokenizer, [prompt + answer])
        if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
            raise ValueError(
                f"the tokenizer does not keep {answer!r} apart from the prompt it follows "
                f"(prompt ends {prompt[-40:]!r}); the answer tokens cannot be resolved"
            )
        answers.append(tuple(full[len(prompt_ids) :]))
    tokens = AnswerTokens(*answers)
    if tokens.yes_id == tokens.no_id:
        raise ValueError(f"'Yes' and 'No' start with the same token {tokens.yes_id}; they cannot be scored")
    for word, token in (("yes", tokens.yes_id), ("no", tokens.no_id)):
        text = tokenizer.decode([token]).strip().lower()
        if not text or not word.startswith(text):
            raise ValueError(f"the first answer token {token} decodes to {text!r}, not the start of {word!r}")
    if len(tokens.yes_ids) > 1 or len(tokens.no_ids) > 1:
        log.debug(
            "answer tokens: Yes. -> %s, No. -> %s (the first one is scored)", tokens.yes_ids, tokens.no_ids
        )
    return tokens


class PromptEncoder:
    """Text views -> left-padded token tensors: the prompt, and the answer with labels when training.

    Args:
        tokenizer: a Hugging Face tokenizer (its chat template is used when it has one).
        dataset: the dataset name that picks the template (``ml-1m``, ``ml-25m``, ``goodreads``).
        max_length: most tokens of a prompt + answer; a longer prompt loses its start (logged).

    Shapes (``encode``):
        input_ids int64 [B, T], attention_mask int64 [B, T] (0 on the left padding),
        labels int64 [B, T] (answer ids, ``IGNORE_INDEX`` elsewhere; only with answers),
        answer_position int64 [B]: the position whose logits score the answer (right before it).

    Example::

        encoder = PromptEncoder(tokenizer, "ml-1m")
        batch = encoder.encode([TextView("Heat (1995)", (("Toy Story (1995)", 4.0),))], labels=[1])
    """

    def __init__(self, tokenizer: Any, dataset: str, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        template_for(dataset)
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.answers = resolve_answer_tokens(tokenizer)
        longest_answer = max(len(self.answers.yes_ids), len(self.answers.no_ids))
        if max_length <= longest_answer:
            raise ValueError(f"max_length={max_length} leaves no room for a prompt")
        self.max_length = max_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        self.pad_id = int(pad)
        self.truncated = 0  # prompts cut so far

    def prompts(self, views: Sequence[TextView]) -> list[str]:
        return [build_prompt(self.dataset, view, self.tokenizer) for view in views]

    def encode(
        self, views: Sequence[TextView], labels: Sequence[float] | torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenize the prompts of ``views``; with ``labels``, append each answer and label it."""
        if labels is not None and len(labels) != len(views):
            raise ValueError(f"{len(views)} views but {len(labels)} labels")
        prompt_ids = _encode(self.tokenizer, self.prompts(views))
        rows, answer_lengths = [], []
        for i, ids in enumerate(prompt_ids):
            answer = list(self.answers.ids(float(labels[i]))) if labels is not None else []
            room = self.max_length - len(answer)
            if len(ids) > room:
                self.truncated += 1
                if self.truncated == 1:
                    log.warning(
                        "a prompt of %d tokens is longer than max_length=%d: its start is cut "
                        "(raise max_length; further cuts are counted in PromptEncoder.truncated)",
                        len(ids),
                        self.max_length,
                    )
                ids = ids[-room:]
            rows.append(list(ids) + answer)
            answer_lengths.append(len(answer))
        width = max(len(r) for r in rows)
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        out_labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        answer_position = torch.empty(batch, dtype=torch.long)
        for i, (row, n_answer) in enumerate(zip(rows, answer_lengths)):
            start = width - len(row)  # left padding: every sequence ends at position width - 1
            input_ids[i, start:] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, start:] = 1
            if n_answer:
                out_labels[i, width - n_answer :] = input_ids[i, width - n_answer :]
            answer_position[i] = width - n_answer - 1  # the last prompt token
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "answer_position": answer_position}
        if labels is not None:
            out["labels"] = out_labels
        return out
