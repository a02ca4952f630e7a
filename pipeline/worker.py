"""One work shard, start to finish, on a Ray worker (this module never imports Ray).

:func:`process_shard` reads the shard's rows from its input file, samples and pre-filters them (DNS
resolved here, cached per worker process, bounded and timed out), drops the run-wide duplicate
URLs the dedup pre-pass found, downloads the rest with img2dataset's per-shard downloader, drops
images of named evaluation sets (``eval_overlap``), runs the stages of :mod:`pipeline.stages`
(boxes through ``detect``, a detector actor in the Ray job), and writes its kept rows' image hashes
(the input of :mod:`pipeline.image_dedup`), then the grounding shard and its rejects shard,
atomically, to the output filesystem. It returns a small summary (counts per reason and stage,
busy seconds per stage), the only thing the driver ever receives; the same summary is stored in
both files' provenance, so a rerun skips the shard and still reports it.
"""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from typing import Callable

import pyarrow as pa

from grounding.schema import REJECTS_SCHEMA, write_shard
from grounding.source import prefilter, read_source, sample_rows
from pipeline import dedup, image_dedup
from pipeline.config import JobConfig
from pipeline.download import download_shard
from pipeline.output import Layout, detector_weights, finished_summary, package_version, shard_counts
from pipeline.plan import WorkShard
from pipeline.stages import OUTPUT_SCHEMA, EvalOverlapStage, PhraseStage, admit_downloads, assemble, split_output

DOWNLOAD_COLUMNS = ["sample_key", "source_shard", "source_row", "url", "caption", "status", "error_message",
                    "original_width", "original_height", "jpg"]
Detect = Callable[[pa.Table], pa.Table]

_phrase_stages: dict[str, PhraseStage] = {}


def phrase_stage(config) -> PhraseStage:
    """spaCy loaded once per worker process (and phrase config), reused by every shard it runs."""
    key = repr(config)
    if key not in _phrase_stages:
        _phrase_stages[key] = PhraseStage(config)
    return _phrase_stages[key]


_eval_stages: dict[str, EvalOverlapStage] = {}


def eval_stage(config: JobConfig) -> EvalOverlapStage:
    """The evaluation sets' hash index, built once per worker process (and config)."""
    key = repr((config.eval_sets, config.dedup))
    if key not in _eval_stages:
        _eval_stages[key] = EvalOverlapStage(config.eval_sets, config.dedup)
    return _eval_stages[key]


def _batches(table: pa.Table, size: int):
    for i in range(0, table.num_rows, size):
        yield table.slice(i, size)


def _concat(parts: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(parts) if parts else schema.empty_table()


class Timer(Counter):
    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[stage] += time.perf_counter() - t0


def process_shard(shard: WorkShard, config: JobConfig, digest: str, detect: Detect, *, digits: int = 5,
                  dedup_group: int | None = None) -> dict:
    """Run one work shard and write its two files; returns its summary (or a finished shard's)."""
    layout = Layout(config.output)
    done = finished_summary(layout, shard.name, digest)
    if done is not None:
        return done
    timer, started_at, detect_at = Timer(), time.time(), None
    with timer("read"):
        rows = sample_rows(read_source(shard.source_file, config.source, shard.start, shard.stop),
                           config.source.sample_fraction, config.source.sample_seed)
    with timer("prefilter"):
        dups = (dedup.duplicate_rows(layout.dedup, shard.index, dedup_group)
                if config.filters.dedupe_urls and dedup_group is not None else set())
        kept, pre_rejects = prefilter(rows, shard.name, config.filters, dups, dns_threads=config.ray.dns_threads,
                                      dns_timeout=config.ray.dns_timeout)
    parts, detected = [], 0
    if kept.num_rows:
        with timer("download"):
            downloaded = download_shard(config.download, layout.downloads, shard.index, shard.name, kept,
                                        config.source.shard_rows, digits, config.filters.allow_private_hosts,
                                        config.filters.allow_hosts, max_pixels=config.max_pixels)
        with timer("decode"):
            batch = admit_downloads(downloaded.select(DOWNLOAD_COLUMNS).sort_by("source_row"), config.max_pixels,
                                    config.filters.min_aspect, config.filters.max_aspect)
            del downloaded
        if config.eval_sets:
            with timer("dedup"):
                batch = eval_stage(config)(batch)
        with timer("phrases"):
            stage = phrase_stage(config.phrases)
            batch = pa.concat_tables([stage(b) for b in _batches(batch, config.ray.phrase_batch_size)])
            detected = batch["stage"].null_count
        for b in _batches(batch, config.ray.detect_batch_size):
            detect_at = detect_at or time.time()
            with timer("detect"):
                b = detect(b)
            with timer("assemble"):
                parts.append(assemble(b, config.min_boxes, config.rec_template, config.caption_template))
        del batch
    with timer("write"):
        out_kept, rejects = split_output(_concat(parts, OUTPUT_SCHEMA))
        rejects = pa.concat_tables([rejects, pa.Table.from_pylist(pre_rejects, schema=REJECTS_SCHEMA)])
        out_kept, rejects = out_kept.sort_by("source_row"), rejects.sort_by("source_row")
        if out_kept.num_rows + rejects.num_rows != rows.num_rows:
            raise RuntimeError(f"{shard.name}: {out_kept.num_rows} kept + {rejects.num_rows} rejected != "
                               f"{rows.num_rows} input rows")
        summary = {"name": shard.name, "input": rows.num_rows, **shard_counts(out_kept, rejects),
                   "downloaded": kept.num_rows, "detected": detected}
        provenance = {
            "source_shard": shard.name, "source_file": shard.source_file, "source_rows": [shard.start, shard.stop],
            "config_hash": digest,
            "detector": config.detector.backend if config.detector.backend == "annotations" else config.detector.model,
            "detector_backend": config.detector.backend, "detector_weights": detector_weights(config.detector),
            "phrase_model": getattr(config.phrases, "model", None), "package_version": package_version(),
            "counts": {k: summary[k] for k in ("input", "kept", "failed", "filtered")}, "summary": summary,
        }
        if config.dedupe_images:  # the run-wide image dedup's input, written before the shard counts as finished
            image_dedup.write_hashes(layout, shard, out_kept, config.dedup)
        write_shard(out_kept, layout.shard(shard.name), provenance)
        write_shard(rejects, layout.rejects(shard.name), provenance, schema=REJECTS_SCHEMA)
    return {**summary, "skipped": False, "seconds": dict(timer), "started_at": started_at, "detect_at": detect_at,
            "written_at": time.time()}
