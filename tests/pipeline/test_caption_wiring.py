"""The pipeline's stages store the cleaned caption (spans index it) and the raw one."""
from __future__ import annotations

from grounding.captions import clean_caption
from grounding.detect import DetectorConfig
from pipeline.stages import DetectStage, assemble, split_output
from tests.pipeline.test_stages import phrase_stage, world_batch, world_files  # noqa: F401 - fixtures


def test_hostile_caption_stored_clean_beside_raw(world, world_files, phrase_stage):
    im = world[0]
    raw = f"&lt;b&gt;{im.caption}&lt;/b&gt; &amp;amp;\x00\x07"
    batch = world_batch(world, 1)
    batch = batch.set_column(batch.schema.get_field_index("caption"), "caption", [[raw]])
    detect = DetectStage(DetectorConfig(backend="annotations", annotations=str(world_files.coco), refs=str(world_files.refs)))
    kept, rejects = split_output(assemble(detect(phrase_stage(batch)), min_boxes=2))
    assert rejects.num_rows == 0, rejects.to_pylist()
    [row] = kept.to_pylist()
    assert (row["caption"], row["caption_raw"]) == (clean_caption(raw), raw)
    assert row["caption"] == f"{im.caption} &"
    assert row["phrases"] and all(row["caption"][p["start"]:p["end"]] == p["text"] for p in row["phrases"])
