"""The grounding job's configuration: :class:`JobConfig` (source of truth) and its content hash.

:func:`config_hash` digests the parts of the config that decide the output rows; execution
settings (output folder, Ray sizing, download parallelism, detector batch size and device) are left
out, so a rerun on another cluster shape resumes the same output.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from grounding.dedup import DedupConfig, parse_eval_sets
from grounding.detect import DetectorConfig
from grounding.image import MAX_PIXELS
from grounding.phrases import PhraseConfig
from grounding.source import FilterConfig, SourceConfig
from pipeline.download import DownloadConfig


@dataclass
class RayConfig:
    """Where and how wide the job runs on Ray (execution only: not part of the config hash)."""
    address: str | None = None       # None: $RAY_ADDRESS if set (ray job submit), else an embedded local Ray
    num_cpus: int | None = None      # embedded Ray only
    shard_cpus: float = 0.5          # per shard task (read, pre-filter, download, decode, phrases, assemble, write)
    max_shards_in_flight: int | None = None  # backpressure: None -> 2 per CPU of the cluster (at least 2)
    detect_actors: int = 1
    detect_cpus: float = 0.5         # fractional: on 2 cores, whole-CPU actors starve the shard tasks
    detect_gpus: float | None = None  # None: 1 per detector actor when the cluster has GPUs, else 0
    phrase_batch_size: int = 256
    detect_batch_size: int = 16
    dedup_partitions: int | None = None  # URL-hash partitions of the dedup pre-pass; None -> ~1 per 4 shards (1..256)
    dns_threads: int = 16            # concurrent DNS look-ups per shard task
    dns_timeout: float = 5.0         # seconds per host look-up (from its start); one not answered by then: dns_timeout

    def __post_init__(self):
        for name in ("detect_actors", "phrase_batch_size", "detect_batch_size", "dns_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"ray.{name} must be >= 1, got {getattr(self, name)}")
        if self.shard_cpus <= 0 or self.detect_cpus <= 0:
            raise ValueError("ray.shard_cpus and ray.detect_cpus must be > 0 (fractions allowed)")
        for name in ("max_shards_in_flight", "dedup_partitions"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"ray.{name} must be >= 1, got {v}")
        if self.dns_timeout <= 0:
            raise ValueError(f"ray.dns_timeout must be > 0, got {self.dns_timeout}")


@dataclass
class JobConfig:
    """One grounding job over real input files (the bundled demo builds one in :mod:`pipeline.sample`)."""
    output: str = "out"
    source: SourceConfig = field(default_factory=SourceConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    phrases: PhraseConfig = field(default_factory=PhraseConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)  # image hashes: phash size, Hamming threshold
    eval_sets: tuple[str, ...] = ()    # NAME=PATH (a hash Parquet or an image folder): rows near them -> eval_overlap
    dedupe_images: bool = True         # run-wide duplicate_image / near_duplicate after the shard tasks
    min_boxes: int = 2                 # CogVLM / GRIT keep images with at least two boxes
    rec_template: str = "default"
    caption_template: str = "default"
    max_pixels: int = MAX_PIXELS       # one pixel limit: img2dataset's on the fetched image, then the header check
                                       # of the stored one before decoding (decompression bombs); over it: too_many_pixels
    overwrite: bool = False            # replace an output folder that holds a run with another config

    def __post_init__(self):
        if self.min_boxes < 0:
            raise ValueError(f"min_boxes must be >= 0, got {self.min_boxes}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if not self.source.paths:
            raise ValueError("no input: give source paths (--input) or use the bundled sample (--sample)")
        parse_eval_sets(self.eval_sets)  # NAME=PATH, names unique

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobConfig":
        parts = {"source": SourceConfig, "filters": FilterConfig, "download": DownloadConfig,
                 "phrases": PhraseConfig, "detector": DetectorConfig, "ray": RayConfig, "dedup": DedupConfig}
        d = dict(d)
        d.pop("config_hash", None)    # an output's config.json records these beside the config
        d.pop("rows_version", None)
        if isinstance(d.get("download"), dict) and "max_image_area" in d["download"]:  # from before the one pixel limit
            download = dict(d["download"])
            area = int(download.pop("max_image_area"))
            d["download"] = download
            if d.get("max_pixels", MAX_PIXELS) == MAX_PIXELS:   # the old download limit stands in for an unset max_pixels
                d["max_pixels"] = area
        for name, typ in parts.items():
            if name in d and isinstance(d[name], dict):
                d[name] = typ(**d[name])
        return cls(**d)


# Bumped when the code changes the rows a config writes, so that an output folder written before refuses to
# resume into mixed rows (rerun with --overwrite). 2: EXIF-oriented images stored and boxed upright; GroundingDINO
# batches only images of one preprocessed shape (boxes no longer depend on their batch neighbours).
ROWS_VERSION = 2


def content_config(config: JobConfig) -> dict:
    """The parts of the config that decide the output rows (execution settings left out), and the version of
    the code's row making (:data:`ROWS_VERSION`)."""
    d = asdict(config)
    d["rows_version"] = ROWS_VERSION
    for k in ("output", "ray", "overwrite"):
        d.pop(k)
    for k in ("threads",):
        d["download"].pop(k)
    for k in ("batch_size", "device"):
        d["detector"].pop(k)
    # hashed as when img2dataset's limit was a separate download setting equal to max_pixels, so outputs
    # written then resume unchanged
    d["download"]["max_image_area"] = d["max_pixels"]
    return d


def config_hash(config: JobConfig) -> str:
    blob = json.dumps(content_config(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
