"""The noun-chunk rules of the phrase extractor (:mod:`grounding.phrases`) over one parsed caption.

:func:`parse_chunks` turns spaCy's noun chunks (plus the nouns the parser left out, :func:`noun_spans`)
into kept :class:`Chunk` s: edges trimmed, chunks cut at separators and headline verbs, heads refined
(:func:`_refine_head`: quantities give way to what they hold, named people get a title or role prompt,
organisations and audiences dropped) and non-visual chunks filtered (:func:`_is_visual_chunk`: pronouns,
numbers, prices, non-visual lemmas, frames, places, dates, settings, purposes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from grounding.lexicon import (Lexicon, attribute_words, frame_nouns, ing_nouns, of_quantity_nouns, person_roles,
                               quantity_nouns)
from grounding.parse_view import PRICE_RE, CleanText

# Named-entity types that name nothing a box could hold (used when PhraseConfig.ner is on).
NONVISUAL_ENTITIES = {"DATE", "TIME", "MONEY", "PERCENT", "CARDINAL", "ORDINAL", "QUANTITY", "GPE", "LOC",
                      "NORP", "LAW", "LANGUAGE", "EVENT"}
# ... and types that are non-visual only as a name ("the Fire Department", "the Met Gala", "Harry Potter and
# the Deathly Hallows"): a common-noun head inside such an entity ("Smart TV", "distribution center") stays.
NAMED_NONVISUAL_ENTITIES = {"ORG", "WORK_OF_ART"}
PERSON_WORD = "person"  # the detector prompt of a named person with no title or role in the caption

SKIP_EDGE_POS = {"PUNCT", "SPACE", "SYM", "X"}
AUDIENCE_WORDS = frozenset({"mens", "womens", "men's", "women's", "kids", "kid's", "kids'", "unisex", "boys", "girls",
                            "ladies", "baby's"})
PROMPT_STRIP_DEPS = {"det", "predet", "nummod", "quantmod", "preconj"}
MIN_LETTERS = 2
MAX_WORD_CHARS = 30  # a longer "word" is a hash, a glued hashtag run or noise, not a noun

@dataclass
class Chunk:
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


def prompt_text(display: str, start: int, end: int) -> str:
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
    if not words or any(t.pos_ != "PROPN" or t.is_lower for t in words):
        return False                                    # "fresh from the oven": a lower-case word is no name
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



def _is_mistagged_noun(t, lexicon: Lexicon) -> bool:
    """A word only English nouns spell that the tagger called an adjective or a verb, and that
    modifies no noun: the small model does this to bare caption nouns."""
    if t.tag_ == "VBG" and t.dep_ in ("pobj", "dobj", "pcomp") and t.lower_ in ing_nouns():
        return True                                     # "on scaffolding", "behind the railing"
    if t.pos_ in ("NOUN", "PROPN") or t.tag_ not in ("JJ", "JJR", "VB", "VBP", "VBZ", "VBN", "VBD", "RB", "NNP"):
        return False
    if t.tag_ in ("VBN", "VBD") and t.lower_.endswith("ed"):
        return False
    if lexicon.noun_lemma(t.lower_) is None:
        # A word that is a noun and an adjective ("plain", "locomotive") is a noun where only a noun can stand:
        # as a preposition's or verb's object, or with a noun compound of its own ("steam locomotive").
        if lexicon.nouns is None or t.lower_ not in lexicon.nouns or t.tag_ not in ("JJ", "RB") or not (
                t.dep_ in ("pobj", "dobj") or any(c.dep_ == "compound" and c.pos_ == "NOUN" for c in t.lefts)):
            return False
    if _acts_as_verb(t, lexicon):
        return False
    return not (t.dep_ in ("amod", "compound", "nmod") and t.head.pos_ in ("NOUN", "PROPN") and t.head.i != t.i)


def head_lemma(root, lexicon: Lexicon) -> str:
    word = root.lower_
    if root.pos_ not in ("NOUN", "PROPN"):
        lemma = lexicon.noun_lemma(word)
        if lemma is not None:
            return lemma
    lemma = (root.lemma_ or root.text).lower()
    if lexicon.nouns is not None and lemma != word:
        if word.endswith("ies") and word[:-1] in lexicon.nouns:
            return word[:-1]                            # "cookies" -> "cookie" (the tables say "cooky")
        if lemma not in lexicon.nouns and not word.endswith("s"):
            return word                                 # "ramen", not "raman" (a made-up singular)
    return lemma


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
        if (t.tag_ == "NN" and before.tag_ in ("NN", "NNS") and "NNS" in (before.tag_, after.tag_)
                and lexicon is not None and lexicon.is_participle(t.lower_)):
            return i                                    # "forklift loading pallets", "arms drinking coffee"
                                                        # (not "kitchen cutting board")
        word = t.lower_
        if not t.is_lower or t.ent_type_ or not lexicon.is_verb_form(word):
            continue                                    # "Striker Harry Kane": a name, not "to harry"
        verb_only = lexicon.nouns is not None and word not in lexicon.nouns and lexicon.noun_lemma(word) is None
        if verb_only or (t.tag_ in ("NNS", "VBZ") and before.tag_ == "NN"
                         and (before.lower_ in person_roles() or before.lower_ in PEOPLE_NOUNS)):
            return i                                    # "senator greets voters" (but "coffee beans", "car keys")
    return None


def _rooted(doc, start: int, end: int):
    """``doc[start:end]`` without the leading words that hang on a word after it ("a" in "a hard hat and
    safety vest", "his" in "his arms drinking coffee"), so its root is its own last noun."""
    while start < end - 1 and not start < doc[start].head.i < end:
        start += 1
    return doc[start:end]


def _split_chunk(span, lexicon: Lexicon | None) -> list:
    """A noun chunk cut where it holds several things: at a separator or masked text ("a tray, fast food
    restaurant") and at a conjunction after a noun ("a hard hat and safety vest"; not "salt and pepper shakers"). The part with the chunk's
    root is kept; another part only when it ends in a noun ("a tray"; not "$19.99" or "black and")."""
    doc = span.doc
    cuts = [t.i for t in span[1:-1] if t.is_space or is_separator(t)
            or (t.pos_ == "CCONJ" and doc[t.i - 1].pos_ in ("NOUN", "PROPN") and doc[t.i - 1].dep_ != "compound"
                and not (t.i - 1 == span.start and span.end - t.i > 2))]  # "salt and pepper shakers": one thing
    if not cuts:
        return [span]
    pieces, start = [], span.start
    for c in cuts + [span.end]:
        if c > start:
            piece = doc[start:c] if span.root.i in range(start, c) else _rooted(doc, start, c)
            last = piece[-1]
            if span.root.i in range(start, c) or (piece.root.i == last.i and (
                    last.pos_ in ("NOUN", "PROPN") or (lexicon is not None and lexicon.noun_lemma(last.lower_)))):
                pieces.append(piece)
        start = c + 1
    return pieces


def noun_spans(doc, lexicon: Lexicon | None = None) -> list:
    """``doc.noun_chunks`` plus the nouns the parser left out of every chunk.

    English noun chunks only start from a few relations (subject, object, ``pobj``, ``conj``,
    ``appos``, ``attr``, root); on verbless captions the small parser often attaches a listed noun
    as ``dep`` or ``npadvmod`` ("..., and a red kite" -> ``dep``), and that object would be lost.
    Such a noun gets a chunk of its contiguous left modifiers. A chunk with a headline verb inside
    ("Senator greets voters", "Volunteers unload boxes") is cut in two at the verb.
    """
    spans = []
    for chunk in doc.noun_chunks:
        for sp in _split_chunk(chunk, lexicon):
            cut = _inner_verb(sp, lexicon) if lexicon is not None and len(sp) >= 3 else None
            if cut is None:
                spans.append(sp)
            else:
                spans.extend((_rooted(doc, sp.start, cut), doc[cut + 1:sp.end]))
    covered = {t.i for sp in spans for t in sp}
    for t in doc:
        if t.i in covered:
            continue
        repaired = lexicon is not None and _is_mistagged_noun(t, lexicon)
        # A noun the parser hung as a compound on an -ing verb ("woman hand writing in a notebook", "a straw
        # hat picking grapes") modifies nothing: like "goldfish swimming", it names its own thing.
        stranded = t.pos_ == "NOUN" and t.dep_ == "compound" and t.head.tag_ == "VBG"
        if not repaired and not stranded and (t.pos_ not in ("NOUN", "PROPN") or t.dep_ in NOUN_MODIFIER_DEPS):
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


def is_separator(t) -> bool:
    """A token that splits a noun chunk: a currency sign, or separating punctuation
    ("$19.99 - 2 pack t-shirts"); a glued hyphen or slash ("t-shirts", "on/off") does not."""
    if t.is_currency:
        return True
    if t.text not in SEPARATORS:
        return False
    doc = t.doc
    glued = not t.whitespace_ and t.i > 0 and not doc[t.i - 1].whitespace_
    return not (glued and t.text in "-/")


def parse_chunks(doc, clean: CleanText, lexicon: Lexicon, use_ner: bool, offset: int) -> tuple[list[Chunk], int]:
    """Kept noun chunks (trimmed), and how many chunks the parser found before filtering.

    ``doc`` parses ``PARSE_PREFIX + clean.text``: tokens before ``offset`` belong to the frame.
    """
    kept: list[Chunk] = []
    found = 0
    for span in noun_spans(doc, lexicon):
        tokens = [t for t in span if t.idx >= offset]
        root = span.root
        if root.idx < offset:
            continue
        # "groom kissing", "goldfish swimming": a participle after a noun heads no object.
        if (len(tokens) > 1 and tokens[-1].i == root.i and tokens[-2].pos_ in ("NOUN", "PROPN")
                and ((root.tag_ in ("VBG", "NN") and lexicon.is_participle(root.lower_))
                     or lexicon.is_past_participle(root.lower_))):   # "hammock strung between ..."
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
        cut = [k for k, t in enumerate(tokens) if t.is_space or is_separator(t)]
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
        if person is None and (lexicon.is_abstract(head) and root.lower_.startswith(head[:-3])):
            continue                                    # "friendship", "Sonic Whitening" (not "a painting")
        if person is None and not _is_visual_chunk(tokens, root, head, lexicon.nonvisual, use_ner, lexicon.nouns):
            continue
        p = _strip_prefix(tokens, root)
        start, end = tokens[0].idx - offset, tokens[-1].idx + len(tokens[-1]) - offset
        pstart = tokens[p].idx - offset
        prompt = prompt_text(clean.display, pstart, end) if person is None else person or PERSON_WORD
        kept.append(Chunk(tokens[0].i, tokens[-1].i + 1, start, end, head, prompt, pstart, root.i))
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
    if (head == "couple" or head in of_quantity_nouns()) and any(c.dep_ == "prep" and c.lower_ == "of"
                                                               for c in root.children):
        return None                                     # "a couple of cups", "lots of toys" (but "a happy couple")
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
