"""Helpers for the pipeline tests: job configs over the served test world, process control."""
from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from grounding.detect import DetectorConfig
from grounding.source import FilterConfig, SourceConfig
from pipeline.download import DownloadConfig
from pipeline.config import JobConfig, RayConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARD_ROWS = 2


def world_job(files, output, **ray_overrides) -> JobConfig:
    """The test world through the real job: img2dataset on 127.0.0.1, spaCy, annotation boxes (exact)."""
    return JobConfig(
        output=str(output),
        source=SourceConfig(paths=[str(files.parquet)], shard_rows=SHARD_ROWS),
        filters=FilterConfig(allow_hosts=["127.0.0.1"]),
        download=DownloadConfig(threads=8, timeout=2),
        detector=DetectorConfig(backend="annotations", annotations=str(files.coco), refs=str(files.refs)),
        ray=RayConfig(**{"phrase_batch_size": 4, "detect_batch_size": 4, **ray_overrides}),
    )


def world_job_argv(files, output) -> list[str]:
    """The same job as :func:`world_job`, as command-line flags."""
    return ["--input", str(files.parquet), "--output", str(output), "--shard-rows", str(SHARD_ROWS),
            "--allow-host", "127.0.0.1", "--download-threads", "8",
            "--download-timeout", "2", "--detector", "annotations", "--detector-annotations", str(files.coco),
            "--detector-refs", str(files.refs), "--ray-phrase-batch-size", "4", "--ray-detect-batch-size", "4"]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process we started and every process below it, by pid."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [psutil.Process(proc.pid), *family] if proc.poll() is None else family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=10)


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, "pipeline", "build_grounding.py"), *args]


def wait_for(predicate, timeout: float, interval: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


@contextlib.contextmanager
def serve_images(images: dict[str, bytes]):
    """A JPEG server on 127.0.0.1 (a free port): path -> bytes, 404 for any other path; yields its base URL."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = images.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
