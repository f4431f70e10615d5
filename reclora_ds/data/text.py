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
