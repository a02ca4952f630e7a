"""The word lists the phrase rules filter with: package data in ``grounding/data/``, one entry a line."""

from __future__ import annotations

import re
from dataclasses import dataclass
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
    return frozenset(w for w in read_word_list("quantities.txt") if not w.endswith(" of"))


@lru_cache(maxsize=1)
def ing_nouns() -> frozenset[str]:
    return frozenset(read_word_list("ing_nouns.txt"))


@lru_cache(maxsize=1)
def of_quantity_nouns() -> frozenset[str]:
    """Quantity nouns that are quantities only before "of" ("a lot of toys", but "a parking lot")."""
    return frozenset(w[:-3].strip() for w in read_word_list("quantities.txt") if w.endswith(" of"))


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


# Noun endings that name qualities and states, and the words with those endings that name things or people.
ABSTRACT_SUFFIXES = ("ness", "ship", "ism", "ity", "hood", "dom")
CONCRETE_ABSTRACT_FORMS = frozenset("""harness witness wilderness battleship spaceship warship airship steamship starship
flagship organism celebrity mechanism prism""".split())


@dataclass(frozen=True)
class Lexicon:
    """Word lists one extractor filters with.

    ``nouns`` / ``adjs`` / ``noun_exceptions`` are the rule lemmatizer's WordNet tables, when the
    pipeline ships them: they repair bare caption nouns the small tagger calls adjectives or verbs
    ("Goldfish swimming", "children with geese").
    """
    nonvisual: frozenset[str]
    nouns: object = None            # lookups table (supports `in`), or None
    adjs: object = None
    noun_exceptions: object = None  # irregular plural -> [lemma]
    verbs: object = None            # verb lemmas ("greet"), to tell headline verbs from nouns
    verb_forms: object = None       # irregular verb forms ("strung", "hung")

    @classmethod
    def from_pipeline(cls, nlp, nonvisual: frozenset[str]) -> "Lexicon":
        try:
            lookups = nlp.get_pipe("lemmatizer").lookups
            index, exc = lookups.get_table("lemma_index"), lookups.get_table("lemma_exc")
            # The index tables are lists: sets make each lookup O(1) (a list scan was 0.5 ms a word).
            return cls(nonvisual, frozenset(index["noun"]), frozenset(index["adj"]), exc["noun"], frozenset(index["verb"]),
                       frozenset(exc["verb"]))
        except Exception:  # noqa: BLE001 - another lemmatizer: no repair
            return cls(nonvisual)

    def is_abstract(self, word: str) -> bool:
        """A head that names a quality, a state or an activity, by its form: "-ness", "-ship", "-ism", "-ity",
        "-hood", "-dom" nouns ("friendship", "humidity") and gerunds ("whitening", "hiking"; not the object
        nouns of ``ing_nouns.txt``), except the few such words that name things or people."""
        if word in CONCRETE_ABSTRACT_FORMS or len(word) < 7:
            return False
        return word.endswith(ABSTRACT_SUFFIXES) or self.is_participle(word)

    def is_participle(self, word: str) -> bool:
        """``word`` is an -ing form of a verb the tables know ("kissing", "grazing", "running"), and not one
        of the object nouns in ``ing_nouns.txt`` ("building", "railing")."""
        if self.verbs is None or len(word) < 5 or not word.endswith("ing") or word in ing_nouns():
            return False
        stem = word[:-3]
        return (self.is_verb_form(stem) or self.is_verb_form(stem + "e")
                or (len(stem) > 2 and stem[-1] == stem[-2] and self.is_verb_form(stem[:-1])))

    def is_past_participle(self, word: str) -> bool:
        """``word`` spells a past form of a verb and is no noun: "strung", "painted" (not "bed", "shed")."""
        if self.verbs is None or self.verb_forms is None or word in self.nouns or len(word) < 4:
            return False
        if word in self.verb_forms:
            return True
        return word.endswith("ed") and (self.is_verb_form(word[:-2]) or self.is_verb_form(word[:-1]))

    def is_verb_form(self, word: str) -> bool:
        """``word`` spells a present-tense verb ("greets", "drive") the tables know."""
        if self.verbs is None or not word.isalpha():
            return False
        if word in self.verbs:
            return True
        return any(word.endswith(suf) and word[: -len(suf)] + rep in self.verbs
                   for suf, rep in (("ies", "y"), ("es", ""), ("s", "")))

    def noun_lemma(self, word: str) -> str | None:
        """``word``'s lemma if it can only be read as a noun ("geese" -> "goose"), else None."""
        if self.nouns is None or not word.isalpha() or len(word) < 3 or word in self.adjs:
            return None
        if word in self.nouns:
            return word
        irregular = self.noun_exceptions.get(word)
        if irregular:
            return irregular[0]
        for suffix, repl in (("ies", "y"), ("es", ""), ("s", "")):
            base = word[: -len(suffix)] + repl
            if word.endswith(suffix) and base in self.nouns and base not in self.adjs:
                return base
        return None
