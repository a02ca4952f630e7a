"""Caption cleaning: the text a shard stores and every phrase span indexes.

Web alt-text arrives with HTML entities (``&amp;``, ``&#39;``, even double-escaped ``&amp;lt;b&amp;gt;``),
markup (``<b>Red</b>``), control characters (NUL, BEL, zero-width and direction marks), left-over escape
sequences (a literal ``\\n`` or ``\\x00``), odd spaces and decomposed accents. :func:`clean_caption`
returns the caption a reader would see::

    >>> clean_caption("&lt;b&gt;Red&lt;/b&gt; square &amp; blue circle \\x00\\x07")
    'Red square & blue circle'

What it does, in order: literal control escapes become spaces; entities are decoded (only complete
``&name;`` / ``&#123;`` / ``&#x1F;`` forms, so ``AT&T`` and ``&nothing`` stay as written); HTML tags and comments are removed (inline tags such
as ``<b>`` join their neighbours, other tags such as ``<br>`` separate words); control and format
characters are dropped (tabs and line breaks become spaces); whitespace runs collapse to one space and
the ends are trimmed; the result is Unicode NFC. The whole sequence repeats until a pass changes nothing
(text escaped four times over still comes out clean), so cleaning a cleaned caption returns it unchanged. Words, emoji, punctuation and case are kept: dropping
words is the phrase extractor's job, and the raw caption is stored beside the cleaned one.
"""
from __future__ import annotations

import html
import re
import unicodedata

__all__ = ["clean_caption"]

ENTITY_RE = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
# A tag is "<" + a name (optionally "/") + attributes + ">", or a comment; "a < b > c" and "<3" are text.
INLINE_TAGS = frozenset("a abbr b bdi bdo big cite code em font i kbd mark q s small span strike strong sub sup "
                        "tt u var wbr".split())
TAG_RE = re.compile(r"<!--.*?-->|<\s*(/?)\s*([A-Za-z][A-Za-z0-9:-]*)(?:\s[^<>]*)?/?\s*>", re.DOTALL)
# Escapes left in text by a bad export: "\n", "\t", "\0", "\x07", "\u200b" spelled out with a backslash.
ESCAPE_RE = re.compile(r"\\(?:[0abfnrtv](?![0-9])|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4})")
WHITESPACE_RE = re.compile(r"\s+")


def _unescape_entities(text: str) -> str:
    return ENTITY_RE.sub(lambda m: html.unescape(m.group()), text)


def _strip_tags(text: str) -> str:
    def repl(m: re.Match) -> str:
        name = (m.group(2) or "").lower()
        return "" if name in INLINE_TAGS else " "
    return TAG_RE.sub(repl, text)


def _escape_repl(m: re.Match) -> str:
    """A spelled-out escape of a control or format character becomes a space; any other stays."""
    s = m.group()
    if len(s) == 2:
        return " "
    ch = chr(int(s[2:], 16))
    return " " if unicodedata.category(ch) in ("Cc", "Cf") or ch.isspace() else s


def _drop_controls(text: str) -> str:
    out = []
    for ch in text:
        if ch.isspace() or ch == "\u200b":     # a zero-width space still separates words
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            # A zero-width joiner inside an emoji sequence (after a symbol or its variation selector) stays.
            if ch == "\u200d" and out and unicodedata.category(out[-1]) in ("So", "Mn"):
                out.append(ch)
        else:
            out.append(ch)
    return "".join(out)


def clean_caption(text: str) -> str:
    """The cleaned caption: entities decoded, tags stripped, control characters dropped, whitespace
    collapsed, NFC. ``None`` or a non-string is a caller error (a shard row says why instead)."""
    if not isinstance(text, str):
        raise TypeError(f"clean_caption takes a str, got {type(text).__name__}")
    for _ in range(len(text) + 1):       # bounded: a changing pass almost always shortens the text
        cleaned = _clean_once(text)
        if cleaned == text:
            break
        text = cleaned
    return text


def _clean_once(text: str) -> str:
    text = ESCAPE_RE.sub(_escape_repl, text)
    text = _strip_tags(text)             # real markup first: "<b>" in the raw text
    text = _unescape_entities(text)
    text = _strip_tags(text)             # then markup that was escaped: "&lt;b&gt;" is "<b>" now
    text = _drop_controls(text)
    text = unicodedata.normalize("NFC", text)
    return WHITESPACE_RE.sub(" ", text).strip()
