"""Product titles read lexically: the parser reads a Title-Case shop title ("Wallet RFID Blocking with Coin
Pocket Brown") as one phrase, so :func:`title_chunks` cuts it into parts and takes one product per run of
object nouns (``title_words.txt``, ``attributes.txt`` and the other lists in ``grounding/data/``)."""
from __future__ import annotations

from grounding.lexicon import Lexicon, attribute_words, quantity_nouns, title_words
from grounding.parse_view import CleanText
from grounding.phrase_rules import AUDIENCE_NOUNS, Chunk, head_lemma, i_follows_year, is_separator, prompt_text

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
              and word not in titles and lemma not in quantity_nouns() and not lexicon.is_abstract(word))
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
        # "Hand Painted Ceramic Flower Pot": a noun before a participle with more nouns to come is an adverb
        # (not after another noun: "Dog Collar Personalized Name Plate").
        if (flags[j] and j + 1 < len(seg) and (j == 0 or not flags[j - 1]) and seg[j + 1].lower_.endswith("ed") and seg[j + 1].lower_ not in lexicon.nouns
                and (lexicon.is_verb_form(seg[j + 1].lower_[:-2] + "s") or lexicon.is_verb_form(seg[j + 1].lower_[:-1] + "s"))
                and any(flags[j + 2:])):                # "painted" (paint), "forged" (forge)
            flags[j] = False
    for j, t in enumerate(seg):
        # An adjective reading ("smart", "short", "light") counts as a noun only as the last word of a noun run.
        if flags[j] and lexicon.adjs is not None and t.lower_ in lexicon.adjs and not t.lower_.endswith("s"):
            last = j + 1 >= len(seg) or not flags[j + 1] and not (   # "Large Breed": it modifies a noun
                seg[j + 1].is_alpha and lexicon.noun_lemma(seg[j + 1].lower_) is not None)
            after_noun = j > 0 and flags[j - 1] and seg[j - 1].lower_ not in lexicon.adjs
            flags[j] = last and (t.tag_ in ("NN", "NNS") or after_noun)
    return flags


def _is_plural(t, lexicon: Lexicon) -> bool:
    """A plural noun, which in English ends a noun compound (a modifier noun is singular: "soap bars"), except
    the plural-only words the tables list as nouns ("sunglasses", "pants": "Sunglasses Case")."""
    word = t.lower_
    return (t.tag_ == "NNS" and word.endswith("s") and not word.endswith("ss")
            and (lexicon.nouns is None or word not in lexicon.nouns))


def _is_model_name(t, lexicon: Lexicon) -> bool:
    """A word no English list knows, read as a noun: a model or brand name ("iPhone", "Galaxy"-like)."""
    word = t.lower_
    return (t.is_alpha and t.pos_ in ("PROPN", "NOUN", "X") and lexicon.nouns is not None
            and word not in lexicon.nonvisual and word not in attribute_words() and word not in ("no", "non", "anti")
            and word not in lexicon.nouns and lexicon.noun_lemma(word) is None)


def title_chunks(doc, clean: CleanText, lexicon: Lexicon, offset: int) -> tuple[list[Chunk], int]:
    """Chunks of a Title-Case product title, read lexically: the parser reads "Wallet RFID Blocking with Coin
    Pocket Brown" as one phrase. The title is cut at separators and "with"/"and"/"of" ("for ..." parts name
    the audience or the room and are skipped); in each part, every run of object nouns is one product
    ("Rose Bouquet", "Fresh Flowers"), its head the run's last noun, the chunk starting at the plain words
    before it ("Wooden Cutting Board"). A run that ends in a quantity ("Toy Train Set") keeps its noun."""
    kept: list[Chunk] = []
    found = 0
    tokens = [t for t in doc if t.idx >= offset]
    segments: list[list] = [[]]
    skipping = False
    for t in tokens:
        if t.is_space or t.lower_ in TITLE_BREAK_WORDS or (t.is_punct and t.text not in "-'/") or is_separator(t):
            skipping = t.lower_ == "for"
            segments.append([])
        elif not skipping:
            segments[-1].append(t)
    first_seg = next((n for n, s in enumerate(segments) if s), 0)
    runs_before = 0                                     # object runs seen in the title so far
    for n_seg, seg in enumerate(segments):
        objects = _title_objects(seg, lexicon)
        k = 0
        while k < len(seg):
            if not objects[k]:
                k += 1
                continue
            end = k
            while end + 1 < len(seg) and not _is_plural(seg[end], lexicon) and (
                    objects[end + 1] or (seg[end + 1].lower_.endswith("ing") and end + 2 < len(seg) and objects[end + 2])):
                end += 1                                # "Kitchen Chopping Board"; a plural ends the run: "Zipper
                                                        # Pockets | Beach Shopping Bag", "Airtight Lids | Nesting Bowl"
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
            runs_before += 1
            word = clean.display[seg[end].idx - offset:seg[end].idx - offset + len(seg[end])]
            if (runs_before == 1 and n_seg == first_seg and end - k <= 1
                    and all(_is_model_name(w, lexicon) for w in seg[:k]) and any(objects[end + 2:])
                    and not (_is_model_name(seg[end], lexicon) and not word[1:].islower())):
                k = end + 1
                continue                                # "Samsung Galaxy ... Smartphone", "Weber ... Grill": the
                                                        # title's first words name the brand when a product follows
                                                        # (but "Apple iPhone ...": a model name written in
                                                        # mixed case, like "iPhone", "AirPods", is the product)
            spec = head_lemma(nxt, lexicon) if nxt is not None else ""
            if (spec in lexicon.nonvisual and spec not in attribute_words() and spec not in quantity_nouns()
                    and nxt.lower_ not in AUDIENCE_NOUNS):
                k = end + 1
                continue                                # "Home Gym Fitness Weights": a modifier of a spec
            root = seg[end]
            start = k
            while (start > 0 and k - start < 3 and seg[start - 1].is_alpha and seg[start - 1].lower_ not in AUDIENCE_NOUNS
                   and seg[start - 1].pos_ not in ("DET", "PRON") and not objects[start - 1]):
                start -= 1
            toks = seg[start:end + 1]
            cstart, cend = toks[0].idx - offset, root.idx + len(root) - offset
            prompt = prompt_text(clean.display, cstart, cend)
            kept.append(Chunk(toks[0].i, root.i + 1, cstart, cend, head_lemma(root, lexicon), prompt, cstart, root.i))
            k = end + 1
    return kept, found
