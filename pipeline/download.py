"""img2dataset wiring: the work shards' rows in, img2dataset's own Parquet shards (+ ``_stats.json``) out.

The driver writes one img2dataset input file per non-empty work shard into
``OUT/downloads/_input/<shard>.parquet``. img2dataset numbers its output shards in the sorted order
of its input files, and every input file holds at most ``number_sample_per_shard`` rows, so
download shard ``NNNNN`` is exactly work shard number ``NNNNN`` of :func:`download_ids` — stable
across reruns, which is what img2dataset's incremental mode needs to skip finished downloads.

img2dataset runs in a child process (``python -m pipeline.download CONFIG_JSON``): it spawns its
own workers and installs signal handlers, neither of which belongs in a Ray driver. On a cluster
``distributor="ray"`` has img2dataset fan its shards out as Ray tasks (the output folder must then
be storage every node can reach, e.g. ``s3://``).

Columns of a download shard: ``key`` (img2dataset's), ``url``, ``caption``, ``status``
(``success`` | ``failed_to_download`` | ``failed_to_resize``), ``error_message``, ``width``,
``height``, ``original_width``, ``original_height``, ``jpg`` (image bytes), plus the carried
``sample_key``, ``source_shard``, ``source_row``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

CARRIED_COLUMNS = ["sample_key", "source_shard", "source_row"]
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest")  # never "border"/"center_crop": they move boxes


@dataclass
class DownloadConfig:
    processes: int = 2
    threads: int = 32
    timeout: int = 10                      # seconds per URL
    retries: int = 0
    distributor: str = "multiprocessing"   # "ray" on a cluster
    resize_mode: str = "keep_ratio_largest"  # geometry kept: boxes refer to the stored image
    image_size: int = 1024                 # longest side for keep_ratio_largest, shortest for keep_ratio
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    max_image_area: float = 89_478_485     # PIL's decompression-bomb limit, applied by img2dataset too
    user_agent_token: str | None = None

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES} (border/center_crop move the boxes), got {self.resize_mode!r}")
        if self.distributor not in ("multiprocessing", "ray"):
            raise ValueError(f"distributor must be 'multiprocessing' or 'ray', got {self.distributor!r}")
        if self.processes < 1 or self.threads < 1 or self.timeout < 1:
            raise ValueError("processes, threads and timeout must be >= 1")


def input_dir(downloads: str) -> str:
    return downloads.rstrip("/") + "/_input"


def download_ids(names: Sequence[str]) -> dict[str, int]:
    """Work shard name -> img2dataset shard id (the sorted order of the input files)."""
    return {name: i for i, name in enumerate(sorted(names))}


def download_path(downloads: str, shard_id: int) -> str:
    return f"{downloads.rstrip('/')}/{shard_id:05d}.parquet"


def is_downloaded(downloads: str, shard_id: int) -> bool:
    """img2dataset's own rule: a shard is done when its ``_stats.json`` exists."""
    fs, p = fsspec.core.url_to_fs(f"{downloads.rstrip('/')}/{shard_id:05d}_stats.json")
    return fs.exists(p)


def write_inputs(shards: Sequence[tuple[str, pa.Table]], downloads: str) -> None:
    """One img2dataset input file per work shard (``url``, ``caption`` + carried columns), atomically.

    Rewritten on every run (a served sample's URLs change port); img2dataset skips the shards whose
    ``_stats.json`` exists, so finished downloads are not fetched again.
    """
    fs, root = fsspec.core.url_to_fs(input_dir(downloads))
    fs.makedirs(root, exist_ok=True)
    for name, table in shards:
        path = f"{root}/{name}.parquet"
        t = pa.table({"url": table["url"], "caption": table["caption"], "sample_key": table["key"],
                      "source_shard": pa.array([name] * table.num_rows, pa.string()),
                      "source_row": table["source_row"]})
        tmp = f"{root}/.{name}.parquet.tmp"
        with fs.open(tmp, "wb") as f:
            pq.write_table(t, f)
        fs.mv(tmp, path)


def download_kwargs(config: DownloadConfig, downloads: str, shard_rows: int) -> dict:
    """The arguments of ``img2dataset.download`` for this config."""
    return dict(
        url_list=input_dir(downloads), input_format="parquet", url_col="url", caption_col="caption",
        save_additional_columns=list(CARRIED_COLUMNS), output_format="parquet", output_folder=downloads,
        number_sample_per_shard=shard_rows, oom_shard_count=5, processes_count=config.processes,
        thread_count=config.threads, timeout=config.timeout, retries=config.retries,
        distributor=config.distributor, resize_mode=config.resize_mode, image_size=config.image_size,
        resize_only_if_bigger=config.resize_only_if_bigger, skip_reencode=True,
        encode_format=config.encode_format, encode_quality=config.encode_quality,
        max_image_area=config.max_image_area, incremental_mode="incremental", enable_wandb=False,
        extract_exif=False, user_agent_token=config.user_agent_token,
    )


def run_download(config: DownloadConfig, downloads: str, shard_rows: int) -> float:
    """Run img2dataset over ``OUT/downloads/_input`` in a child process; returns its wall seconds."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    payload = json.dumps({"config": asdict(config), "downloads": downloads, "shard_rows": shard_rows})
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.download", payload], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    config = DownloadConfig(**args["config"])
    if config.distributor == "ray":
        import ray
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), ignore_reinit_error=True)
    from img2dataset import download
    download(**download_kwargs(config, args["downloads"], args["shard_rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
