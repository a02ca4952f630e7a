"""grounding.reasons: every reason any stage can emit is in the one table, on the right side."""
from __future__ import annotations

import inspect
import re

from collections import Counter

import grounding.detect
import grounding.detect_gdpy
import grounding.image
import grounding.records
import grounding.source
import model.data
import model.evaluate
import pipeline.stages
from grounding import phrases
from grounding.image import try_decode_image
from grounding.reasons import FAILED, FILTERED, REASONS, canonical, is_failure, meaning, outcome, reason_name
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
    for r in ("failed_to_download", "failed_to_resize", "opted_out", "too_many_pixels"):  # img2dataset's statuses, opt-out, area
        out.setdefault(r, set()).add("download")
    for r in re.findall(r'"(too_\w+)"', inspect.getsource(grounding.records)):
        out.setdefault(r, set()).add("filter")
    # the trainer's loader and the evaluator: skipped["reason"], skipped[f"reason: {...}"], row_skips[...]
    for mod, stage in ((model.data, "train"), (model.evaluate, "evaluate")):
        for r in re.findall(r'(?:skipped|row_skips)\[f?"(\w+)', inspect.getsource(mod)):
            out.setdefault(r, set()).add(stage)
    for r in re.findall(r'"(\w+)" if isinstance|f"(\w+): \{', inspect.getsource(grounding.image.decode_failure)):
        out.setdefault("".join(r), set()).add("train")           # the loader's skipped[reason] of an image
    return out


def test_every_emitted_reason_is_in_the_table_with_its_stage():
    found = emitted()
    assert {"prompt_failed", "parse_error", "detector_failed", "no_visual_nouns", "too_few_boxes",       # pipeline
            "corrupt_image", "too_many_pixels", "bad_answer", "no_qa_for_mixture", "too_long",          # trainer
            "unreadable_row_group", "preprocess_failed", "bad_shard", "bad_truth"} <= set(found)         # evaluator
    missing = sorted(set(found) - set(REASONS))
    assert not missing, f"reasons emitted but not in grounding/reasons.py: {missing}"
    for reason, stages in found.items():
        assert stages <= set(REASONS[reason].stages), (reason, stages, REASONS[reason].stages)
    assert all(r.outcome in (FILTERED, FAILED) and r.meaning for r in REASONS.values())


def test_breakage_is_failed_and_decisions_are_filtered():
    for reason in ("prompt_failed", "parse_error", "detector_failed", "image_preprocess_failed", "corrupt_image",
                   "failed_to_download", "phrase_error", "corrupt_image: OSError", "bad_answer: no '[['",
                   "unreadable_row_group", "bad_shard"):
        assert is_failure(reason), reason
    for reason in ("too_few_boxes", "no_noun_phrases", "duplicate_url", "private_host", "opted_out", "punsafe",
                   "too_many_pixels", "too_long", "no_qa_for_mixture"):
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


def test_the_pipeline_and_the_trainer_name_an_undecodable_image_alike():
    """One name for one thing: the pipeline's decode stage and the trainer's loader both say corrupt_image."""
    _, reason = try_decode_image(b"not an image")
    assert reason_name(reason) == "corrupt_image" and "corrupt_image" in emitted()
    assert emitted()["corrupt_image"] == {"decode", "train"}
    assert "decode_error" not in REASONS and not hasattr(model.data, "SKIP_REASONS")   # no second table


def test_an_old_reason_name_reads_as_the_new_one():
    assert canonical("decode_error") == "corrupt_image" and is_failure("decode_error")
    assert canonical("corrupt_image: OSError") == "corrupt_image: OSError"
    assert meaning("decode_error") == meaning("corrupt_image: OSError") == REASONS["corrupt_image"].meaning


def test_the_trainer_explains_its_skips_from_the_table():
    text = model.data.describe_skips(Counter({"corrupt_image: UnidentifiedImageError": 3, "too_long": 1}))
    assert text == (f"3 corrupt_image: UnidentifiedImageError ({REASONS['corrupt_image'].meaning}), "
                    f"1 too_long ({REASONS['too_long'].meaning})")


def test_shard_counts_read_an_old_reason_name_as_todays():
    """A resumed run may hold rejects written as `decode_error` (before the rename) beside `corrupt_image`:
    the report counts them as one failed reason."""
    import pyarrow as pa

    from grounding.schema import GROUNDING_SCHEMA, REJECTS_SCHEMA
    from pipeline.output import shard_counts

    rejects = pa.Table.from_pylist([{"key": str(i), "stage": "decode", "reason": r, "error": "OSError"}
                                    for i, r in enumerate(["decode_error", "corrupt_image", "too_few_boxes"])],
                                   schema=REJECTS_SCHEMA)
    counts = shard_counts(GROUNDING_SCHEMA.empty_table(), rejects)
    assert counts["reasons"] == {"corrupt_image": 2, "too_few_boxes": 1}
    assert (counts["failed"], counts["filtered"]) == (2, 1)
