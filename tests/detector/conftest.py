"""Detector-training fixtures: a small synthetic world on disk and a tiny from-scratch model."""
from __future__ import annotations

import pytest

from grounding.world import make_world, write_world


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """48 training images (1-2 objects) and 16 held-out ones, written as COCO + refs."""
    root = tmp_path_factory.mktemp("det-world")
    train = write_world(root / "train", make_world(48, seed=21, size=(96, 96), min_objects=1, max_objects=2))
    val = write_world(root / "val", make_world(16, seed=22, size=(96, 96), min_objects=1, max_objects=2))
    return train, val
