"""The Ray graph of the grounding job: plan on the driver, everything per row on the workers.

:func:`run_job` (driver)::

    plan_shards           file listings + Parquet footers -> work shards (file, row range)
    dedup pre-pass        map tasks per shard, reduce tasks per URL-hash bucket (pipeline.dedup)
    detector actor pool   GroundingDINO (or annotations) loaded once per actor; 1 GPU each on a GPU cluster
    shard tasks           pipeline.worker.process_shard: read, pre-filter (DNS), img2dataset, decode,
                          phrases, boxes (via the actor pool), assembly, atomic writes
    image dedup           after the last shard task: map / reduce / apply over the shards' image hashes
                          (pipeline.image_dedup): duplicate_image, near_duplicate
    report                from the shard tasks' summaries -> OUT/run_report.json

Streaming and backpressure: at most ``ray.max_shards_in_flight`` shard tasks exist at once; a new
one is submitted when one finishes, so the boxing of early shards overlaps the download of later
ones and memory stays bounded by the shards in flight, whatever the input size. The driver holds
the plan (one small record per shard) and the summaries; no row, URL or image reaches it.

Fault tolerance: a shard task lost with its node is retried by Ray (``max_retries``); a detector
actor is restarted elsewhere (``max_restarts``). A shard's files appear atomically, so a retry or
a rerun redoes a half-done shard whole and skips a finished one.
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from typing import Iterator

from pipeline import dedup, image_dedup
from pipeline.config import JobConfig, RayConfig, config_hash
from pipeline.output import Layout, build_report, claim_output
from pipeline.plan import WorkShard, id_digits, plan_digest, plan_shards


@contextlib.contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Connect to ``address`` / $RAY_ADDRESS, or start an embedded local Ray (shut down afterwards)."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


class DetectActor:
    """A detector loaded once; ``detect`` maps a work batch to the same batch with boxes."""

    def __init__(self, config, max_pixels: int, threads: int = 1):
        import torch

        from pipeline.stages import DetectStage

        torch.set_num_threads(threads)
        self.stage = DetectStage(config, max_pixels)
        self.loaded_at = time.time()

    def ready(self) -> float:
        """When the model finished loading (wall clock)."""
        return self.loaded_at

    def detect(self, batch):
        return self.stage(batch)


class PoolDetect:
    """The ``detect`` callable handed to shard tasks: a batch goes to one actor of the pool."""

    def __init__(self, actors: list):
        self.actors = actors

    def __call__(self, batch):
        import ray

        return ray.get(random.choice(self.actors).detect.remote(batch))


def start_detectors(config: JobConfig) -> tuple[list, list]:
    """The detector actors and their ``ready`` refs; models load in the background, while the first
    shards download (a run that boxes nothing never needs them)."""
    import ray

    rc = config.ray
    gpus = rc.detect_gpus if rc.detect_gpus is not None else (1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
    actor = ray.remote(DetectActor).options(num_cpus=rc.detect_cpus, num_gpus=gpus, max_restarts=-1,
                                            max_task_retries=-1)
    actors = [actor.remote(config.detector, config.max_pixels, max(1, round(rc.detect_cpus))) for _ in range(rc.detect_actors)]
    return actors, [a.ready.remote() for a in actors]


def loaded_at(ready: list) -> float | None:
    """When the last detector actor finished loading, if all did."""
    import ray

    done, _ = ray.wait(ready, num_returns=len(ready), timeout=0)
    try:
        return max(ray.get(done)) if len(done) == len(ready) else None
    except Exception:  # noqa: BLE001 - a model that failed to load is reported by the shards that needed it
        return None


def bounded(submit, items, limit: int, on_result) -> list[tuple[object, BaseException]]:
    """Run ``submit(item)`` (-> ObjectRef) over ``items`` with at most ``limit`` in flight;
    ``on_result(item, value)`` as each finishes. Returns the (item, error) of those that failed."""
    import ray

    items = iter(items)
    running: dict = {}
    errors = []
    while True:
        while len(running) < limit:
            item = next(items, None)
            if item is None:
                break
            running[submit(item)] = item
        if not running:
            return errors
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            item = running.pop(ref)
            try:
                on_result(item, ray.get(ref))
            except Exception as e:  # noqa: BLE001 - reported after the other shards are done
                errors.append((item, e))


def run_dedup(config: JobConfig, layout: Layout, shards: list[WorkShard], limit: int) -> tuple[int, dict]:
    """The URL dedup pre-pass (skipped when already done for this plan); returns (partitions, stats)."""
    import ray

    partitions = config.ray.dedup_partitions or dedup.default_partitions(len(shards))
    digest = plan_digest(shards)
    done = dedup.done_marker(layout.dedup)
    if done is not None and done["plan"] == digest:
        return done["partitions"], {**done, "skipped": True}
    dedup.clear(layout.dedup)
    opts = {"num_cpus": config.ray.shard_cpus, "max_retries": 3}
    map_task = ray.remote(dedup.map_shard).options(**opts)
    reduce_task = ray.remote(dedup.reduce_bucket).options(**opts)
    counts = {"candidates": 0, "duplicates": 0}

    def add(key):
        return lambda _, n: counts.__setitem__(key, counts[key] + n)

    errors = bounded(lambda s: map_task.remote(layout.dedup, s, config.source, config.filters, partitions),
                     shards, limit, add("candidates"))
    errors += bounded(lambda b: reduce_task.remote(layout.dedup, b, len(shards)), range(partitions), limit,
                      add("duplicates"))
    if errors:
        raise RuntimeError(f"the dedup pre-pass failed: {errors[0][1]}") from errors[0][1]
    dedup.mark_done(layout.dedup, digest, partitions, counts["candidates"], counts["duplicates"])
    return partitions, {**counts, "partitions": partitions, "skipped": False}


def run_image_dedup(config: JobConfig, layout: Layout, shards: list[WorkShard], limit: int,
                    summaries: dict[str, dict]) -> dict:
    """The image dedup post-pass (pipeline.image_dedup): map, reduce, apply; updates ``summaries``."""
    import ray

    partitions = config.ray.dedup_partitions or dedup.default_partitions(len(shards))
    opts = {"num_cpus": config.ray.shard_cpus, "max_retries": 3}
    map_task = ray.remote(image_dedup.map_shard).options(**opts)
    reduce_task = ray.remote(image_dedup.reduce_bucket).options(**opts)
    apply_task = ray.remote(image_dedup.apply_shard).options(**opts)
    counts = {"partition_records": 0, "drops": 0, "shards_changed": 0}

    def add(key):
        return lambda _, n: counts.__setitem__(key, counts[key] + n)

    def applied(shard: WorkShard, new: dict | None) -> None:
        if new is not None:
            summaries[shard.name] = {**summaries[shard.name], **new}
            counts["shards_changed"] += 1

    out = config.output
    errors = bounded(lambda s: map_task.remote(out, s.index, partitions, config.dedup), shards, limit,
                     add("partition_records"))
    errors += bounded(lambda b: reduce_task.remote(out, b, len(shards), config.dedup), range(partitions), limit,
                      add("drops"))
    errors += bounded(lambda s: apply_task.remote(out, s.index, s.name, partitions), shards, limit, applied)
    if errors:
        raise RuntimeError(f"the image dedup pass failed (rerun to redo it): {errors[0][1]}") from errors[0][1]
    return {**counts, "partitions": partitions}


class Progress:
    """Shards done / total, input rows per second and the slowest stage so far, one line per shard."""

    def __init__(self, total: int):
        self.total, self.done, self.rows, self.t0 = total, 0, 0, time.perf_counter()
        self.busy: dict[str, float] = {}
        self.first_written: float | None = None

    def add(self, s: dict) -> None:
        self.done += 1
        if not s.get("skipped"):
            self.rows += s["input"]
            for k, v in s["seconds"].items():
                self.busy[k] = self.busy.get(k, 0.0) + v
            self.first_written = self.first_written or time.perf_counter()
        rate = self.rows / max(time.perf_counter() - self.t0, 1e-9)
        slowest = max(self.busy, key=self.busy.get) if self.busy else "-"
        state = "finished earlier" if s.get("skipped") else f"{s['kept']} kept, {s['filtered']} filtered, {s['failed']} failed"
        print(f"[{self.done}/{self.total}] {s['name']}: {state} of {s['input']} | {rate:.1f} rows/s | "
              f"slowest stage: {slowest}", flush=True)


def run_job(config: JobConfig) -> dict:
    """Run (or resume) the job; returns the run report (also written to ``OUT/run_report.json``)."""
    import ray

    from pipeline.worker import process_shard

    t_start = time.perf_counter()
    layout = Layout(config.output)
    layout.fs.makedirs(layout.path, exist_ok=True)
    digest = config_hash(config)
    claim_output(layout, config, digest)
    layout.remove_stale_temporaries()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    shards = plan_shards(config.source)
    timings["plan"] = time.perf_counter() - t0
    print(f"{len(shards)} work shards planned from file footers", flush=True)
    summaries: dict[str, dict] = {}
    with ray_session(config.ray):
        limit = config.ray.max_shards_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        actors, ready = start_detectors(config)  # the models load while the dedup pre-pass runs
        detect = PoolDetect(actors)
        t0 = time.perf_counter()
        partitions, dedup_stats = run_dedup(config, layout, shards, limit) if config.filters.dedupe_urls else (None, {})
        timings["dedup"] = time.perf_counter() - t0
        task = ray.remote(process_shard).options(num_cpus=config.ray.shard_cpus, max_retries=3, retry_exceptions=True)
        digits = id_digits(shards)
        progress = Progress(len(shards))
        t_shards = time.perf_counter()

        def record(shard: WorkShard, summary: dict) -> None:
            summaries[shard.name] = summary
            progress.add(summary)

        errors = bounded(lambda s: task.remote(s, config, digest, detect, digits=digits, dedup_partitions=partitions),
                         shards, limit, record)
        timings["shards"] = time.perf_counter() - t_shards
        timings["shards_done"] = time.perf_counter() - t_start
        if progress.first_written is not None:
            timings["first_shard_written"] = progress.first_written - t_start
        t_loaded = loaded_at(ready)
        if t_loaded is not None:  # seconds from the start to the last detector loaded
            timings["detectors_loaded"] = max(0.0, t_loaded - (time.time() - (time.perf_counter() - t_start)))
        for a in actors:
            ray.kill(a)
        image_stats: dict = {}
        if config.dedupe_images and not errors:  # needs every shard's hashes: after the last shard task
            t0 = time.perf_counter()
            image_stats = run_image_dedup(config, layout, shards, limit, summaries)
            timings["image_dedup"] = time.perf_counter() - t0
    if errors:
        names = [s.name for s, _ in errors]
        raise RuntimeError(f"{len(errors)} shards failed ({names[:10]}); rerun the same command to redo them: "
                           f"{errors[0][1]}") from errors[0][1]
    timings["total"] = time.perf_counter() - t_start
    report = build_report([summaries[s.name] for s in shards], config, digest, timings)
    report["dedup"] = dedup_stats
    report["image_dedup"] = image_stats
    layout.write_json("run_report.json", report)
    c = report["counts"]
    print(f"done: {c['input']} input rows -> {c['kept']} kept, {c['filtered']} filtered, {c['failed']} failed "
          f"in {timings['total']:.1f} s; report: {layout.join('run_report.json')}", flush=True)
    return report
