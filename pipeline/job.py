"""The Ray graph of the grounding job: plan on the driver, everything per row on the workers.

:func:`run_job` (driver)::

    output check          on a multi-node cluster, a probe file under --output must be visible from every
                          node (check_output_shared): a node-local path fails here, before any work
    detector actor pool   started first: GroundingDINO (or annotations) loaded once per actor, while the
                          driver plans and the dedup pre-pass runs; 1 GPU each on a GPU cluster
    plan_shards           file listings + Parquet footers -> work shards (file, row range)
    dedup pre-pass        map tasks per group of shards, reduce tasks per URL-hash bucket, one losers
                          file per group (pipeline.dedup), in a driver thread beside the shard tasks: the
                          first group's shards start after its map task, the others after the pass
    shard tasks           pipeline.worker.process_shard: read, pre-filter (DNS), img2dataset, decode,
                          phrases, boxes (via the actor pool), assembly, atomic writes
    image dedup           after the last shard task: map / reduce / apply over the shards' image hashes
                          (pipeline.image_dedup): duplicate_image, near_duplicate
    report                from the shard tasks' summaries -> OUT/run_report.json

Streaming and backpressure: at most ``ray.max_shards_in_flight`` shard tasks exist at once (two per
detector actor until the actors have loaded their models: :class:`WarmupGate`, so the first shard's
boxing waits for the model load only, not for CPU taken by shards that could not be boxed yet); a
new one is submitted when one finishes, so the boxing of early shards overlaps the download of later
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
import threading
import time
import uuid
from typing import Iterator

import fsspec

from grounding.cli import UsageError
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


def sees(url: str) -> bool:
    """On one node: whether the driver's probe file is visible there."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def unshared_output_error(output: str, seen: dict[str, bool]) -> str | None:
    """The error for an output folder some nodes cannot see (node id -> saw the probe file), else None."""
    missing = sorted(n for n, ok in seen.items() if not ok)
    if not missing:
        return None
    return (f"--output {output} is not visible from {len(missing)} of {len(seen)} Ray nodes "
            f"({', '.join(n[:12] for n in missing[:5])}{', ...' if len(missing) > 5 else ''}): every node writes "
            "its shards there and the URL and image dedup read every node's files back, so on a multi-node "
            "cluster give a folder every node mounts (NFS, ...) or an fsspec URL (s3://, gs://, ...)")


def check_output_shared(layout: Layout, timeout: float = 120.0) -> dict[str, bool]:
    """Fail before any work when a node of a multi-node cluster cannot see the output folder (a node-local
    path would split the shards over the nodes' disks and leave the dedup passes without their inputs).

    The driver writes a probe file under ``--output`` and a zero-CPU task pinned to each alive node looks
    for it; returns node id -> seen (empty on one node). A node that does not answer within ``timeout``
    or leaves meanwhile is not judged, nor is one that joins later (autoscaling).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    if len(nodes) < 2:
        return {}
    probe = layout.join(f".node-probe-{uuid.uuid4().hex}")
    probe_path = fsspec.core.url_to_fs(probe)[1]
    layout.fs.makedirs(layout.path, exist_ok=True)
    with layout.fs.open(probe_path, "w") as f:
        f.write("every node of the job must see this file\n")
    try:
        task = ray.remote(sees)
        refs = {n: task.options(num_cpus=0, max_retries=0,
                                scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(probe)
                for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        seen = {}
        for node, ref in refs.items():
            if ref in ready:
                try:
                    seen[node] = ray.get(ref)
                except ray.exceptions.RayError:  # the node left meanwhile
                    pass
    finally:
        layout.fs.rm(probe_path)
    error = unshared_output_error(layout.root, seen)
    if error:
        raise UsageError(error)
    return seen


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


class WarmupGate:
    """The shard tasks' in-flight limit: two per detector actor (the shard it boxes first and the next
    one) until every actor has loaded its model, then ``limit``. No shard can be boxed before a detector
    is loaded, so while the models load only the first shards run (their boxing is the first output);
    more shard tasks would only take CPU from the model load and hold downloaded images waiting. A
    model that fails to load opens the gate too."""

    def __init__(self, ready: list, limit: int):
        self.ready, self.limit, self.opened_at = ready, limit, None

    def __call__(self) -> int:
        import ray

        if self.opened_at is None:
            done, _ = ray.wait(self.ready, num_returns=len(self.ready), timeout=0)
            if len(done) < len(self.ready):
                return min(self.limit, 2 * len(self.ready))
            self.opened_at = time.perf_counter()
        return self.limit


def bounded(submit, items, limit, on_result, ready=None) -> list[tuple[object, BaseException]]:
    """Run ``submit(item)`` (-> ObjectRef) over ``items`` in order with at most ``limit`` in flight
    (an int, or a callable giving the limit now); an item is submitted once ``ready(item)`` (if given)
    says so; ``on_result(item, value)`` as each finishes. Returns the (item, error) of those that failed."""
    import ray

    end = object()
    items = iter(items)
    running: dict = {}
    errors = []
    limit_now = limit if callable(limit) else (lambda: limit)
    pending = None
    while True:
        cap = limit_now()
        while len(running) < cap:
            pending = next(items, end) if pending is None else pending
            if pending is end or (ready is not None and not ready(pending)):
                break
            running[submit(pending)] = pending
            pending = None
        if not running:
            if pending is end:
                return errors
            time.sleep(0.1)  # the next item is not ready yet
            continue
        # a limit that may rise (the warm-up gate) or an item that may become ready: looked at every second
        changing = callable(limit) or ready is not None
        done, _ = ray.wait(list(running), num_returns=1, timeout=1.0 if changing else None)
        for ref in done:
            item = running.pop(ref)
            try:
                on_result(item, ray.get(ref))
            except Exception as e:  # noqa: BLE001 - reported after the other shards are done
                errors.append((item, e))


class DedupPass:
    """The URL dedup pre-pass (:mod:`pipeline.dedup`) in a driver thread, beside the shard tasks.

    A shard may start once its losers file exists: group 0's right after its map task (no earlier
    group can hold one of its URLs), the others after the whole pass, so the first shards do not wait
    behind the pass. Skipped when already done for this plan."""

    def __init__(self, config: JobConfig, layout: Layout, shards: list[WorkShard], limit: int):
        self.error: BaseException | None = None
        self.first, self.all = threading.Event(), threading.Event()
        self.t0, self.seconds = time.perf_counter(), 0.0
        done = dedup.done_marker(layout.dedup)
        if done is not None and done["plan"] == plan_digest(shards) and "groups" in done:
            self.groups, self.stats = [tuple(g) for g in done["groups"]], {**done, "skipped": True}
            self.first.set()
            self.all.set()
            return
        dedup.clear(layout.dedup)
        self.groups, self.stats = dedup.map_groups(len(shards)), {}
        threading.Thread(target=self._run, args=(config, layout, shards, limit), daemon=True).start()

    def _run(self, config: JobConfig, layout: Layout, shards: list[WorkShard], limit: int) -> None:
        import ray

        try:
            groups = self.groups
            partitions = config.ray.dedup_partitions or dedup.default_partitions(len(shards))
            opts = {"num_cpus": config.ray.shard_cpus, "max_retries": 3}
            map_task = ray.remote(dedup.map_group).options(**opts)
            reduce_task = ray.remote(dedup.reduce_bucket).options(**opts)
            gather_task = ray.remote(dedup.gather_group).options(**opts)
            counts = {"candidates": 0, "duplicates": 0}

            def mapped(g, result):
                counts["candidates"] += result[0]
                if g == 0:
                    counts["duplicates"] += result[1]
                    self.first.set()

            def gathered(_, n):
                counts["duplicates"] += n

            errors = bounded(lambda g: map_task.remote(layout.dedup, g, shards[slice(*groups[g])], config.source,
                                                       config.filters, partitions), range(len(groups)), limit, mapped)
            if not errors:
                errors = bounded(lambda b: reduce_task.remote(layout.dedup, b, groups), range(partitions), limit,
                                 lambda _, n: None)
            if not errors:
                errors = bounded(lambda g: gather_task.remote(layout.dedup, g, *groups[g], partitions),
                                 range(1, len(groups)), limit, gathered)
            if errors:
                raise RuntimeError(f"the dedup pre-pass failed: {errors[0][1]}") from errors[0][1]
            dedup.mark_done(layout.dedup, plan_digest(shards), groups, partitions, counts["candidates"],
                            counts["duplicates"])
            self.stats = {**counts, "partitions": partitions, "map_groups": len(groups), "skipped": False}
        except BaseException as e:  # noqa: BLE001 - raised in the driver's thread by ready() / wait()
            self.error = e
        finally:
            self.seconds = time.perf_counter() - self.t0
            self.first.set()
            self.all.set()

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the dedup pre-pass failed (rerun to redo it): {self.error}") from self.error

    def group(self, shard: WorkShard) -> int:
        return dedup.group_of(self.groups, shard.index)

    def ready(self, shard: WorkShard) -> bool:
        self._raise()
        return (self.first if self.group(shard) == 0 else self.all).is_set()

    def wait(self) -> dict:
        self.all.wait()
        self._raise()
        return self.stats


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
        self.first: dict = {}

    def add(self, s: dict) -> None:
        self.done += 1
        if not s.get("skipped"):
            self.rows += s["input"]
            for k, v in s["seconds"].items():
                self.busy[k] = self.busy.get(k, 0.0) + v
            if self.first_written is None:
                self.first_written, self.first = time.perf_counter(), s
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
    summaries: dict[str, dict] = {}
    with ray_session(config.ray):
        wall_start = time.time() - (time.perf_counter() - t_start)
        check_output_shared(layout)   # a multi-node cluster needs an output folder every node sees
        limit = config.ray.max_shards_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        actors, ready = start_detectors(config)  # first: the models load while planning and the dedup pre-pass run
        detect = PoolDetect(actors)
        t0 = time.perf_counter()
        shards = plan_shards(config.source)
        timings["plan"] = time.perf_counter() - t0
        print(f"{len(shards)} work shards planned from file footers", flush=True)
        urls = DedupPass(config, layout, shards, limit) if config.filters.dedupe_urls and shards else None
        task = ray.remote(process_shard).options(num_cpus=config.ray.shard_cpus, max_retries=3, retry_exceptions=True)
        digits = id_digits(shards)
        progress = Progress(len(shards))
        gate = WarmupGate(ready, limit)
        t_shards = time.perf_counter()

        def record(shard: WorkShard, summary: dict) -> None:
            summaries[shard.name] = summary
            progress.add(summary)

        errors = bounded(lambda s: task.remote(s, config, digest, detect, digits=digits,
                                               dedup_group=urls.group(s) if urls else None),
                         shards, gate, record, ready=urls.ready if urls else None)
        dedup_stats = urls.wait() if urls else {}
        timings["dedup"] = urls.seconds if urls else 0.0  # wall time of the pass, beside the shard tasks
        timings["shards"] = time.perf_counter() - t_shards
        timings["shards_done"] = time.perf_counter() - t_start
        if progress.first_written is not None:  # the first shard written this run: when it started, asked for boxes, was written
            timings["first_shard_written"] = progress.first_written - t_start
            for key, name in (("started_at", "first_shard_started"), ("detect_at", "first_shard_detect_called")):
                if progress.first.get(key) is not None:
                    timings[name] = max(0.0, progress.first[key] - wall_start)
        if gate.opened_at is not None:
            timings["warmup_gate_opened"] = gate.opened_at - t_start
        t_loaded = loaded_at(ready)
        if t_loaded is not None:  # seconds from the start to the last detector loaded
            timings["detectors_loaded"] = max(0.0, t_loaded - wall_start)
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
