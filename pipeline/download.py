"""img2dataset wiring: the work shards' rows in, img2dataset's own Parquet shards (+ ``_stats.json``) out.

Every work shard that ever had rows to download gets a download shard id, persisted in
``OUT/downloads/_input/ids.json`` (:func:`download_ids`: first use in sorted name order, later new names
get fresh ids), so a rerun whose pre-filter leaves a different set of non-empty shards never
renumbers them. img2dataset numbers its output shards in the sorted order of its input files, one
shard per file of at most ``number_sample_per_shard`` rows, so :func:`write_inputs` writes
``_input/<id:08d>.parquet`` for ids 0..max: the work shard's rows, or a one-row filler (empty URL)
for an id whose shard has no rows this run, and removes every other input file. A finished
download shard (``_stats.json``) is used only if its rows are this work shard's rows
(:func:`is_downloaded`); otherwise :func:`discard_download` removes it and img2dataset redoes it.

Redirects: img2dataset fetches with ``urllib.request.urlopen``, which follows 30x redirects, so a
public URL could bounce the fetch to ``169.254.169.254`` or ``127.0.0.1`` after the pre-filter
passed it. :func:`main` wraps img2dataset's ``Downloader`` in :class:`GuardedDownloader`, which
installs a urllib opener with :class:`SafeRedirectHandler` in whichever process runs a shard
(img2dataset's multiprocessing pool uses *spawn*, so the guard travels inside the pickled
downloader, not as inherited module state). A refused redirect fails the row with
``failed_to_download`` and an error message ``HTTP Error 30x: redirect to <url> refused:
<reason> ...``. With ``distributor="ray"`` the same pickled wrapper runs in the Ray tasks, which
needs this package importable on every Ray worker (installed, or shipped via ``runtime_env``); if it
is not, the Ray tasks fail to unpickle the downloader rather than fetch unguarded. The first URL of
each row is checked by the pre-filter at plan time only; the downloader resolves DNS again (a
DNS-rebinding window remains, for the first hop and for redirects alike).

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
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from grounding.source import check_url

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


def ids_path(downloads: str) -> str:
    # not directly in downloads/: img2dataset reads every downloads/*.json name as a finished shard id
    return input_dir(downloads) + "/ids.json"


def download_ids(downloads: str, names: Sequence[str]) -> dict[str, int]:
    """Work shard name -> img2dataset shard id, persisted in ``ids.json`` and extended for new names.

    Returns every name ever given an id (not only ``names``): the ids in between must keep their
    input file slots (see :func:`write_inputs`).
    """
    fs, p = fsspec.core.url_to_fs(ids_path(downloads))
    ids: dict[str, int] = {}
    if fs.exists(p):
        with fs.open(p, "r") as f:
            ids = {str(k): int(v) for k, v in json.load(f).items()}
    new = sorted(set(names) - set(ids))
    if new:
        start = max(ids.values(), default=-1) + 1
        ids.update({name: start + i for i, name in enumerate(new)})
        fs.makedirs(fs._parent(p), exist_ok=True)
        with fs.open(p + ".tmp", "w") as f:
            json.dump(ids, f, indent=1, sort_keys=True)
        fs.mv(p + ".tmp", p)
    return ids


def download_path(downloads: str, shard_id: int) -> str:
    return f"{downloads.rstrip('/')}/{shard_id:05d}.parquet"


def is_downloaded(downloads: str, shard_id: int, name: str, source_rows: Sequence[int]) -> bool:
    """Done by img2dataset's rule (its ``_stats.json`` exists) and holding exactly ``name``'s rows."""
    fs, p = fsspec.core.url_to_fs(f"{downloads.rstrip('/')}/{shard_id:05d}_stats.json")
    if not fs.exists(p):
        return False
    try:
        with fs.open(fsspec.core.url_to_fs(download_path(downloads, shard_id))[1], "rb") as f:
            t = pq.read_table(f, columns=["source_shard", "source_row"])
    except Exception:  # noqa: BLE001 - an unreadable shard is not done
        return False
    return set(t["source_shard"].to_pylist()) == {name} and sorted(t["source_row"].to_pylist()) == sorted(source_rows)


def discard_download(downloads: str, shard_id: int) -> None:
    """Remove a download shard (and its ``_stats.json``) so img2dataset's incremental mode redoes it."""
    for path in (download_path(downloads, shard_id), f"{downloads.rstrip('/')}/{shard_id:05d}_stats.json"):
        fs, p = fsspec.core.url_to_fs(path)
        if fs.exists(p):
            fs.rm(p)


def write_inputs(shards: Sequence[tuple[str, pa.Table]], downloads: str, ids: dict[str, int]) -> None:
    """The img2dataset input files ``_input/<id:08d>.parquet`` for ids 0..max(ids), atomically.

    A work shard's file holds its rows (``url``, ``caption`` + carried columns); an id whose shard
    is not in ``shards`` gets a one-row filler (empty URL, ``source_shard`` ""), so img2dataset's
    sequential numbering still lands every shard on its persisted id (a finished filler id is
    skipped without a fetch). Any other input file is removed. Rewritten on every run (a served
    sample's URLs change port); img2dataset skips the shards whose ``_stats.json`` exists.
    """
    fs, root = fsspec.core.url_to_fs(input_dir(downloads))
    fs.makedirs(root, exist_ok=True)
    by_id = {ids[name]: (name, table) for name, table in shards}
    wanted = set()
    for shard_id in range(max(ids.values(), default=-1) + 1):
        name, table = by_id.get(shard_id, ("", None))
        if table is None:
            t = pa.table({"url": [""], "caption": [""], "sample_key": [""], "source_shard": [""],
                          "source_row": pa.array([-1], pa.int64())})
        else:
            t = pa.table({"url": table["url"], "caption": table["caption"], "sample_key": table["key"],
                          "source_shard": pa.array([name] * table.num_rows, pa.string()),
                          "source_row": table["source_row"]})
        path = f"{root}/{shard_id:08d}.parquet"
        wanted.add(path)
        tmp = f"{root}/.{shard_id:08d}.parquet.tmp"
        with fs.open(tmp, "wb") as f:
            pq.write_table(t, f)
        fs.mv(tmp, path)
    for p in fs.glob(f"{root}/*.parquet"):
        if fs._strip_protocol(p) not in {fs._strip_protocol(w) for w in wanted}:
            fs.rm(p)


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


class SafeRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a 30x only to a URL that :func:`grounding.source.check_url` lets through."""

    def __init__(self, allow_private_hosts: bool = False, allow_hosts: Iterable[str] = ()):
        super().__init__()
        self.allow_private_hosts = allow_private_hosts
        self.allow_hosts = tuple(allow_hosts)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        reason, detail = check_url(newurl, self.allow_private_hosts, self.allow_hosts)
        if reason is not None:
            raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl} refused: {reason} ({detail})", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def install_url_guard(allow_private_hosts: bool = False, allow_hosts: Iterable[str] = ()) -> None:
    """Make this process's ``urllib.request.urlopen`` refuse redirects to URLs the guard rejects."""
    urllib.request.install_opener(urllib.request.build_opener(SafeRedirectHandler(allow_private_hosts, allow_hosts)))


class GuardedDownloader:
    """img2dataset's ``Downloader``, installing the redirect guard in the process that runs a shard.

    Pickled by img2dataset to its spawned workers (or Ray tasks) together with the guard settings.
    """

    def __init__(self, downloader, allow_private_hosts: bool, allow_hosts: Sequence[str]):
        self.downloader = downloader
        self.allow_private_hosts = allow_private_hosts
        self.allow_hosts = list(allow_hosts)

    def __call__(self, row):
        install_url_guard(self.allow_private_hosts, self.allow_hosts)
        return self.downloader(row)


def run_download(config: DownloadConfig, downloads: str, shard_rows: int, allow_private_hosts: bool = False,
                 allow_hosts: Sequence[str] = ()) -> float:
    """Run img2dataset over ``OUT/downloads/_input`` in a child process; returns its wall seconds.

    ``allow_private_hosts`` / ``allow_hosts`` are the pre-filter's URL guard settings, applied to
    redirect targets.
    """
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    payload = json.dumps({"config": asdict(config), "downloads": downloads, "shard_rows": shard_rows,
                          "allow_private_hosts": allow_private_hosts, "allow_hosts": list(allow_hosts)})
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
    import importlib

    from img2dataset import download

    guard = dict(allow_private_hosts=args.get("allow_private_hosts", False), allow_hosts=args.get("allow_hosts", []))
    install_url_guard(**guard)  # this process too
    i2d_main = importlib.import_module("img2dataset.main")  # the module (the package's `main` is a function)
    base = i2d_main.Downloader
    i2d_main.Downloader = lambda **kw: GuardedDownloader(base(**kw), **guard)
    download(**download_kwargs(config, args["downloads"], args["shard_rows"]))
    return 0


if __name__ == "__main__":
    # run the importable module's main, so GuardedDownloader pickles as pipeline.download.GuardedDownloader
    from pipeline.download import main as _main
    sys.exit(_main())
