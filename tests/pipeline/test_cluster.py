"""A real Ray head on 127.0.0.1 (`ray start --head --block`), the job sent with `ray job submit`.

The head is stopped by its own means: SIGTERM to the blocking `ray start`, which tears down the
processes it started (`ray stop` would stop every Ray on the machine, other users' included).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid

import psutil
import pytest

from pipeline_helpers import REPO, wait_for

pytestmark = pytest.mark.timeout(420)
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_up(port: int) -> bool:
    """The jobs server answers (401 counts: Ray's token auth is on; the CLI sends the token)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def test_ray_job_submit_to_a_local_head(tmp_path):
    """The bundled sample (served by the job itself) through a submitted job: exact counts with true boxes."""
    temp = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    token = tmp_path / "auth_token"  # the head's own token, shared with the CLI only
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
         f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
         *[f"{k}={v}" for k, v in ports.items()]],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    family: list[psutil.Process] = []
    out = tmp_path / "out"
    try:
        assert wait_for(lambda: dashboard_up(dash), timeout=180, interval=0.5), (tmp_path / "head.log").read_text()[-3000:]
        family = psutil.Process(head.pid).children(recursive=True)
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", REPO, "--",
             sys.executable, "pipeline/build_grounding.py", "--sample", "--sample-size", "6", "--output", str(out),
             "--detector", "annotations", "--shard-rows", "6"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=330)
        assert submit.returncode == 0, submit.stdout[-4000:]
        assert "succeeded" in submit.stdout.lower()
        report = json.loads((out / "run_report.json").read_text())
        c = report["counts"]
        # 6 images + 5 broken URLs + 6 rows the pre-filters stop (metadata IP, file://, empty caption,
        # punsafe, aspect ratio, duplicate URL)
        assert (c["input"], c["kept"], c["filtered"], c["failed"]) == (17, 6, 6, 5)
        assert report["rejects_by_stage"] == {"download": 5, "prefilter": 6}
        assert report["filtered_by_reason"]["private_host"] == 1
        assert len(list((out / "shards").glob("*.parquet"))) == 3
    finally:
        family = family or psutil.Process(head.pid).children(recursive=True) if head.poll() is None else family
        head.send_signal(signal.SIGTERM)  # `ray start --block` shuts down what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        _, alive = psutil.wait_procs(family, timeout=30)
        for p in alive:  # anything of ours the head left behind, by pid
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
    assert not alive, f"processes left after stopping the head: {[p.pid for p in alive]}"
