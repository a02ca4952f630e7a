"""grounding.reasons: every reason any stage can emit is in the one table, on the right side."""
from __future__ import annotations

import inspect
import re

import grounding.detect
import grounding.detect_gdpy
import grounding.records
import grounding.source
import pipeline.stages
from grounding import phrases
from grounding.reasons import FAILED, FILTERED, REASONS, is_failure, outcome
from pipeline.config import JobConfig
from pipeline.output import build_report


def emitted() -> dict[str, set[str]]:
    """reason -> stages, read from the code that emits them (so a new reason cannot bypass the table)."""
    out: dict[str, set[str]] = {}
    src = inspect.getsource(grounding.source)
    for r in re.findall(r'return "(\w+)", ', src) + ["punsafe", "pwatermark", "duplicate_url"]:
        out.setdefault(r, set()).add("prefilter")
    for r in phrases.REASONS:
        out.setdefault(r, set()).add("phrases")
    for mod in (grounding.detect, grounding.detect_gdpy):
        for r in re.findall(r'f"(\w+): \{', inspect.getsource(mod)):
            if not r.startswith("phrase_"):
                out.setdefault(r, set()).add("detect")
    for stage, r in re.findall(r'_fail\(\w+, "(\w+)", "(\w+)"', inspect.getsource(pipeline.stages)):
        out.setdefault(r, set()).add(stage)
    for r in ("failed_to_download", "failed_to_resize", "opted_out"):  # img2dataset's statuses, and the opt-out
        out.setdefault(r, set()).add("download")
    for r in re.findall(r'"(too_\w+)"', inspect.getsource(grounding.records)):
        out.setdefault(r, set()).add("filter")
    return out


def test_every_emitted_reason_is_in_the_table_with_its_stage():
    found = emitted()
    assert {"prompt_failed", "parse_error", "detector_failed", "no_visual_nouns", "too_few_boxes"} <= set(found)
    missing = sorted(set(found) - set(REASONS))
    assert not missing, f"reasons emitted but not in grounding/reasons.py: {missing}"
    for reason, stages in found.items():
        assert stages <= set(REASONS[reason].stages), (reason, stages, REASONS[reason].stages)
    assert all(r.outcome in (FILTERED, FAILED) and r.meaning for r in REASONS.values())


def test_breakage_is_failed_and_decisions_are_filtered():
    for reason in ("prompt_failed", "parse_error", "detector_failed", "image_preprocess_failed", "decode_error",
                   "failed_to_download", "phrase_error"):
        assert is_failure(reason), reason
    for reason in ("too_few_boxes", "no_noun_phrases", "duplicate_url", "private_host", "opted_out", "punsafe"):
        assert outcome(reason) == FILTERED, reason
    assert is_failure("a_reason_nobody_planned")  # unknown means something unplanned broke


def test_the_report_counts_each_reason_on_its_side(tmp_path):
    summary = {"name": "a-00000", "input": 6, "kept": 1, "kept_2plus": 1, "downloaded": 5, "seconds": {"detect": 1.0},
               "reasons": {"parse_error": 1, "prompt_failed": 2, "too_few_boxes": 1, "punsafe": 1},
               "stages": {"phrases": 1, "detect": 2, "filter": 1, "prefilter": 1}}
    config = JobConfig(output=str(tmp_path), source=grounding.source.SourceConfig(paths=["x.parquet"]))
    report = build_report([summary], config, "h", {"total": 1.0})
    assert report["failed_by_reason"] == {"parse_error": 1, "prompt_failed": 2}
    assert report["filtered_by_reason"] == {"punsafe": 1, "too_few_boxes": 1}
    assert report["counts"] == {"input": 6, "kept": 1, "filtered": 2, "failed": 3, "adds_up": True}
