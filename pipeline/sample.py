"""The README demo: a synthetic LAION-style sample written under ``OUT/sample`` and served on 127.0.0.1.

:func:`sample_job` is the demo's :class:`~pipeline.config.JobConfig`, a real job whose input is
``OUT/sample/laion.parquet``; :func:`served_sample` writes that file (48 synthetic images plus broken
and unsafe rows) and serves the images while the job runs. The demo boxes with the small GroundingDINO
trained on the synthetic world (``assets/demo_detector``, made by ``benchmarks/train_detector.py``); where
the package is installed without that folder it falls back to a tiny random one saved to a cache dir.
Nothing here is part of a real job.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from grounding.detect import DetectorConfig
from grounding.source import FilterConfig, SourceConfig
from pipeline.config import JobConfig, RayConfig
from pipeline.download import DownloadConfig

SAMPLE_BROKEN = {"missing": 2, "corrupt": 1, "notimage": 1, "slow": 1}


@dataclass
class SampleConfig:
    size: int = 48
    seed: int = 0

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"sample size must be >= 1, got {self.size}")


def cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cogvlm_grounding")


def sample_root(output: str) -> str:
    return os.path.join(fsspec.core.url_to_fs(output)[1], "sample")


DEMO_DETECTOR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo_detector")
# benchmarks/results/detector_train.json: precision / recall 0.82 / 0.80 at 0.25 on held-out world images
DEMO_THRESHOLD = 0.25


def demo_detector() -> DetectorConfig:
    """The trained demo GroundingDINO, or (without the repo's assets) the tiny random one at 0.2."""
    if os.path.exists(os.path.join(DEMO_DETECTOR, "config.json")):
        return DetectorConfig(model=DEMO_DETECTOR, box_threshold=DEMO_THRESHOLD, text_threshold=DEMO_THRESHOLD,
                              batch_size=4)
    return DetectorConfig(model=os.path.join(cache_dir(), "tiny-grounding-dino"), box_threshold=0.2,
                          text_threshold=0.2, batch_size=4)


def sample_job(output: str = "demo_out", **overrides) -> JobConfig:
    """The demo job: the sample's Parquet as input, 127.0.0.1 allowed, the trained demo GroundingDINO,
    a 2-core-sized Ray."""
    return JobConfig(**{
        "output": output,
        "source": SourceConfig(paths=[os.path.join(sample_root(output), "laion.parquet")], shard_rows=16),
        "filters": FilterConfig(allow_hosts=["127.0.0.1"]),
        "download": DownloadConfig(threads=16, timeout=3),
        "detector": demo_detector(),
        "ray": RayConfig(detect_batch_size=8, phrase_batch_size=64),
        **overrides})


def with_sample_annotations(config: dict) -> dict:
    """A config dict whose annotations backend has no file reads the sample's own truth (written beside its Parquet)."""
    det = config.get("detector") or {}
    if det.get("backend") != "annotations" or det.get("annotations"):
        return config
    root = sample_root(config.get("output", "demo_out"))
    return {**config, "detector": {**det, "annotations": os.path.join(root, "coco.json"),
                                   "refs": os.path.join(root, "refs.json")}}


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
def served_sample(config: JobConfig, sample: SampleConfig) -> Iterator[JobConfig]:
    """Write the synthetic world to ``config``'s input path, serve it on 127.0.0.1 while inside."""
    from grounding.testing import save_tiny_detector
    from grounding.world import WorldServer, make_world, write_world

    parquet = config.source.paths[0]
    root = os.path.dirname(parquet)
    world = make_world(sample.size, seed=sample.seed)
    with WorldServer(root, slow_seconds=config.download.timeout + 2) as server:
        files = write_world(root, world, base_url=server.base_url, broken=SAMPLE_BROKEN,
                            parquet_name=os.path.basename(parquet))
        table = pq.read_table(files.parquet)
        extra = unsafe_sample_rows(server.base_url)
        dup = dict(table.slice(0, 1).to_pylist()[0], key="duplicate_url")
        table = pa.concat_tables([table, pa.Table.from_pylist(extra + [dup], schema=table.schema)])
        pq.write_table(table, files.parquet)
        detector = config.detector
        if detector.backend == "transformers" and not os.path.exists(os.path.join(detector.model, "config.json")):
            save_tiny_detector(detector.model)
        yield config
