"""One pixel limit (``JobConfig.max_pixels``, ``--max-pixels``) drives both img2dataset's refusal of a fetched image
and the header check before decoding; the old ``--download-max-image-area`` is an alias of it."""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from grounding.image import MAX_PIXELS, decode_image
from grounding.source import FilterConfig, SourceConfig
from pipeline.build_grounding import config_from_args
from pipeline.config import JobConfig, config_hash, content_config
from pipeline.download import DownloadConfig, download_shard
from pipeline.stages import admit_downloads
from pipeline_helpers import serve_images

BIG = (80, 60)  # 4800 pixels


def _jpeg(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    with serve_images({"/big.jpg": _jpeg(BIG), "/small.jpg": _jpeg((40, 30))}) as url:
        yield url


def _job(tmp_path, max_pixels: int) -> JobConfig:
    return JobConfig(output=str(tmp_path / "out"), source=SourceConfig(paths=["x.parquet"]), max_pixels=max_pixels,
                     filters=FilterConfig(allow_hosts=["127.0.0.1"]), download=DownloadConfig(threads=2, timeout=3, resize_mode="no"))


def _fetch_and_admit(job: JobConfig, base: str, downloads: str) -> dict[str, dict]:
    """As a shard task does (pipeline.worker): img2dataset under the job's limit, then the header check under it."""
    rows = pa.table({"key": ["big", "small"], "url": [f"{base}/big.jpg", f"{base}/small.jpg"], "caption": ["a ball"] * 2,
                     "source_row": pa.array([0, 1], pa.int64())})
    fetched = download_shard(job.download, downloads, 0, "t-00000", rows, shard_rows=4,
                             allow_hosts=job.filters.allow_hosts, max_pixels=job.max_pixels)
    return {r["key"]: r for r in admit_downloads(fetched, job.max_pixels).to_pylist()}


def test_raising_the_one_limit_lets_a_large_image_through_download_and_decode(server, tmp_path):
    low = _fetch_and_admit(_job(tmp_path, 3000), server, str(tmp_path / "low"))
    assert (low["big"]["stage"], low["big"]["reason"]) == ("download", "too_many_pixels")  # img2dataset refused it
    assert low["big"]["image"] is None and low["small"]["stage"] is None

    high = _fetch_and_admit(_job(tmp_path, 6000), server, str(tmp_path / "high"))
    big = high["big"]
    assert big["stage"] is None and (big["width"], big["height"]) == BIG  # fetched, and its header passed
    assert decode_image(big["image"], 6000).size == BIG                  # and it decodes under the same limit
    # the header check alone, had the download used a larger limit, refuses it under the lower one
    assert admit_downloads(pa.table({k: [v] for k, v in {
        "sample_key": "big", "url": "u", "caption": "c", "source_shard": "s", "source_row": 0, "status": "success",
        "error_message": None, "original_width": BIG[0], "original_height": BIG[1], "jpg": big["image"]}.items()}),
        3000).to_pylist()[0]["reason"] == "too_many_pixels"


def test_the_old_download_flag_and_config_key_set_the_one_limit(tmp_path):
    base = ["--input", "x.parquet", "--output", str(tmp_path)]
    assert config_from_args(base).max_pixels == MAX_PIXELS
    assert config_from_args(base + ["--max-pixels", "5000"]).max_pixels == 5000
    assert config_from_args(base + ["--download-max-image-area", "7000"]).max_pixels == 7000   # deprecated alias
    old = {"source": {"paths": ["x.parquet"]}, "download": {"threads": 4, "max_image_area": 9000}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    replayed = config_from_args(["--config", str(tmp_path / "old.json")])
    assert replayed.max_pixels == 9000 and replayed.download.threads == 4
    assert not hasattr(replayed.download, "max_image_area")
    # the hash sees the limit where it saw img2dataset's before (so older output folders resume), and changes with it
    assert content_config(replayed)["download"]["max_image_area"] == replayed.max_pixels == 9000
    assert config_hash(replayed) != config_hash(JobConfig.from_dict({**old, "download": {"threads": 4}}))
