"""The word lists the phrase rules filter with: package data in ``grounding/data/``, one entry a line."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources


def read_word_list(name: str) -> tuple[str, ...]:
    """A ``grounding/data/<name>`` list: one entry a line, ``#`` comments, blank lines ignored."""
    text = resources.files("grounding").joinpath("data", name).read_text(encoding="utf-8")
    return tuple(line.split("#", 1)[0].strip().lower() for line in text.splitlines()
                 if line.split("#", 1)[0].strip())


@lru_cache(maxsize=1)
def nonvisual_nouns() -> frozenset[str]:
    return frozenset(read_word_list("nonvisual.txt"))


@lru_cache(maxsize=1)
def attribute_words() -> frozenset[str]:
    return frozenset(read_word_list("attributes.txt"))


@lru_cache(maxsize=1)
def quantity_nouns() -> frozenset[str]:
    return frozenset(read_word_list("quantities.txt"))


@lru_cache(maxsize=1)
def person_roles() -> frozenset[str]:
    return frozenset(read_word_list("person_roles.txt"))


@lru_cache(maxsize=1)
def title_words() -> frozenset[str]:
    return frozenset(read_word_list("title_words.txt"))


@lru_cache(maxsize=1)
def frame_nouns() -> frozenset[str]:
    return frozenset(read_word_list("frames.txt"))


@lru_cache(maxsize=1)
def boilerplate_pattern() -> re.Pattern:
    phrases = sorted(read_word_list("boilerplate.txt"), key=len, reverse=True)
    alts = [r"[\s\-_.]*".join(re.escape(w) for w in p.split()) for p in phrases]
    # "Size 10", "size: XL" are shop boilerplate too; so are bare site suffixes like "| Etsy".
    alts.append(r"size\s*:?\s*(?:\d+(?:[.,]\d+)?|x*[sml]|xx?l)")
    return re.compile(r"(?<![\w])(?:" + "|".join(alts) + r")(?![\w])", re.IGNORECASE)
