"""Shared fixtures: the synthetic world on disk and served over HTTP on 127.0.0.1."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest

from grounding.world import WorldServer, make_world, write_world

BROKEN = {"missing": 2, "corrupt": 1, "notimage": 1, "slow": 1}


@pytest.fixture(scope="session")
def world():
    """12 synthetic images with 2-4 objects each (deterministic)."""
    return make_world(12, seed=7)


@pytest.fixture(scope="session")
def world_server(tmp_path_factory, world):
    """The world's files served on 127.0.0.1; the Parquet's URLs point at the live server.

    Yields ``(server, files)``; ``files.broken_keys`` names the rows whose URL fails on purpose.
    """
    root = tmp_path_factory.mktemp("world")
    with WorldServer(root, slow_seconds=4.0) as server:
        files = write_world(root, world, base_url=server.base_url, broken=BROKEN)
        yield server, files
