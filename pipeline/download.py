"""img2dataset wiring: one work shard's rows in, img2dataset's own Parquet shard (+ ``_stats.json``) out.

:func:`download_shard` runs img2dataset's per-shard ``Downloader`` in the calling process (a Ray
worker): exactly what img2dataset's own Ray distributor does (``ray_download.remote(downloader,
(shard_id, input_file))``), with the job deciding which shards run where. The work shard at plan
index ``i`` is img2dataset shard ``i``: input ``OUT/downloads/_input/<i>.feather`` (removed by
img2dataset when done), output ``OUT/downloads/<i>.parquet`` + ``<i>_stats.json`` (img2dataset's
completion mark). A finished download is used only if its rows are this work shard's rows
(:func:`is_downloaded`); otherwise :func:`discard_download` removes it and the shard is fetched again.

Redirects: img2dataset fetches with ``urllib.request.urlopen``, which follows 30x redirects, so a
public URL could bounce the fetch to ``169.254.169.254`` or ``127.0.0.1`` after the pre-filter
passed it. :func:`download_shard` first installs a urllib opener with :class:`SafeRedirectHandler`
in the process that fetches. A refused redirect fails the row with ``failed_to_download`` and an
error message ``HTTP Error 30x: redirect to <url> refused: <reason> ...``. The downloader resolves
DNS again after the pre-filter did (a DNS-rebinding window remains, for the first hop and for
redirects alike).

A server whose ``X-Robots-Tag`` carries one of ``disallowed_header_directives`` (img2dataset's
default: ``noai``, ``noimageai``, ``noindex``, ``noimageindex``) is not used: img2dataset marks the
row ``failed_to_download`` with :data:`OPTED_OUT_MESSAGE`, which the job counts as ``opted_out``.

EXIF orientation: img2dataset decodes with OpenCV's ``IMREAD_UNCHANGED``, which ignores the JPEG
``Orientation`` tag, and with ``skip_reencode`` keeps the bytes, tag and all: a phone photo tagged "rotate
to display" would be stored, measured and resized in its raw (sideways) frame while EXIF-aware loaders show
it turned. :class:`UprightResizer` hands img2dataset the image already turned to its displayed frame
(:func:`grounding.image.upright_bytes`, one JPEG re-encode, only for tagged images), so the stored bytes carry
no tag and ``width`` / ``height`` / ``original_*`` are the displayed frame's, the frame the boxes are in.

Columns of a download shard: ``key`` (img2dataset's), ``url``, ``caption``, ``status``
(``success`` | ``failed_to_download`` | ``failed_to_resize``), ``error_message``, ``width``,
``height``, ``original_width``, ``original_height``, ``jpg`` (image bytes), plus the carried
``sample_key``, ``source_shard``, ``source_row``.
"""
from __future__ import annotations

import io
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from grounding.image import MAX_PIXELS, image_header, upright_bytes
from grounding.source import check_url

CARRIED_COLUMNS = ["sample_key", "source_shard", "source_row"]
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest")  # never "border"/"center_crop": they move boxes
OPTED_OUT_MESSAGE = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's error_message
AREA_TOO_LARGE_MESSAGE = "image area too large"  # img2dataset's error_message past max_image_area (our max_pixels)


@dataclass
class DownloadConfig:
    threads: int = 32                      # concurrent fetches per shard task
    timeout: int = 10                      # seconds per URL
    retries: int = 0
    resize_mode: str = "keep_ratio_largest"  # geometry kept: boxes refer to the stored image
    image_size: int = 1024                 # longest side for keep_ratio_largest, shortest for keep_ratio
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    user_agent_token: str | None = None
    # X-Robots-Tag directives that opt an image out (img2dataset's default); [] fetches regardless
    disallowed_header_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES} (border/center_crop move the boxes), got {self.resize_mode!r}")
        if self.threads < 1 or self.timeout < 1:
            raise ValueError("threads and timeout must be >= 1")
        self.disallowed_header_directives = [d.strip().lower() for d in self.disallowed_header_directives]


def input_path(downloads: str, shard_id: int, digits: int = 5) -> str:
    return f"{downloads.rstrip('/')}/_input/{shard_id:0{digits}d}.feather"


def download_path(downloads: str, shard_id: int, digits: int = 5) -> str:
    return f"{downloads.rstrip('/')}/{shard_id:0{digits}d}.parquet"


def stats_path(downloads: str, shard_id: int, digits: int = 5) -> str:
    return f"{downloads.rstrip('/')}/{shard_id:0{digits}d}_stats.json"


def is_downloaded(downloads: str, shard_id: int, name: str, source_rows: Sequence[int], digits: int = 5) -> bool:
    """Done by img2dataset's rule (its ``_stats.json`` exists) and holding exactly ``name``'s rows."""
    fs, p = fsspec.core.url_to_fs(stats_path(downloads, shard_id, digits))
    if not fs.exists(p):
        return False
    try:
        with fs.open(fsspec.core.url_to_fs(download_path(downloads, shard_id, digits))[1], "rb") as f:
            t = pq.read_table(f, columns=["source_shard", "source_row"])
    except Exception:  # noqa: BLE001 - an unreadable shard is not done
        return False
    return set(t["source_shard"].to_pylist()) <= {name} and sorted(t["source_row"].to_pylist()) == sorted(source_rows)


def discard_download(downloads: str, shard_id: int, digits: int = 5) -> None:
    """Remove a download shard (and its ``_stats.json``) so it is fetched again."""
    for path in (stats_path(downloads, shard_id, digits), download_path(downloads, shard_id, digits)):
        fs, p = fsspec.core.url_to_fs(path)
        if fs.exists(p):
            fs.rm(p)


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


class UprightResizer:
    """img2dataset's Resizer over the image turned to its EXIF-displayed frame, without the tag (re-encoded at
    ``quality``; untagged images pass through untouched)."""

    def __init__(self, resizer, quality: int):
        self.resizer, self.quality = resizer, quality

    def __call__(self, img_stream, blurring_bbox_list=None):
        data = img_stream.read()
        try:
            image_header(data, self.resizer.max_image_area)  # never decode a bomb; img2dataset reports it below
            data = upright_bytes(data, self.quality)
        except Exception:  # noqa: BLE001 - bad or too large bytes: img2dataset gives the row its error
            pass
        return self.resizer(io.BytesIO(data), blurring_bbox_list)


def downloader(config: DownloadConfig, downloads: str, shard_rows: int, digits: int = 5, max_pixels: int = MAX_PIXELS):
    """img2dataset's own per-shard ``Downloader`` (Parquet writer, its resizer turning EXIF-oriented images
    upright first) for this config; its resizer refuses images of more than ``max_pixels`` (the job's one
    pixel limit, :attr:`pipeline.config.JobConfig.max_pixels`)."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    resizer = UprightResizer(Resizer(image_size=config.image_size, resize_mode=config.resize_mode,
                                     resize_only_if_bigger=config.resize_only_if_bigger,
                                     encode_quality=config.encode_quality, encode_format=config.encode_format,
                                     skip_reencode=True, max_image_area=max_pixels), config.encode_quality)
    return Downloader(
        sample_writer_class=ParquetSampleWriter, resizer=resizer, thread_count=config.threads, save_caption=True,
        extract_exif=False, output_folder=downloads.rstrip("/"), column_list=CARRIED_COLUMNS + ["caption", "url"],
        timeout=config.timeout, number_sample_per_shard=max(shard_rows, 10), oom_shard_count=digits,
        compute_hash=None, verify_hash_type=None, encode_format=config.encode_format, retries=config.retries,
        user_agent_token=config.user_agent_token,
        disallowed_header_directives=config.disallowed_header_directives or None)


def download_shard(config: DownloadConfig, downloads: str, shard_id: int, name: str, rows: pa.Table,
                   shard_rows: int, digits: int = 5, allow_private_hosts: bool = False,
                   allow_hosts: Sequence[str] = (), max_pixels: int = MAX_PIXELS) -> pa.Table:
    """Fetch one work shard's rows (``key``, ``url``, ``caption``, ``source_row``) with img2dataset.

    Reuses a finished download of exactly these rows; returns the download shard's table. An image of more
    than ``max_pixels`` comes back with img2dataset's :data:`AREA_TOO_LARGE_MESSAGE` (``too_many_pixels``).
    """
    source_rows = rows["source_row"].to_pylist()
    if not is_downloaded(downloads, shard_id, name, source_rows, digits):
        discard_download(downloads, shard_id, digits)
        install_url_guard(allow_private_hosts, allow_hosts)
        table = pa.table({"url": rows["url"], "caption": rows["caption"], "sample_key": rows["key"],
                          "source_shard": pa.array([name] * rows.num_rows, pa.string()),
                          "source_row": rows["source_row"]})
        fs, p = fsspec.core.url_to_fs(input_path(downloads, shard_id, digits))
        fs.makedirs(fs._parent(p), exist_ok=True)
        with fs.open(p, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        ok, _ = downloader(config, downloads, shard_rows, digits, max_pixels)((shard_id, input_path(downloads, shard_id, digits)))
        if not ok or not is_downloaded(downloads, shard_id, name, source_rows, digits):
            raise RuntimeError(f"img2dataset did not finish download shard {shard_id} ({name})")
    fs, p = fsspec.core.url_to_fs(download_path(downloads, shard_id, digits))
    with fs.open(p, "rb") as f:
        return pq.read_table(f)
