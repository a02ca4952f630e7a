"""Every reason a row can be rejected for: one table, used by the pre-filters, the stages and the report.

A reject is either **filtered** (a decision: the row is fine but not wanted) or **failed** (something
broke: a fetch, a decode, a model). The report counts them apart (``filtered_by_reason``,
``failed_by_reason``); :func:`outcome` is the only place that decides which side a reason lands on.
``stages`` are the values of the rejects shard's ``stage`` column the reason can appear with.
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
    "unresolved_host": Reason(FILTERED, ("prefilter",), "the host name did not resolve (or not within the DNS timeout)"),
    "duplicate_url": Reason(FILTERED, ("prefilter",), "the URL occurs earlier in (file, row) order in this run"),
    # download (img2dataset)
    "failed_to_download": Reason(FAILED, ("download",), "img2dataset could not fetch the URL (HTTP error, timeout, refused redirect)"),
    "failed_to_resize": Reason(FAILED, ("download",), "img2dataset fetched bytes it could not decode or resize"),
    "opted_out": Reason(FILTERED, ("download",), "the server's X-Robots-Tag carries a disallowed directive (noai, noimageai, ...)"),
    # decode
    "too_many_pixels": Reason(FILTERED, ("decode",), "the header declares more than max_pixels pixels (decompression-bomb guard)"),
    "decode_error": Reason(FAILED, ("decode",), "the stored bytes are not a decodable image"),
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
}


def outcome(reason: str) -> str:
    """FILTERED or FAILED; a reason missing from the table counts as FAILED (something unplanned broke)."""
    r = REASONS.get(reason)
    return r.outcome if r is not None else FAILED


def is_failure(reason: str) -> bool:
    return outcome(reason) == FAILED
