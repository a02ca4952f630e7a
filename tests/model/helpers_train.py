"""Shared pieces of the training/evaluation tests: tiny shards of the synthetic world and the
debug model config (tiny random Llama + CLIP from model.testing). Imported by the test modules."""
from __future__ import annotations

import os

import pytest

from grounding.world import make_world, write_truth_shards

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_shards(root, n_images: int = 8, rows_per_shard: int = 4, seed: int = 3, **world_kw) -> str:
    """``root/shards/NNNNN.parquet`` with the true boxes of ``n_images`` world images; returns the folder."""
    out = os.path.join(str(root), "shards")
    write_truth_shards(make_world(n_images, seed=seed, **world_kw), out, rows_per_shard=rows_per_shard)
    return out


@pytest.fixture(scope="session")
def debug_model_config(tmp_path_factory):
    from model.testing import write_debug_model

    return write_debug_model(tmp_path_factory.mktemp("debug_model"))


@pytest.fixture(scope="session")
def debug_model(debug_model_config):
    from model.cogvlm import VisualExpertForCausalLM

    return VisualExpertForCausalLM.from_config(debug_model_config)


@pytest.fixture(scope="session")
def shards8(tmp_path_factory):
    """8 images in 2 shards of 4 rows."""
    return make_shards(tmp_path_factory.mktemp("shards8"), 8, 4)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models' matrices are too small for a second thread; on a busy 2-core machine it only spins
    (measured: a 250-step run took 334 s with 2 threads, 9 s with 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_multibox_shards(root, n_images: int = 6, boxes: int = 3, seed: int = 5) -> str:
    """``root/multibox/00000.parquet``: the world's rows with every REC answer holding ``boxes`` boxes (its own
    object's box first, then the image's other objects', repeated when there are fewer), as a top_k=3 pipeline
    writes them ``[[a;b;c]]``; returns the folder."""
    from grounding.boxes import format_answer, parse_boxes
    from grounding.schema import write_shard
    from grounding.world import truth_rows

    rows = truth_rows(make_world(n_images, seed=seed))
    for r in rows:
        own = [parse_boxes(q["answer"])[0] for q in r["qa"] if q["task"] == "rec"]
        for k, q in enumerate(q for q in r["qa"] if q["task"] == "rec"):
            others = own[k + 1:] + own[:k]
            q["answer"] = format_answer(([own[k]] + (others * boxes))[:boxes] if others else [own[k]] * boxes)
    out = os.path.join(str(root), "multibox")
    write_shard(rows, os.path.join(out, "00000.parquet"))
    return out
