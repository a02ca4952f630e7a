"""Every reason a row can be rejected or skipped for: one table, used by the pre-filters, the pipeline's
stages and report, the trainer's data loader (model.data) and the evaluator (model.evaluate).

A reject is either **filtered** (a decision: the row is fine but not wanted) or **failed** (something
broke: a fetch, a decode, a model). The report counts them apart (``filtered_by_reason``,
``failed_by_reason``); :func:`outcome` is the only place that decides which side a reason lands on.
``stages`` are the values of the rejects shard's ``stage`` column the reason can appear with, or
``train`` / ``evaluate`` for rows the trainer's loader or the evaluator skip (their skip counts key a
reason by name, optionally with a detail after a colon: ``corrupt_image: UnidentifiedImageError``).

Renamed reasons stay readable: :data:`RENAMED` maps an old name (as older rejects shards, stats and
reports carry it) to today's, and :func:`canonical` applies it (the query views and :func:`outcome` do).
"""
from __future__ import annotations

from dataclasses import dataclass

FILTERED, FAILED = "filtered", "failed"


@dataclass(frozen=True)
class Reason:
    outcome: str            # FILTERED | FAILED
    stages: tuple[str, ...]
    meaning: str


REASONS: dict[str, Reason] = {
    # pre-filters (grounding/source.py), before any download
    "short_caption": Reason(FILTERED, ("prefilter",), "caption under min_caption_chars / min_caption_words"),
    "aspect_ratio": Reason(FILTERED, ("prefilter", "filter"), "width/height outside [min_aspect, max_aspect] (declared, then stored size)"),
    "punsafe": Reason(FILTERED, ("prefilter",), "LAION's NSFW probability above max_punsafe"),
    "pwatermark": Reason(FILTERED, ("prefilter",), "LAION's watermark probability above max_pwatermark"),
    "low_similarity": Reason(FILTERED, ("prefilter",), "CLIP image-text similarity below min_similarity"),
    "bad_url": Reason(FILTERED, ("prefilter",), "empty or unparsable URL, or no host"),
    "unsafe_scheme": Reason(FILTERED, ("prefilter",), "a scheme other than http/https (file://, ftp://, ...)"),
    "private_host": Reason(FILTERED, ("prefilter",), "the host is or resolves to a loopback/private/link-local/reserved address"),
    "unresolved_host": Reason(FILTERED, ("prefilter",), "the DNS says the host name does not exist or has no address"),
    "dns_timeout": Reason(FAILED, ("prefilter",), "the host's DNS look-up was not answered within --ray-dns-timeout "
                          "seconds (not shown unresolvable; not fetched unchecked)"),
    "dns_error": Reason(FAILED, ("prefilter",), "the host's DNS look-up kept failing transiently (EAI_AGAIN, "
                        "SERVFAIL, ...) through its retries"),
    "duplicate_url": Reason(FILTERED, ("prefilter",), "the URL occurs earlier in (file, row) order in this run"),
    # download (img2dataset)
    "failed_to_download": Reason(FAILED, ("download",), "img2dataset could not fetch the URL (HTTP error, timeout, refused redirect)"),
    "failed_to_resize": Reason(FAILED, ("download",), "img2dataset fetched bytes it could not decode or resize"),
    "opted_out": Reason(FILTERED, ("download",), "the server's X-Robots-Tag carries a disallowed directive (noai, noimageai, ...)"),
    # decode
    "too_many_pixels": Reason(FILTERED, ("download", "decode", "train"), "more than max_pixels pixels (--max-pixels: img2dataset's "
                              "limit on the fetched image, the header check on the stored one; decompression-bomb guard)"),
    "corrupt_image": Reason(FAILED, ("decode", "train"), "the image bytes do not decode"),
    # phrases (grounding/phrases.py: CaptionPhrases.reason, plus the stage's own guard)
    "empty_caption": Reason(FILTERED, ("prefilter", "phrases"), "no caption text"),
    "not_text": Reason(FILTERED, ("phrases",), "the caption is not a string"),
    "url_only": Reason(FILTERED, ("phrases",), "the caption is only a URL"),
    "boilerplate_only": Reason(FILTERED, ("phrases",), "the caption is only boilerplate (file names, stock-photo text)"),
    "no_words": Reason(FILTERED, ("phrases",), "nothing word-like left after cleaning"),
    "non_english": Reason(FILTERED, ("phrases",), "the caption is not English"),
    "no_noun_phrases": Reason(FILTERED, ("phrases",), "spaCy found no noun phrase"),
    "no_visual_nouns": Reason(FILTERED, ("phrases",), "no noun phrase names something visible"),
    "parse_error": Reason(FAILED, ("phrases",), "spaCy failed on the caption"),
    "phrase_error": Reason(FAILED, ("phrases",), "the phrase stage raised on the caption"),
    # detect (grounding/detect.py: PhraseBoxes.error prefixes, plus the stage's own guard)
    "image_preprocess_failed": Reason(FAILED, ("detect",), "the detector's image processor failed on the image"),
    "prompt_failed": Reason(FAILED, ("detect",), "the phrases could not be turned into a text prompt"),
    "detector_failed": Reason(FAILED, ("detect",), "the detector's forward pass failed on the image"),
    "no_annotations": Reason(FAILED, ("detect",), "annotations backend: the image key is not in the COCO file"),
    "detect_error": Reason(FAILED, ("detect",), "the detect stage raised on the image"),
    # assembly
    "too_few_boxes": Reason(FILTERED, ("filter",), "fewer distinct boxes than min_boxes"),
    "caption_not_clean": Reason(FAILED, ("filter",), "the caption reached assembly uncleaned (a wiring bug: clean before phrases)"),
    # images (grounding/dedup.py)
    "eval_overlap": Reason(FILTERED, ("dedup",), "within the phash threshold of an image of a named evaluation set"),
    "duplicate_image": Reason(FILTERED, ("dedup",), "the same image bytes (sha256) occur earlier in (shard, row) order"),
    "near_duplicate": Reason(FILTERED, ("dedup",), "a perceptually equal image (phash within the threshold) occurs earlier"),
    # the trainer's data loader (model/data.py), per row of a training shard
    "preprocess_failed": Reason(FAILED, ("train",), "the decoded image failed the vision preprocessing"),
    "no_qa_for_mixture": Reason(FILTERED, ("train",), "no QA pair of a task the mixture draws (--rec-weight / --caption-weight)"),
    "bad_answer": Reason(FAILED, ("train",), "a REC answer that is not [[x0,y0,x1,y1]] boxes in 0..999"),
    "too_long": Reason(FILTERED, ("train",), "the prompt alone fills --max-length, no answer token is left to learn"),
    "unreadable_row_group": Reason(FAILED, ("train",), "a row group of the file does not read (corrupt pages)"),
    # the evaluator (model/evaluate.py), per shard file / REC pair
    "bad_shard": Reason(FAILED, ("evaluate",), "the file does not read or is not a grounding shard (--skip-bad-shards)"),
    "bad_truth": Reason(FAILED, ("evaluate",), "the shard's true answer is not [[x0,y0,x1,y1]] boxes in 0..999"),
}

RENAMED = {"decode_error": "corrupt_image"}   # old name -> name today (the pipeline said decode_error until 2026-12)


def reason_name(reason: str) -> str:
    """The table's key of a reason as written: the detail after a colon dropped, an old name renamed
    (``"corrupt_image: OSError"`` and ``"decode_error"`` both give ``"corrupt_image"``)."""
    name = reason.split(":", 1)[0].strip()
    return RENAMED.get(name, name)


def canonical(reason: str) -> str:
    """A stored reason under today's name, its detail kept (``"decode_error"`` -> ``"corrupt_image"``)."""
    name, sep, detail = reason.partition(":")
    return RENAMED.get(name, name) + sep + detail


def meaning(reason: str) -> str:
    """The one-line meaning of a reason as written (``""`` for one missing from the table)."""
    r = REASONS.get(reason_name(reason))
    return r.meaning if r is not None else ""


def outcome(reason: str) -> str:
    """FILTERED or FAILED; a reason missing from the table counts as FAILED (something unplanned broke)."""
    r = REASONS.get(reason_name(reason))
    return r.outcome if r is not None else FAILED


def is_failure(reason: str) -> bool:
    return outcome(reason) == FAILED
