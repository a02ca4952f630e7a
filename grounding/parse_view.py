"""The caption as the parser reads it: decoded, de-noised, boilerplate masked, titles lower-cased,
with an offset map back to the caption (:class:`CleanText`); plus the language and length checks."""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

from grounding.lexicon import boilerplate_pattern

HASHTAG_RE = re.compile(r"(?<![\w#@&])[#@][^\W_][\w.]*(?<![.])")  # "#dogsofinstagram", "@jane.doe"
SPACED_SEPARATOR_RE = re.compile(r"(?<=\s)([-–—|•·~]+)(?=\s)")
CREDIT_RE = re.compile(r"\(?\b(?:REUTERS|AFP|AP|EPA|Getty Images|Xinhua|Anadolu|Bloomberg)(?: Photo)?\s*/\s*[\w.' -]+\)?")
URL_RE = re.compile(r"(?:https?://|ftp://|www\.)\S+|\b[\w.+-]+@[\w-]+\.[\w.]+\b", re.IGNORECASE)
FILE_RE = re.compile(
    r"(?<![\w])[\w\-.()]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|svg|pdf|html?|php|aspx?|mp4|mov)(?![\w])"
    r"|(?<![\w])(?:img|dsc|dscn|dscf|pxl|mvimg|vid|screenshot)[_\-]?\d[\w\-]*(?![\w])", re.IGNORECASE)
TAG_RE = re.compile(r"<[^<>]{0,200}>")
ENTITY_RE = re.compile(r"&(?:#\d{1,7}|#x[0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,30});")
WORD_RE = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
PRICE_RE = re.compile(r"[$€£¥]|\b(?:usd|eur|gbp)\b", re.IGNORECASE)

# Function words that mark a caption in another Latin-script language (words that are also
# English or common in English names, e.g. "a", "de", "la", "die", "in", are left out).
FOREIGN_FUNCTION_WORDS = frozenset("""
der das und mit im ein eine einem einer eines auf für von zu ist nicht dem des beim vom zum zur über unter
le les une avec dans sur pour est du au aux sous chez et des ce cette sont
el los las con en por para y del una unos unas es muy sobre entre
il gli della delle degli con per di è nel nella sul sulla uno
os um uma com em dos das na nas ao pelo pela
het een met op voor bij naar ook niet
och att med på för är
""".split())
ENGLISH_FUNCTION_WORDS = frozenset("""
the a an of with and in on at for to from by is are was this that these those his her their its
my your our over under near next behind into onto while who which as or but
""".split())


# --- cleaning with an offset map ------------------------------------------------------------------

@dataclass
class CleanText:
    """A caption made parseable, with the way back: cleaned character ``i`` came from
    ``caption[starts[i]:ends[i]]``, so a cleaned span ``[s, e)`` is the caption span
    ``[starts[s], ends[e - 1])``."""
    text: str            # what spaCy parses (maybe lower-cased)
    display: str         # the same characters in their original case: what prompts are read from
    starts: list[int]
    ends: list[int]
    masked_url: bool = False
    masked_boilerplate: bool = False
    title: bool = False  # a Title-Case product title (parsed lower-cased)

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The caption span of the cleaned span ``[start, end)``."""
        return self.starts[start], self.ends[end - 1]


MASK = "\n"  # what a masked URL / file name / boilerplate run becomes: a break the parser sees


def _is_noise_char(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat in ("Cc", "Cf", "Cs", "Co", "Cn", "So", "Sk", "Mn", "Me", "Zl", "Zp") or (cat == "Zs" and ch != " ")


def _masked_regions(text: str) -> tuple[list[tuple[int, int]], bool, bool]:
    """Sorted, merged ``[start, end)`` runs to drop: URLs, file names, boilerplate."""
    urls = [m.span() for rx in (URL_RE, FILE_RE) for m in rx.finditer(text)]
    breaks = [m.span(1) for m in SPACED_SEPARATOR_RE.finditer(text)]  # "Board - Custom Gift": a break, not a flag
    boiler = [m.span() for rx in (boilerplate_pattern(), HASHTAG_RE, CREDIT_RE) for m in rx.finditer(text)]
    merged: list[list[int]] = []
    for s, e in sorted(urls + boiler + breaks):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged], bool(urls), bool(boiler)


def parse_view(caption: str, lowercase_titles: bool = True) -> CleanText:
    """The caption as the parser should see it, with an offset map back to the caption.

    HTML entities are decoded (``&amp;`` -> ``&``); HTML tags, URLs, file names and boilerplate
    ("stock photo", "free shipping", site names) become a line break; control characters, emoji
    and odd spaces become spaces; runs of spaces collapse to one. Title-Case or ALL-CAPS captions
    are lower-cased, and so is a first word like "Lighthouse", which the tagger would call a verb.
    """
    plain = caption.isascii() and caption.isprintable()  # the common case: no character needs a look-up
    base = caption if plain else "".join(" " if _is_noise_char(ch) else ch for ch in caption)
    if "<" in base:
        base = TAG_RE.sub(lambda m: " " * len(m.group()), base)  # "<b>Red</b> car": tags are spaces
    regions, masked_url, masked_boilerplate = _masked_regions(base)
    if plain and not regions and "&" not in base and "  " not in base and base == base.strip():
        return _finish(base, list(range(len(base))), list(range(1, len(base) + 1)), False, False, lowercase_titles)
    entities = {m.start(): m for m in ENTITY_RE.finditer(base)}
    chars: list[str] = []
    starts: list[int] = []
    ends: list[int] = []

    def emit(ch: str, s: int, e: int) -> None:
        if ch.isspace() and ch != MASK and (not chars or chars[-1].isspace()):
            if chars and chars[-1] == " ":
                ends[-1] = e
            return  # collapse spaces; drop leading ones
        if ch == MASK and chars and chars[-1] == " ":
            chars[-1], ends[-1] = MASK, e
            return
        chars.append(ch)
        starts.append(s)
        ends.append(e)

    i, r = 0, 0
    while i < len(base):
        if r < len(regions) and i >= regions[r][0]:
            emit(MASK, regions[r][0], regions[r][1])
            i = regions[r][1]
            r += 1
            continue
        m = entities.get(i)
        if m is not None and (r >= len(regions) or m.end() <= regions[r][0]):
            decoded = html.unescape(m.group())
            if decoded != m.group() and len(decoded) == 1:
                emit(" " if _is_noise_char(decoded) or decoded.isspace() else decoded, m.start(), m.end())
                i = m.end()
                continue
        ch = base[i]
        emit(" " if ch.isspace() else ch, i, i + 1)
        i += 1
    while chars and chars[-1].isspace():
        chars.pop(), starts.pop(), ends.pop()
    return _finish("".join(chars), starts, ends, masked_url, masked_boilerplate, lowercase_titles)


def _finish(display: str, starts: list[int], ends: list[int], masked_url: bool, masked_boilerplate: bool,
            lowercase_titles: bool) -> CleanText:
    title = _is_title_like(display)
    if lowercase_titles and title:
        parse = "".join(c.lower() if len(c.lower()) == 1 else c for c in display)
    else:
        parse = _lower_first_word(display)
    return CleanText(parse, display, starts, ends, masked_url, masked_boilerplate, title)


FIRST_WORDS_RE = re.compile(r"^\W*([^\W\d_])([^\W\d_]*)\W+([^\W\d_]?)")


def _lower_first_word(text: str) -> str:
    """"Lighthouse on a cliff" -> "lighthouse on a cliff" (but not "Taylor Swift", "LED lights")."""
    m = FIRST_WORDS_RE.match(text)
    if not m or not m.group(1).isupper() or not m.group(2).islower() or m.group(3).isupper():
        return text
    i = m.start(1)
    low = text[i].lower()
    return text[:i] + low + text[i + 1:] if len(low) == 1 else text


TITLE_UNIT_RE = re.compile(r"inch(?:es)?|pcs|pieces|pack|lbs|ounces?|feet|months|years|yards|meters|count", re.IGNORECASE)


def _is_title_like(text: str) -> bool:
    """Product-title casing ("Mens Running Shoes Size 10") or shouting ("LED STRIP LIGHTS")."""
    words = [w for w in WORD_RE.findall(text) if len(w) > 3 and w.lower() not in ENGLISH_FUNCTION_WORDS
             and not TITLE_UNIT_RE.fullmatch(w)]
    if len(words) < 3:
        return False
    upper = sum(w.isupper() for w in words)
    capital = sum(any(c.isupper() for c in w) for w in words)  # "iPhone" counts
    return upper >= 0.8 * len(words) or capital == len(words)


def detect_non_english(text: str) -> bool:
    """Mostly non-Latin letters, or more foreign than English function words (Latin script)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    latin = sum(1 for c in letters if c < "\u0250" or "\u1e00" <= c <= "\u1eff")
    if latin < 0.5 * len(letters):
        return True
    words = [w.lower() for w in WORD_RE.findall(text)]
    foreign = sum(w in FOREIGN_FUNCTION_WORDS for w in words)
    english = sum(w in ENGLISH_FUNCTION_WORDS for w in words)
    return foreign >= 2 and foreign > 2 * english


def truncate_caption(caption: str, max_chars: int) -> str:
    """``caption`` cut to at most ``max_chars`` characters, at the last space when one is near."""
    if len(caption) <= max_chars:
        return caption
    cut = caption.rfind(" ", max_chars - 200, max_chars)
    return caption[: cut if cut > 0 else max_chars]
