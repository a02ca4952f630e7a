"""The output folder: layout, the config claim, resume (what is finished) and the run report.

Layout under ``config.output`` (local or any fsspec URL)::

    config.json            the resolved config (+ its content hash)
    run_report.json        counts per reason, per-stage time and throughput, versions, config
    dedup/                 the URL dedup pre-pass (see :mod:`pipeline.dedup`)
    downloads/             img2dataset's own shards (NNNNN.parquet + NNNNN_stats.json), _input/
    shards/<name>.parquet  grounding shards (GROUNDING_SCHEMA), <name> = <input-stem>-<NNNNN>
    rejects/<name>.parquet every filtered or failed input row (REJECTS_SCHEMA), same <name>

The work shard is the unit of resume: a worker writes its two files atomically (grounding shard
first, rejects shard second), each carrying the shard's counts in its provenance, and a rerun with
the same config skips shards whose two files exist with the same config hash
(:func:`finished_summary`). The report is built from the per-shard summaries alone
(:func:`build_report`), so the driver never reads rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import fsspec
import pyarrow as pa

from grounding.dedup import REASON_EVAL_OVERLAP, eval_set_of
from grounding.detect import DetectorConfig
from grounding.reasons import FAILED, canonical, outcome
from grounding.schema import read_metadata
from pipeline.config import ROWS_VERSION, JobConfig

STAGE_TIMES = ("read", "prefilter", "download", "decode", "dedup", "phrases", "detect", "assemble", "write")


@dataclass
class Layout:
    root: str

    def __post_init__(self):
        self.fs, self.path = fsspec.core.url_to_fs(self.root)

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def downloads(self) -> str:
        return self.join("downloads")

    @property
    def dedup(self) -> str:
        return self.join("dedup")

    @property
    def image_dedup(self) -> str:
        return self.join("image_dedup")

    def shard(self, name: str) -> str:
        return self.join("shards", f"{name}.parquet")

    def rejects(self, name: str) -> str:
        return self.join("rejects", f"{name}.parquet")

    def exists(self, url: str) -> bool:
        return self.fs.exists(fsspec.core.url_to_fs(url)[1])

    def write_json(self, name: str, obj: Any) -> None:
        """Atomic JSON write (temporary name, then rename)."""
        p = f"{self.path}/{name}"
        self.fs.makedirs(os.path.dirname(p), exist_ok=True)
        with self.fs.open(p + ".tmp", "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
        self.fs.mv(p + ".tmp", p)

    def read_json(self, name: str) -> Any | None:
        p = f"{self.path}/{name}"
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return json.load(f)

    def remove_stale_temporaries(self) -> None:
        """Temporary shard files a killed run left behind (never visible under a shard name)."""
        for sub in ("shards", "rejects"):
            for p in self.fs.glob(f"{self.path}/{sub}/.*.tmp"):
                self.fs.rm(p)

    def clear(self) -> None:
        for sub in ("shards", "rejects", "downloads", "dedup", "image_dedup"):
            if self.fs.exists(f"{self.path}/{sub}"):
                self.fs.rm(f"{self.path}/{sub}", recursive=True)
        for name in ("config.json", "run_report.json"):
            if self.fs.exists(f"{self.path}/{name}"):
                self.fs.rm(f"{self.path}/{name}")


def claim_output(layout: Layout, config: JobConfig, digest: str) -> None:
    """Refuse to mix runs of different configs in one folder (unless ``overwrite``); write config.json."""
    previous = layout.read_json("config.json")
    if previous is not None and previous.get("config_hash") != digest:
        if not config.overwrite:
            older = previous.get("rows_version", 1)
            why = (f"its rows were made by an older version of this code (rows version {older}, now {ROWS_VERSION})"
                   if older != ROWS_VERSION else f"hash {previous.get('config_hash')} != {digest}")
            raise ValueError(f"{layout.root} holds a run with another config ({why}); use a new --output or pass "
                             f"--overwrite to replace it")
        layout.clear()
    layout.write_json("config.json", {**asdict(config), "config_hash": digest, "rows_version": ROWS_VERSION})


def finished_summary(layout: Layout, name: str, digest: str) -> dict | None:
    """The summary of a finished shard (both files present, made by this config), else None."""
    if not (layout.exists(layout.shard(name)) and layout.exists(layout.rejects(name))):
        return None
    try:
        prov = read_metadata(layout.rejects(name))["provenance"]
    except Exception:  # noqa: BLE001 - an unreadable file is not finished
        return None
    if prov.get("config_hash") != digest or "summary" not in prov:
        return None
    return {**prov["summary"], "skipped": True}


# --- provenance ----------------------------------------------------------------------------------

def package_version() -> str:
    try:
        return metadata.version("cogvlm-grounding")
    except metadata.PackageNotFoundError:
        return "unknown"


def detector_weights(config: DetectorConfig) -> str:
    """What the detector's weights were: a digest of a local dir/file, else the hub id."""
    path = config.annotations if config.backend == "annotations" else config.model
    if path and os.path.isdir(path):
        h = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            if name.endswith((".safetensors", ".bin", ".pth", ".json")):
                with open(os.path.join(path, name), "rb") as f:
                    h.update(name.encode() + f.read())
        return f"{os.path.basename(path.rstrip('/'))}@sha256:{h.hexdigest()[:16]}"
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            return f"{os.path.basename(path)}@sha256:{hashlib.sha256(f.read()).hexdigest()[:16]}"
    return str(path)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "cogvlm-grounding": package_version()}
    for pkg in ("ray", "torch", "transformers", "spacy", "img2dataset", "pyarrow", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# --- the report -------------------------------------------------------------------------------------

def shard_counts(kept: pa.Table, rejects: pa.Table) -> dict:
    """The counts a shard's summary carries, from its two tables (kept rows, rejects)."""
    reasons = Counter(canonical(r) for r in rejects["reason"].to_pylist())  # old names read as today's
    failed = sum(n for r, n in reasons.items() if outcome(r) == FAILED)
    eval_sets = Counter(eval_set_of(e) for r, e in zip(rejects["reason"].to_pylist(), rejects["error"].to_pylist())
                        if r == REASON_EVAL_OVERLAP)
    return {"kept": kept.num_rows, "kept_2plus": sum(1 for n in kept["num_boxes"].to_pylist() if n >= 2),
            "filtered": rejects.num_rows - failed, "failed": failed, "reasons": dict(sorted(reasons.items())),
            "stages": dict(sorted(Counter(rejects["stage"].to_pylist()).items())),
            "eval_overlap_by_set": dict(sorted(eval_sets.items()))}



def build_report(summaries: list[dict], config: JobConfig, digest: str, timings: dict[str, float]) -> dict:
    """The run report from the per-shard summaries (a skipped shard's comes from its file's provenance)."""
    filtered, failed, stages, busy, eval_sets = Counter(), Counter(), Counter(), Counter(), Counter()
    inputs = kept = kept2 = downloaded = detected = 0
    this_run = [s for s in summaries if not s.get("skipped")]
    for s in summaries:
        inputs += s["input"]
        kept += s["kept"]
        kept2 += s["kept_2plus"]
        for reason, n in s["reasons"].items():
            reason = canonical(reason)  # a resumed run may hold shards written under an old name
            (failed if outcome(reason) == FAILED else filtered)[reason] += n
        stages.update(s["stages"])
        eval_sets.update(s.get("eval_overlap_by_set", {}))
    for s in this_run:
        busy.update(s["seconds"])
        downloaded += s["downloaded"]
        detected += s.get("detected", 0)
    n_filtered, n_failed = sum(filtered.values()), sum(failed.values())
    processed = sum(s["input"] for s in this_run)
    total = timings.get("total")
    per_stage = {k: {"busy_seconds": round(busy[k], 3),
                     "share": round(busy[k] / sum(busy.values()), 3) if sum(busy.values()) else None}
                 for k in STAGE_TIMES}
    return {
        "config_hash": digest,
        "counts": {"input": inputs, "kept": kept, "filtered": n_filtered, "failed": n_failed,
                   "adds_up": kept + n_filtered + n_failed == inputs},
        "filtered_by_reason": dict(sorted(filtered.items())),
        "failed_by_reason": dict(sorted(failed.items())),
        "rejects_by_stage": dict(sorted(stages.items())),
        "eval_overlap_by_set": dict(sorted(eval_sets.items())),
        "kept_with_2plus_boxes": kept2,
        "kept_with_2plus_boxes_share": round(kept2 / kept, 4) if kept else None,
        "shards": {"total": len(summaries), "written_this_run": len(this_run),
                   "skipped_finished": len(summaries) - len(this_run), "names": [s["name"] for s in summaries]},
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
        "throughput": {
            "input_rows_this_run": processed,
            "downloaded_rows_this_run": downloaded,
            "detected_rows_this_run": detected,
            "job_rows_per_second": round(processed / total, 2) if total else None,
            "slowest_stage": max(busy, key=busy.get) if busy else None,
            "per_stage": per_stage,
        },
        "versions": library_versions(),
        "config": {**asdict(config), "config_hash": digest},
    }
