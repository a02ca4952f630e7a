"""The grounding job: LAION-style Parquet -> pre-filters -> img2dataset -> Ray Data stages -> shards.

:class:`JobConfig` is the source of truth (presets: :func:`sample_job`, :func:`laion_job`);
:func:`run_job` runs it and returns the run report. Output layout under ``config.output``::

    config.json            the resolved config (+ its content hash)
    run_report.json        counts per reason, per-stage time and throughput, versions, config
    downloads/             img2dataset's own shards (NNNNN.parquet + NNNNN_stats.json), _input/ (+ ids.json)
    shards/<name>.parquet  grounding shards (GROUNDING_SCHEMA), <name> = <input-stem>-<NNNNN>
    rejects/<name>.parquet every filtered or failed input row (REJECTS_SCHEMA), same <name>

The work shard (``shard_rows`` rows of one input file) is the unit of resume: its two files are
written atomically (grounding shard first, rejects shard second) once all its rows are through, and
a rerun with the same config skips shards whose two files exist with the same config hash. Output
names and contents do not depend on Ray's block layout: rows are sorted by ``source_row``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grounding.detect import DetectorConfig
from grounding.phrases import PhraseConfig
from grounding.schema import REJECTS_SCHEMA, read_metadata, read_table, write_shard
from grounding.source import FilterConfig, SourceConfig, list_sources, prefilter, read_source, sample_rows, source_stem, split_shards
from pipeline.download import (DownloadConfig, discard_download, download_ids, download_path, is_downloaded, run_download,
                               write_inputs)
from pipeline.stages import OUTPUT_SCHEMA, TIMED, is_failure, split_output

DOWNLOAD_COLUMNS = ["sample_key", "source_shard", "source_row", "url", "caption", "status", "error_message",
                    "original_width", "original_height", "jpg"]


@dataclass
class RayConfig:
    """Where and how wide the Ray Data stages run (execution only: not part of the config hash)."""
    address: str | None = None       # None: $RAY_ADDRESS if set (ray job submit), else an embedded local Ray
    num_cpus: int | None = None      # embedded Ray only
    phrase_actors: int = 1
    phrase_cpus: float = 0.5         # fractional: on 2 cores, whole-CPU actors starve the read tasks
    detect_actors: int = 1
    detect_cpus: float = 0.5
    detect_gpus: float | None = None  # None: 1 per detector actor when the cluster has GPUs, else 0
    phrase_batch_size: int = 256
    detect_batch_size: int = 16
    num_blocks: int | None = None    # read_parquet's override_num_blocks

    def __post_init__(self):
        for name in ("phrase_actors", "detect_actors", "phrase_batch_size", "detect_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ray.{name} must be >= 1, got {getattr(self, name)}")
        if self.phrase_cpus <= 0 or self.detect_cpus <= 0:
            raise ValueError("ray.phrase_cpus and ray.detect_cpus must be > 0 (fractions allowed)")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"ray.num_blocks must be >= 1, got {self.num_blocks}")


@dataclass
class JobConfig:
    output: str = "out"
    source: SourceConfig = field(default_factory=SourceConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    phrases: PhraseConfig = field(default_factory=PhraseConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    min_boxes: int = 2                 # CogVLM / GRIT keep images with at least two boxes
    rec_template: str = "default"
    caption_template: str = "default"
    max_pixels: int = 89_478_485       # decompression-bomb guard, checked from the header before decoding
    sample: bool = False               # build from the bundled synthetic sample, served on 127.0.0.1
    sample_size: int = 48
    sample_seed: int = 0
    overwrite: bool = False            # replace an output folder that holds a run with another config

    def __post_init__(self):
        if self.min_boxes < 0:
            raise ValueError(f"min_boxes must be >= 0, got {self.min_boxes}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if not self.sample and not self.source.paths:
            raise ValueError("no input: give source paths (--input) or use the bundled sample (--sample)")
        if self.sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {self.sample_size}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobConfig":
        parts = {"source": SourceConfig, "filters": FilterConfig, "download": DownloadConfig,
                 "phrases": PhraseConfig, "detector": DetectorConfig, "ray": RayConfig}
        d = dict(d)
        d.pop("config_hash", None)
        det = d.get("detector")
        if d.get("sample") and isinstance(det, dict) and det.get("backend") == "annotations" and not det.get("annotations"):
            root = sample_root(d.get("output", "out"))  # the sample's truth, written there at run time
            d["detector"] = {**det, "annotations": os.path.join(root, "coco.json"), "refs": os.path.join(root, "refs.json")}
        for name, typ in parts.items():
            if name in d and isinstance(d[name], dict):
                d[name] = typ(**d[name])
        return cls(**d)


# --- presets ----------------------------------------------------------------------------------

def cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cogvlm_grounding")


def sample_job(output: str = "demo_out", **overrides) -> JobConfig:
    """The README demo: 48 synthetic images (+ broken and unsafe rows) served on 127.0.0.1, the tiny
    random GroundingDINO from a local cache dir, a 2-core-sized Ray."""
    return JobConfig(**{
        "output": output, "sample": True,
        "source": SourceConfig(shard_rows=16),
        "download": DownloadConfig(processes=1, threads=16, timeout=3),
        "detector": DetectorConfig(model=os.path.join(cache_dir(), "tiny-grounding-dino"), box_threshold=0.2,
                                   text_threshold=0.2, batch_size=4),
        "ray": RayConfig(detect_batch_size=8, phrase_batch_size=64),
        **overrides})


def laion_job(paths: list[str], output: str, **overrides) -> JobConfig:
    """Real LAION Parquet with GroundingDINO-T from the hub (or a local dir via detector.model)."""
    return JobConfig(**{"output": output, "source": SourceConfig(paths=list(paths)), **overrides})


# --- config hashing and output folders ------------------------------------------------------------

def content_config(config: JobConfig) -> dict:
    """The parts of the config that decide the output rows (execution settings left out)."""
    d = asdict(config)
    for k in ("output", "ray", "overwrite"):
        d.pop(k)
    for k in ("processes", "threads", "distributor"):
        d["download"].pop(k)
    for k in ("batch_size", "device"):
        d["detector"].pop(k)
    return d


def config_hash(config: JobConfig) -> str:
    blob = json.dumps(content_config(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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

    def shard(self, name: str) -> str:
        return self.join("shards", f"{name}.parquet")

    def rejects(self, name: str) -> str:
        return self.join("rejects", f"{name}.parquet")

    def exists(self, url: str) -> bool:
        return self.fs.exists(fsspec.core.url_to_fs(url)[1])

    def write_json(self, name: str, obj: Any) -> None:
        """Atomic JSON write (temporary name, then rename)."""
        self.fs.makedirs(self.path, exist_ok=True)
        p = f"{self.path}/{name}"
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
        for sub in ("shards", "rejects", "downloads"):
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
            raise ValueError(f"{layout.root} holds a run with another config (hash {previous.get('config_hash')} != "
                             f"{digest}); use a new --output or pass --overwrite to replace it")
        layout.clear()
    layout.write_json("config.json", {**asdict(config), "config_hash": digest})


# --- the bundled sample -------------------------------------------------------------------------

def sample_root(output: str) -> str:
    return os.path.join(fsspec.core.url_to_fs(output)[1], "sample")


SAMPLE_BROKEN = {"missing": 2, "corrupt": 1, "notimage": 1, "slow": 1}


def unsafe_sample_rows(base_url: str) -> list[dict]:
    """Rows the pre-filters must stop: cloud metadata, file://, empty caption, unsafe, duplicate URL."""
    row = {"WIDTH": 200, "HEIGHT": 200, "punsafe": 0.01, "pwatermark": 0.05, "similarity": 0.3}
    return [
        {**row, "key": "unsafe_metadata", "URL": "http://169.254.169.254/latest/meta-data/", "TEXT": "A red ball and a blue box"},
        {**row, "key": "unsafe_scheme", "URL": "file:///etc/passwd", "TEXT": "A red ball and a blue box"},
        {**row, "key": "empty_caption", "URL": f"{base_url}/images/empty.jpg", "TEXT": "  "},
        {**row, "key": "nsfw", "URL": f"{base_url}/images/nsfw.jpg", "TEXT": "A red ball and a blue box", "punsafe": 0.97},
        {**row, "key": "panorama", "URL": f"{base_url}/images/pano.jpg", "TEXT": "A red ball and a blue box",
         "WIDTH": 2000, "HEIGHT": 100},
    ]


@contextlib.contextmanager
def served_sample(config: JobConfig, layout: Layout) -> Iterator[JobConfig]:
    """Write the synthetic world under ``OUT/sample``, serve it on 127.0.0.1, resolve the config for it."""
    from dataclasses import replace

    from grounding.detect import save_tiny_detector
    from grounding.world import WorldServer, make_world, write_world

    root = sample_root(layout.root)
    world = make_world(config.sample_size, seed=config.sample_seed)
    with WorldServer(root, slow_seconds=config.download.timeout + 2) as server:
        files = write_world(root, world, base_url=server.base_url, broken=SAMPLE_BROKEN)
        table = pq.read_table(files.parquet)
        extra = unsafe_sample_rows(server.base_url)
        dup = dict(table.slice(0, 1).to_pylist()[0], key="duplicate_url")
        table = pa.concat_tables([table, pa.Table.from_pylist(extra + [dup], schema=table.schema)])
        pq.write_table(table, files.parquet)
        detector = config.detector
        if detector.backend == "annotations":
            detector = replace(detector, annotations=str(files.coco), refs=str(files.refs))
        elif detector.backend == "transformers" and not os.path.exists(os.path.join(detector.model, "config.json")):
            save_tiny_detector(detector.model)
        filters = replace(config.filters, allow_hosts=sorted(set(config.filters.allow_hosts) | {"127.0.0.1"}))
        yield replace(config, source=replace(config.source, paths=[str(files.parquet)]), filters=filters,
                      detector=detector)


# --- planning -------------------------------------------------------------------------------------

@dataclass
class WorkShard:
    name: str
    source_file: str
    rows: pa.Table               # rows to download (SOURCE_SCHEMA)
    prefilter_rejects: list[dict]
    input_rows: int


def plan_shards(config: JobConfig) -> list[WorkShard]:
    """Read the sources, sample, limit, cut into work shards and pre-filter them (deterministic)."""
    files = list_sources(config.source.paths)
    stems = [source_stem(f) for f in files]
    clash = sorted(s for s, n in Counter(stems).items() if n > 1)
    if clash:
        raise ValueError(f"input files share the name stems {clash}: shard names would collide; rename them")
    seen: set[str] = set()
    remaining = config.source.limit
    shards = []
    for f, stem in zip(files, stems):
        if remaining == 0:
            break
        table = sample_rows(read_source(f, config.source), config.source.sample_fraction, config.source.sample_seed)
        if remaining is not None:
            table = table.slice(0, remaining)
            remaining -= table.num_rows
        for name, part in split_shards(table, stem, config.source.shard_rows):
            kept, rejects = prefilter(part, name, config.filters, seen)
            shards.append(WorkShard(name, f, kept, rejects, part.num_rows))
    return shards


def is_finished(layout: Layout, name: str, digest: str) -> bool:
    """Both files present (the rejects shard is written last) and made by this config."""
    if not (layout.exists(layout.shard(name)) and layout.exists(layout.rejects(name))):
        return False
    try:
        return read_metadata(layout.shard(name))["provenance"].get("config_hash") == digest
    except Exception:  # noqa: BLE001 - an unreadable file is not finished
        return False


# --- Ray ----------------------------------------------------------------------------------------------

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


def build_dataset(config: JobConfig, paths: list[str]):
    """The Ray Data graph over download shards; resources are set here and only here."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.stages import DetectStage, PhraseStage, admit_downloads, assemble

    rc = config.ray
    gpus = rc.detect_gpus if rc.detect_gpus is not None else (1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
    ds = ray.data.read_parquet(paths, columns=DOWNLOAD_COLUMNS, override_num_blocks=rc.num_blocks)
    ds = ds.map_batches(admit_downloads, batch_format="pyarrow", batch_size=None, fn_kwargs={
        "max_pixels": config.max_pixels, "min_aspect": config.filters.min_aspect, "max_aspect": config.filters.max_aspect})
    ds = ds.map_batches(PhraseStage, batch_format="pyarrow", batch_size=rc.phrase_batch_size,
                        fn_constructor_kwargs={"config": config.phrases},
                        compute=ActorPoolStrategy(size=rc.phrase_actors), num_cpus=rc.phrase_cpus)
    ds = ds.map_batches(DetectStage, batch_format="pyarrow", batch_size=rc.detect_batch_size,
                        fn_constructor_kwargs={"config": config.detector, "max_pixels": config.max_pixels},
                        compute=ActorPoolStrategy(size=rc.detect_actors), num_cpus=rc.detect_cpus, num_gpus=gpus)
    return ds.map_batches(assemble, batch_format="pyarrow", batch_size=None, fn_kwargs={
        "min_boxes": config.min_boxes, "rec_template": config.rec_template, "caption_template": config.caption_template})


# --- collecting and writing -------------------------------------------------------------------------

def package_version() -> str:
    try:
        return metadata.version("cogvlm-grounding")
    except metadata.PackageNotFoundError:
        return "unknown"


class ShardCollector:
    """Gathers the job's output rows per work shard; writes a shard's two files once it is complete."""

    def __init__(self, layout: Layout, shards: list[WorkShard], digest: str, config: JobConfig):
        self.layout, self.digest, self.config = layout, digest, config
        self.shards = {s.name: s for s in shards}
        self.parts: dict[str, list[pa.Table]] = {s.name: [] for s in shards}
        self.seen: Counter = Counter()
        self.seconds: Counter = Counter()
        self.rows_timed: Counter = Counter()
        self.written: list[str] = []
        self.total = len(shards)

    def add(self, batch: pa.Table) -> None:
        for s in TIMED:
            col = batch[f"sec_{s}"]
            self.seconds[s] += pc.sum(col).as_py() or 0.0
            self.rows_timed[s] += col.length() - col.null_count
        for name in pc.unique(batch["source_shard"]).to_pylist():
            part = batch.filter(pc.equal(batch["source_shard"], name))
            self.parts[name].append(part)
            self.seen[name] += part.num_rows
            if self.seen[name] == self.shards[name].rows.num_rows:
                self.write(name)

    def write(self, name: str) -> None:
        shard = self.shards[name]
        parts = self.parts.pop(name, [])
        table = pa.concat_tables(parts) if parts else pa.Table.from_pylist([], schema=OUTPUT_SCHEMA)
        kept, rejects = split_output(table)
        kept = kept.sort_by("source_row")
        rejects = pa.concat_tables([rejects, pa.Table.from_pylist(shard.prefilter_rejects, schema=REJECTS_SCHEMA)])
        rejects = rejects.sort_by("source_row")
        failed = sum(1 for r in rejects["reason"].to_pylist() if is_failure(r))
        provenance = {
            "source_shard": name, "source_file": shard.source_file, "config_hash": self.digest,
            "detector": self.config.detector.backend if self.config.detector.backend == "annotations" else self.config.detector.model,
            "detector_backend": self.config.detector.backend,
            "detector_weights": detector_weights(self.config.detector),
            "phrase_model": getattr(self.config.phrases, "model", None),
            "package_version": package_version(),
            "counts": {"input": shard.input_rows, "kept": kept.num_rows,
                       "failed": failed, "filtered": rejects.num_rows - failed},
        }
        if kept.num_rows + rejects.num_rows != shard.input_rows:
            raise RuntimeError(f"{name}: {kept.num_rows} kept + {rejects.num_rows} rejected != {shard.input_rows} input rows")
        write_shard(kept, self.layout.shard(name), provenance)
        write_shard(rejects, self.layout.rejects(name), provenance, schema=REJECTS_SCHEMA)
        self.written.append(name)
        c = provenance["counts"]
        print(f"[{len(self.written)}/{self.total}] {name}: {c['kept']} kept, {c['filtered']} filtered, "
              f"{c['failed']} failed of {c['input']}", flush=True)

    def finish(self) -> None:
        """Shards with no rows to download are complete from the start."""
        for name, shard in self.shards.items():
            if shard.rows.num_rows == 0 and name in self.parts:
                self.write(name)
        missing = [n for n in self.parts if n not in self.written]
        if missing:
            raise RuntimeError(f"shards {missing} did not receive all their rows")


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


# --- the report -------------------------------------------------------------------------------------

def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "cogvlm-grounding": package_version()}
    for pkg in ("ray", "torch", "transformers", "spacy", "img2dataset", "pyarrow", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def build_report(layout: Layout, shards: list[WorkShard], config: JobConfig, digest: str,
                 timings: dict[str, float], collector: ShardCollector | None, skipped: list[str]) -> dict:
    """Counts from the files on disk (so a resumed run reports the whole output), times from this run."""
    filtered, failed, stages = Counter(), Counter(), Counter()
    kept = kept2 = inputs = 0
    for s in shards:
        inputs += s.input_rows
        nb = read_table(layout.shard(s.name), columns=["num_boxes"])["num_boxes"].to_pylist()
        kept += len(nb)
        kept2 += sum(1 for n in nb if n >= 2)
        rej = read_table(layout.rejects(s.name), columns=["stage", "reason"])
        for stage, reason in zip(rej["stage"].to_pylist(), rej["reason"].to_pylist()):
            (failed if is_failure(reason) else filtered)[reason] += 1
            stages[stage] += 1
    n_filtered, n_failed = sum(filtered.values()), sum(failed.values())
    per_stage = {}
    if collector is not None:
        for s in TIMED:
            busy = collector.seconds[s]
            rows = collector.rows_timed[s]
            per_stage[s] = {"rows": rows, "busy_seconds": round(busy, 3),
                            "rows_per_busy_second": round(rows / busy, 2) if busy > 0 else None}
    processed = sum(s.input_rows for s in shards if s.name not in skipped)
    return {
        "config_hash": digest,
        "counts": {"input": inputs, "kept": kept, "filtered": n_filtered, "failed": n_failed,
                   "adds_up": kept + n_filtered + n_failed == inputs},
        "filtered_by_reason": dict(sorted(filtered.items())),
        "failed_by_reason": dict(sorted(failed.items())),
        "rejects_by_stage": dict(sorted(stages.items())),
        "kept_with_2plus_boxes": kept2,
        "kept_with_2plus_boxes_share": round(kept2 / kept, 4) if kept else None,
        "shards": {"total": len(shards), "written_this_run": len(collector.written) if collector else 0,
                   "skipped_finished": len(skipped), "names": [s.name for s in shards]},
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
        "throughput": {
            "input_rows_this_run": processed,
            "job_rows_per_second": round(processed / timings["total"], 2) if timings.get("total") else None,
            "ray_stages_rows_per_second": round(sum(s.rows.num_rows for s in shards if s.name not in skipped)
                                                / timings["ray_stages"], 2) if timings.get("ray_stages") else None,
            "per_stage": per_stage,
        },
        "versions": library_versions(),
        "config": {**asdict(config), "config_hash": digest},
    }


# --- the job ------------------------------------------------------------------------------------------

def run_job(config: JobConfig) -> dict:
    """Run (or resume) the job; returns the run report (also written to ``OUT/run_report.json``)."""
    layout = Layout(config.output)
    layout.fs.makedirs(layout.path, exist_ok=True)
    t_start = time.perf_counter()
    with (served_sample(config, layout) if config.sample else contextlib.nullcontext(config)) as config:
        digest = config_hash(config)
        claim_output(layout, config, digest)
        layout.remove_stale_temporaries()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        shards = plan_shards(config)
        timings["plan_and_prefilter"] = time.perf_counter() - t0
        skipped = [s.name for s in shards if is_finished(layout, s.name, digest)]
        pending = [s for s in shards if s.name not in skipped]
        print(f"{len(shards)} shards, {len(skipped)} already finished, {len(pending)} to do", flush=True)

        with_rows = [s for s in shards if s.rows.num_rows]
        ids = download_ids(layout.downloads, [s.name for s in with_rows])

        def downloaded(s: WorkShard) -> bool:
            return is_downloaded(layout.downloads, ids[s.name], s.name, s.rows["source_row"].to_pylist())

        need = [s for s in pending if s.rows.num_rows and not downloaded(s)]
        t0 = time.perf_counter()
        if need:
            for s in need:  # a stale shard under this id (another shard's rows, or other rows) is redone
                discard_download(layout.downloads, ids[s.name])
            write_inputs([(s.name, s.rows) for s in with_rows], layout.downloads, ids)
            print(f"downloading {sum(s.rows.num_rows for s in need)} rows with img2dataset ...", flush=True)
            run_download(config.download, layout.downloads, config.source.shard_rows,
                         config.filters.allow_private_hosts, config.filters.allow_hosts)
            lost = [s.name for s in need if not downloaded(s)]
            if lost:
                raise RuntimeError(f"img2dataset did not finish shards {lost}; rerun the same command to retry")
        timings["download"] = time.perf_counter() - t0

        collector = ShardCollector(layout, pending, digest, config)
        t0 = time.perf_counter()
        todo = [s for s in pending if s.rows.num_rows]
        if todo:
            with ray_session(config.ray):
                ds = build_dataset(config, [download_path(layout.downloads, ids[s.name]) for s in todo])
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    collector.add(batch)
        collector.finish()
        timings["ray_stages"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        report = build_report(layout, shards, config, digest, timings, collector, skipped)
        layout.write_json("run_report.json", report)
    c = report["counts"]
    print(f"done: {c['input']} input rows -> {c['kept']} kept, {c['filtered']} filtered, {c['failed']} failed "
          f"in {timings['total']:.1f} s; report: {layout.join('run_report.json')}", flush=True)
    return report
