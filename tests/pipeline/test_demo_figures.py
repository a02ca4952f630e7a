"""README's `./run demo` figures are those of the committed run report (benchmarks/results/demo_run_report.json,
written by `python pipeline/build_grounding.py --sample`), not hand-kept numbers."""
from __future__ import annotations

import json
import os

from pipeline_helpers import REPO


def test_readme_demo_figures_match_the_committed_run_report():
    with open(os.path.join(REPO, "benchmarks", "results", "demo_run_report.json")) as f:
        report = json.load(f)
    with open(os.path.join(REPO, "README.md")) as f:
        readme = " ".join(f.read().split())   # line breaks as spaces
    c = report["counts"]
    assert c["adds_up"] and report["shards"]["total"] == 4
    assert f"{c['input']} input rows → {c['kept']} kept, {c['filtered']} filtered" in readme
    too_few = report["filtered_by_reason"].get("too_few_boxes", 0)
    assert (f"{too_few} images where the detector found fewer than 2 boxes" in readme if too_few
            else "every image that downloaded got at least 2 boxes" in readme)
    failed = report["failed_by_reason"]
    assert f"{c['failed']} failed (404 ×2, timeout, corrupt bytes, HTML)" in readme and sum(failed.values()) == 5
    assert f"in {round(report['timings_seconds']['total'])} s;" in readme
    assert set(report["filtered_by_reason"]) - {"too_few_boxes"} == {"private_host", "unsafe_scheme", "empty_caption",
                                                                     "punsafe", "aspect_ratio", "duplicate_url"}
