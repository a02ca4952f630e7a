"""img2dataset wiring: persisted download shard ids, input files, and the redirect guard."""
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

from pipeline.download import (DownloadConfig, SafeRedirectHandler, download_ids, download_path, is_downloaded,
                               run_download, write_inputs)


def _rows(keys: list[str], base: str = "http://127.0.0.1:9") -> pa.Table:
    return pa.table({"key": keys, "url": [f"{base}/{k}.jpg" for k in keys], "caption": ["a red ball"] * len(keys),
                     "source_row": pa.array(range(len(keys)), pa.int64())})


def test_ids_are_persisted_and_new_names_get_fresh_ids(tmp_path):
    downloads = str(tmp_path / "downloads")
    first = download_ids(downloads, ["b-00000", "a-00001", "a-00000"])
    assert first == {"a-00000": 0, "a-00001": 1, "b-00000": 2}
    # a rerun whose pre-filter leaves other shards non-empty: old ids kept, the new name appended
    second = download_ids(downloads, ["a-00001", "c-00000"])
    assert second == {"a-00000": 0, "a-00001": 1, "b-00000": 2, "c-00000": 3}
    assert download_ids(downloads, ["b-00000"]) == second


def test_inputs_keep_ids_with_fillers_and_drop_stale_files(tmp_path):
    downloads = str(tmp_path / "downloads")
    ids = download_ids(downloads, ["a-00000", "a-00001", "b-00000"])
    stale = tmp_path / "downloads" / "_input" / "a-00000.parquet"  # an old-layout input file
    pq.write_table(_rows(["x"]), stale)
    write_inputs([("a-00001", _rows(["k1", "k2"])), ("b-00000", _rows(["k3"]))], downloads, ids)
    files = sorted((tmp_path / "downloads" / "_input").glob("*.parquet"))
    assert [f.name for f in files] == ["00000000.parquet", "00000001.parquet", "00000002.parquet"]
    # img2dataset numbers shards in sorted file order: file i must carry the shard whose id is i
    assert [pq.read_table(f)["source_shard"].to_pylist() for f in files] == [[""], ["a-00001"] * 2, ["b-00000"]]
    assert pq.read_table(files[0])["url"].to_pylist() == [""]  # a filler, never a real fetch
    assert not stale.exists()


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


class _RedirectServer(http.server.ThreadingHTTPServer):
    """/ok.jpg an image; /hop.jpg 302 to it on 127.0.0.1; /bounce.jpg 302 to it via ``localhost``."""

    def __init__(self):
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, "JPEG")
        jpeg = buf.getvalue()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                port = self.server.server_address[1]
                if self.path == "/ok.jpg":
                    self.send_response(200)
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


def test_img2dataset_workers_refuse_redirects_to_disallowed_hosts(redirect_server, tmp_path):
    """The real img2dataset run (spawned worker processes): the guard reaches the fetching process."""
    downloads = str(tmp_path / "downloads")
    keys = ["ok", "hop", "bounce"]
    ids = download_ids(downloads, ["w-00000"])
    write_inputs([("w-00000", _rows(keys, redirect_server.base_url))], downloads, ids)
    run_download(DownloadConfig(processes=1, threads=3, timeout=3, resize_mode="no"), downloads, shard_rows=8,
                 allow_hosts=["127.0.0.1"])
    assert is_downloaded(downloads, 0, "w-00000", [0, 1, 2])
    rows = {r["sample_key"]: r for r in pq.read_table(download_path(downloads, 0)).to_pylist()}
    assert rows["ok"]["status"] == "success" and rows["hop"]["status"] == "success"
    assert rows["bounce"]["status"] == "failed_to_download"
    assert "redirect to http://localhost:" in rows["bounce"]["error_message"]
    assert "refused: private_host" in rows["bounce"]["error_message"]
