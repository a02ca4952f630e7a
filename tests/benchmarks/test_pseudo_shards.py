"""benchmarks/pseudo_shards.py: the real job (Ray, img2dataset, spaCy, the trained demo detector) boxes the
learning proof's own training images, and the shards it writes are those images and load for training."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import learnlib  # noqa: E402
import pseudo_shards  # noqa: E402

from model.data import resolve_shards  # noqa: E402
from model.evaluate import shard_examples  # noqa: E402
from pipeline.sample import DEMO_DETECTOR  # noqa: E402

pytestmark = pytest.mark.skipif(not (Path(DEMO_DETECTOR) / "config.json").exists(), reason="assets/demo_detector absent")

N = 24


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


def test_pseudo_shards_are_the_proofs_training_images_with_detector_boxes(tmp_path):
    r = pseudo_shards.build_seed(0, N, tmp_path / "out", tmp_path / "work", shard_rows=12)
    shards = r["shards"]
    assert shards == str(tmp_path / "out" / "s0" / "shards") and not (tmp_path / "out" / ".s0.partial").exists()

    # the proof's truth shards of the same seed and size: the pseudo shards hold the same images
    truth = tmp_path / "truth"
    learnlib.write_world_split(truth, N, learnlib.world_seed(0, "train", "multi"), "multi")
    truth_rows = {row["key"]: row for p in resolve_shards([str(truth)])
                  for row in pq.read_table(p, columns=["key", "image", "width", "height"]).to_pylist()}
    rows = [row for p in resolve_shards([shards])
            for row in pq.read_table(p, columns=["key", "image", "width", "height", "phrases"]).to_pylist()]
    assert len(rows) == r["kept_images"] >= N * 3 // 4  # the trained detector boxes most images twice or more
    for row in rows:
        t = truth_rows[row["key"]]
        assert (row["width"], row["height"]) == (t["width"], t["height"]) and min(t["width"], t["height"]) >= 96
        assert np.abs(pixels(row["image"]) - pixels(t["image"])).mean() <= pseudo_shards.MAX_PIXEL_DIFF
        assert sum(len(ph["boxes_norm"]) for ph in row["phrases"]) >= 2          # the >= 2-box filter
        assert all(s < 1.0 for ph in row["phrases"] for s in ph["det_scores"])  # detector scores, not truth's 1.0

    # they load through model/data.py as the proof reads them, and their keys stay out of dev / test
    rec = shard_examples([shards])
    assert len(rec) == r["rec_pairs"] > len(rows)
    assert r["keys_disjoint_from_dev_test"] and r["load_skipped"] == {}
    # the audit against the world's truth: real boxes, far above what random weights give (~0.02)
    assert r["audit"]["recall_at_1"] > 0.5 and r["audit"]["precision"] > 0.5
    assert r["kept_with_2plus_boxes_share"] == 1.0 and r["qa_pairs"] >= r["rec_pairs"]

    # the image check can fail: against another seed's world no key is known
    with pytest.raises(ValueError, match="not an image of the world"):
        pseudo_shards.check_images(shards, pseudo_shards.world_for(1, N))
    # and the same split's truth shards as dev would be caught by the proof's own disjointness check
    with pytest.raises(ValueError, match="share"):
        learnlib.check_disjoint({"train_multi": shards, "dev_multi": str(truth)})

    # a rerun reuses the finished folder and reports the job that made it; another size is refused
    again = pseudo_shards.build_seed(0, N, tmp_path / "out", tmp_path / "work")
    assert not again["job_ran_now"] and again["job_argv"] == r["job_argv"] and again["kept_images"] == r["kept_images"]
    with pytest.raises(ValueError, match=f"built from {N} images"):
        pseudo_shards.build_seed(0, N + 1, tmp_path / "out", tmp_path / "work")
