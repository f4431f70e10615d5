"""Stage-2 prompts: the authors' wording per dataset, the chat wrapping, the answer tokens, left padding, and
the text view of real samples (no ID field; the same history as the independent ``text_views`` reference)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from reclora_ds.batch import IGNORE_INDEX
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.data.prompts import (
    FALLBACK_TEMPLATE,
    PromptEncoder,
    TextView,
    build_prompt,
    prompt_body,
    resolve_answer_tokens,
)
from reclora_ds.data.text import ml1m_profile, text_views
from reclora_ds.training.plora_data import PLoRABatchLoader
from tests.tiny_llm import CHAT_TEMPLATE, word_tokenizer

# Figure 2 of the paper, in the authors' code wording (reclora-facts section 4).
FIGURE_2 = TextView(
    target="Titanic (1997)",
    history=(
        ("Pump Up the Volume (1990)", 4.0),
        ("Antz (1998)", 4.0),
        ("Devil's Own, The (1997)", 5.0),
        ("Crying Game, The (1992)", 1.0),
    ),
    profile=ml1m_profile("M", "35", "20"),
    gender="M",
)
FIGURE_2_BODY = (
    "The user is a man. His job is writer. His age is 35-44.\n"
    "He watched the following movies in order in the past, and rated them:\n"
    "['0. Pump Up the Volume (1990) (4 stars)', '1. Antz (1998) (4 stars)', "
    "\"2. Devil's Own, The (1997) (5 stars)\", '3. Crying Game, The (1992) (1 star)']\n"
    "Based on the movies he has watched, deduce if he will like the movie ***Titanic (1997)***.\n"
    "Note that more stars the user rated the movie, the more the user liked the movie.\n"
    "You should ONLY tell me yes or no."
)


def test_ml1m_body_is_the_authors_wording():
    assert prompt_body("ml-1m", FIGURE_2) == FIGURE_2_BODY
    woman = dataclasses.replace(FIGURE_2, profile=ml1m_profile("F", "1", "10"), gender="F")
    body = prompt_body("ml-1m", woman)
    assert body.startswith("The user is a woman. Her job is K-12 student. Her age is under 18.\nShe watched ")
    assert (
        "Based on the movies she has watched, deduce if she will like the movie ***Titanic (1997)***." in body
    )


def test_ml25m_and_goodreads_have_no_profile_and_say_the_user():
    view = TextView("Heat (1995)", (("Toy Story (1995)", 3.5), ("Jumanji (1995)", 1.0), ("Up (2009)", 0.5)))
    body = prompt_body("ml-25m", dataclasses.replace(view, profile="ignored", gender="M"))
    assert body.splitlines() == [
        "The user watched the following movies in order in the past, and rated them:",
        "['0. Toy Story (1995) (3.5 stars)', '1. Jumanji (1995) (1 star)', '2. Up (2009) (0.5 stars)']",
        "Based on the movies the user has watched, deduce if the user will like the movie ***Heat (1995)***.",
        "Note that more stars the user rated the movie, the more the user liked the movie.",
        "You should ONLY tell me yes or no.",
    ]
    book = prompt_body("goodreads", TextView("Dune", (("Emma", 5.0),)))
    assert book.splitlines()[0] == "The user read the following books in order in the past, and rated them:"
    assert "Based on the books the user has read, deduce if the user will like the book ***Dune***." in book
    assert "more stars the user rated the book, the more the user liked the book." in book


def test_one_star_and_n_stars():
    body = prompt_body("ml-1m", TextView("X", (("A", 1.0), ("B", 2.0), ("C", 5.0))))
    assert "'0. A (1 star)'" in body and "'1. B (2 stars)'" in body and "'2. C (5 stars)'" in body
    assert "1 stars" not in body


def test_chat_template_wraps_the_body_when_the_tokenizer_has_one():
    with_template = word_tokenizer([FIGURE_2_BODY])
    prompt = build_prompt("ml-1m", FIGURE_2, with_template)
    assert prompt == f"<|user|> {FIGURE_2_BODY} <|assistant|> "
    without = word_tokenizer([FIGURE_2_BODY], chat_template=None)
    assert build_prompt("ml-1m", FIGURE_2, without) == FALLBACK_TEMPLATE.format(body=FIGURE_2_BODY)
    assert build_prompt("ml-1m", FIGURE_2) == FIGURE_2_BODY


@pytest.mark.parametrize("chat_template", [CHAT_TEMPLATE, None])
def test_answer_tokens_come_from_the_tokenizer(chat_template):
    tokenizer = word_tokenizer([FIGURE_2_BODY], chat_template)
    answers = resolve_answer_tokens(tokenizer)
    dot = tokenizer.convert_tokens_to_ids(".")
    assert answers.yes_ids == (tokenizer.convert_tokens_to_ids("Yes"), dot)
    assert answers.no_ids == (tokenizer.convert_tokens_to_ids("No"), dot)
    assert answers.yes_id != answers.no_id


def test_encoder_left_pads_and_labels_only_the_answer():
    tokenizer = word_tokenizer([FIGURE_2_BODY])
    encoder = PromptEncoder(tokenizer, "ml-1m")
    short = TextView("Antz (1998)", (("Antz (1998)", 3.0),))
    batch = encoder.encode([FIGURE_2, short], labels=[1, 0])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    width = ids.shape[1]
    assert mask[0].all() and not mask[1, 0]  # the shorter row is padded on the left
    assert (ids[1][mask[1] == 0] == tokenizer.pad_token_id).all()
    assert mask[1, -1] == 1
    for row, answer in enumerate([encoder.answers.yes_ids, encoder.answers.no_ids]):
        labelled = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == list(range(width - len(answer), width))
        assert labels[row, labelled].tolist() == list(answer)
        assert batch["answer_position"][row] == width - len(answer) - 1
    alone = encoder.encode([short], labels=[0])
    n = int(alone["attention_mask"].sum())
    assert torch.equal(ids[1, -n:], alone["input_ids"][0])  # padding adds tokens, it changes none
    prompt_only = encoder.encode([FIGURE_2, short])
    assert "labels" not in prompt_only
    assert (prompt_only["answer_position"] == prompt_only["input_ids"].shape[1] - 1).all()


def test_text_views_of_real_samples_hold_no_ids_and_match_the_reference(ml1m_prepared):
    """Real ML-1M samples: the view has no ID field, no zipcode or id string reaches the prompt, and the
    recent history and target equal those of ``text.text_views`` (joined by sample_id)."""
    assert {f.name for f in dataclasses.fields(TextView)} == {"target", "history", "profile", "gender"}
    ds = ProcessedDataset(ml1m_prepared.output_dir)
    titles = ds.items.column("title").to_pylist()
    corpus = [
        prompt_body("ml-1m", TextView(t, ((t, 4.0),), ml1m_profile("M", "1", "0"), "M")) for t in titles
    ]
    encoder = PromptEncoder(word_tokenizer(corpus), "ml-1m")
    loader = PLoRABatchLoader(ds, "valid", 64, encoder, history_length=20, short_history_length=10)
    batch = next(iter(loader))
    cols = {k: batch[k].numpy() for k in ("sample_id", "user_index")}
    table = ds.read_split("valid", ["sample_id", "item_index", "hist_len"]).to_pydict()
    row_of = {sid: i for i, sid in enumerate(table["sample_id"])}
    for name in ("item_index", "hist_len"):  # the batch's hist_len is the CRM's (capped at its L)
        cols[name] = np.array([table[name][row_of[s]] for s in cols["sample_id"].tolist()])
    item_of = {sid: table["item_index"][i] for sid, i in row_of.items()}
    views = loader.build_text_views(cols)
    assert torch.equal(encoder.encode(views, batch["label"])["input_ids"], batch["input_ids"])
    reference = text_views(ds, "valid", cols["sample_id"], history_length=10)
    users = ds.users.to_pydict()
    for sid, view in zip(cols["sample_id"].tolist(), views):
        assert view.target == reference[sid]["target"] == titles[item_of[sid]]
        assert list(view.history) == reference[sid]["history"]
        assert view.profile == reference[sid]["profile"]
        prompt = build_prompt("ml-1m", view, encoder.tokenizer)
        user = int(batch["user_index"][cols["sample_id"].tolist().index(sid)])
        assert users["zipcode"][user] not in prompt
        assert not re.search(r"(?i)\b(user|movie|item|book)[ _]?id\b", prompt)
