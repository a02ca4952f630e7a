"""img2dataset wiring: its per-shard downloader, finished-download checks, the redirect guard, X-Robots-Tag."""
from __future__ import annotations

import http.server
import io
import threading
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grounding.testing import oriented_jpeg
from pipeline.stages import admit_downloads
from pipeline.download import (OPTED_OUT_MESSAGE, DownloadConfig, SafeRedirectHandler, discard_download, download_path, download_shard,
                               is_downloaded)
from pipeline_helpers import serve_images


def _rows(keys: list[str], base: str = "http://127.0.0.1:9") -> pa.Table:
    return pa.table({"key": keys, "url": [f"{base}/{k}.jpg" for k in keys], "caption": ["a red ball"] * len(keys),
                     "source_row": pa.array(range(len(keys)), pa.int64())})


def test_a_finished_shard_counts_only_with_its_own_rows(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    pq.write_table(pa.table({"source_shard": ["a-00000", "a-00000"], "source_row": pa.array([0, 1], pa.int64())}),
                   download_path(str(downloads), 0))
    assert not is_downloaded(str(downloads), 0, "a-00000", [0, 1])  # no _stats.json yet
    (downloads / "00000_stats.json").write_text("{}")
    assert is_downloaded(str(downloads), 0, "a-00000", [1, 0])
    assert not is_downloaded(str(downloads), 0, "b-00000", [0, 1])  # another shard's download under this id
    assert not is_downloaded(str(downloads), 0, "a-00000", [0, 1, 2])  # other rows than planned
    discard_download(str(downloads), 0)
    assert not list(downloads.iterdir())


class _RedirectServer(http.server.ThreadingHTTPServer):
    """/ok.jpg an image; /hop.jpg 302 to it on 127.0.0.1; /bounce.jpg 302 to it via ``localhost``;
    /noai.jpg the image with ``X-Robots-Tag: noai``."""

    def __init__(self):
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, "JPEG")
        jpeg = buf.getvalue()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                port = self.server.server_address[1]
                if self.path in ("/ok.jpg", "/noai.jpg"):
                    self.send_response(200)
                    if self.path == "/noai.jpg":
                        self.send_header("X-Robots-Tag", "noindex, noai")
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(jpeg)))
                    self.end_headers()
                    self.wfile.write(jpeg)
                    return
                target = {"/hop.jpg": f"http://127.0.0.1:{port}/ok.jpg",
                          "/bounce.jpg": f"http://localhost:{port}/ok.jpg"}.get(self.path)
                self.send_response(302 if target else 404)
                if target:
                    self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def redirect_server():
    server = _RedirectServer()
    yield server
    server.shutdown()
    server.server_close()


def test_redirect_handler_refuses_unsafe_targets(redirect_server):
    opener = urllib.request.build_opener(SafeRedirectHandler(allow_hosts=["127.0.0.1"]))
    with opener.open(f"{redirect_server.base_url}/hop.jpg", timeout=5) as r:  # allowed host: followed
        assert r.read()[:2] == b"\xff\xd8"
    with pytest.raises(urllib.error.HTTPError, match="redirect to http://localhost:.* refused: private_host"):
        opener.open(f"{redirect_server.base_url}/bounce.jpg", timeout=5)


def test_img2dataset_shard_downloader_guards_redirects_and_honours_opt_out(redirect_server, tmp_path):
    """img2dataset's own per-shard downloader, as a shard task runs it: guard installed, _stats.json written."""
    downloads = str(tmp_path / "downloads")
    keys = ["ok", "hop", "bounce", "noai"]
    config = DownloadConfig(threads=3, timeout=3, resize_mode="no")
    table = download_shard(config, downloads, 7, "w-00000", _rows(keys, redirect_server.base_url), shard_rows=8,
                           allow_hosts=["127.0.0.1"])
    assert is_downloaded(downloads, 7, "w-00000", [0, 1, 2, 3])
    assert (tmp_path / "downloads" / "00007_stats.json").exists()
    assert not list((tmp_path / "downloads" / "_input").iterdir())  # img2dataset removes its input when done
    rows = {r["sample_key"]: r for r in table.to_pylist()}
    assert rows["ok"]["status"] == "success" and rows["hop"]["status"] == "success"
    assert rows["bounce"]["status"] == "failed_to_download"
    assert "redirect to http://localhost:" in rows["bounce"]["error_message"]
    assert "refused: private_host" in rows["bounce"]["error_message"]
    assert rows["noai"]["status"] == "failed_to_download" and rows["noai"]["jpg"] is None
    assert rows["noai"]["error_message"] == OPTED_OUT_MESSAGE  # the job counts it as opted_out (test_stages)
    # opting out of the opt-out: the same server, no disallowed directives
    again = download_shard(DownloadConfig(threads=3, timeout=3, resize_mode="no", disallowed_header_directives=[]),
                           str(tmp_path / "d2"), 0, "w-00000", _rows(["noai"], redirect_server.base_url), shard_rows=8,
                           allow_hosts=["127.0.0.1"])
    assert again["status"].to_pylist() == ["success"]


@pytest.fixture(scope="module")
def photo_server():
    """/photo.jpg: a JPEG carrying EXIF orientation 6."""
    with serve_images({"/photo.jpg": oriented_jpeg()}) as url:
        yield url


@pytest.mark.parametrize("image_size", [1024, 150])  # kept as fetched (skip_reencode) / resized by img2dataset
def test_exif_oriented_photo_is_stored_upright_in_its_displayed_frame(photo_server, tmp_path, image_size):
    """The stored bytes carry no orientation tag and their pixels, width/height and original_* are the frame an
    EXIF-aware viewer shows; the shard's width/height (admit_downloads) agree."""
    table = download_shard(DownloadConfig(threads=1, timeout=3, image_size=image_size), str(tmp_path / "d"), 0,
                           "w-00000", _rows(["photo"], photo_server), shard_rows=8, allow_hosts=["127.0.0.1"])
    row = table.to_pylist()[0]
    assert row["status"] == "success", row["error_message"]
    stored = Image.open(io.BytesIO(row["jpg"]))
    assert stored.getexif().get(0x0112) in (None, 1)
    side = min(image_size, 300)
    assert stored.size == (row["width"], row["height"]) == (side * 2 // 3, side)
    assert (row["original_width"], row["original_height"]) == (200, 300)
    px = stored.convert("RGB")
    w, h = px.size
    assert px.getpixel((w - 5, 5))[0] > 180 and px.getpixel((w - 5, 5))[1] < 80  # the red block is top-right
    assert px.getpixel((5, 5))[1] > 100
    admitted = admit_downloads(table).to_pylist()[0]
    assert (admitted["width"], admitted["height"]) == stored.size and admitted["reason"] is None
