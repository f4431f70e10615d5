"""The text view of a sample: user profile words, item titles and histories for prompts.

ID fields (user id, item id, zipcode, book id) never appear in text (paper, Appendix C). ML-1M codes are
mapped to the words of its README.
"""

from __future__ import annotations

ML1M_AGES = {
    "1": "under 18",
    "18": "18-24",
    "25": "25-34",
    "35": "35-44",
    "45": "45-49",
    "50": "50-55",
    "56": "above 56",
}
ML1M_OCCUPATIONS = [
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
]
ML1M_GENDERS = {"M": "man", "F": "woman"}


def ml1m_profile(gender: str, age: str, occupation: str) -> str:
    """'The user is a woman. Her job is K-12 student. Her age is under 18.' (authors' wording)."""
    noun = ML1M_GENDERS.get(gender, "person")
    pronoun = {"M": "His", "F": "Her"}.get(gender, "Their")
    job = (
        ML1M_OCCUPATIONS[int(occupation)]
        if occupation.isdigit() and int(occupation) < len(ML1M_OCCUPATIONS)
        else "unknown"
    )
    return f"The user is a {noun}. {pronoun} job is {job}. {pronoun} age is {ML1M_AGES.get(age, 'unknown')}."


def stars(rating: float) -> str:
    """'1 star', '4 stars', '3.5 stars' (half stars shown as they are)."""
    text = f"{rating:g}"
    return f"{text} star" if text == "1" else f"{text} stars"


def text_views(ds, split: str, sample_ids, history_length: int = 10) -> dict[int, dict]:
    """Text view of samples, joined by ``sample_id`` (never by row position).

    Returns ``{sample_id: {"profile", "history": [(title, rating), ...] oldest first, "target", "label"}}``
    with the ``history_length`` most recent history items (the retrieval issue adds similarity-ranked ones).
    ``ds`` is a :class:`~reclora_ds.data.processed.ProcessedDataset`.
    """
    import numpy as np

    wanted = np.unique(np.asarray(sample_ids, dtype=np.int64))
    table = ds.read_split(split, columns=["sample_id", "user_index", "item_index", "hist_len", "label"])
    ids = table.column("sample_id").to_numpy()
    order = np.argsort(ids)
    pos = np.searchsorted(ids, wanted, sorter=order)
    found = (pos < len(ids)) & (ids[order[np.minimum(pos, len(ids) - 1)]] == wanted)
    if not found.all():
        raise KeyError(f"sample ids not in split {split!r}: {wanted[~found][:10].tolist()}")
    rows = table.take(order[pos]).to_pydict()
    titles = ds.items.column("title").to_pylist()
    users = ds.users.to_pydict()
    tl = ds.timelines
    rows_idx, valid = tl.recent(np.asarray(rows["user_index"]), np.asarray(rows["hist_len"]), history_length)
    out = {}
    for j, sid in enumerate(rows["sample_id"]):
        u = rows["user_index"][j]
        profile = ""
        if ds.metadata["dataset"] == "ml-1m":
            profile = ml1m_profile(users["gender"][u], users["age"][u], users["occupation"][u])
        hist = [(titles[tl.item_index[r]], float(tl.rating[r])) for r, ok in zip(rows_idx[j], valid[j]) if ok]
        out[sid] = {
            "profile": profile,
            "history": hist,
            "target": titles[rows["item_index"][j]],
            "label": rows["label"][j],
        }
    return out
