import io
import json
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from PIL import Image

from grounding.world import make_world


def test_world_is_deterministic_and_spans_match(world):
    again = make_world(12, seed=7)
    assert [w.caption for w in world] == [w.caption for w in again]
    for im in world:
        assert 2 <= len(im.objects) <= 4
        for o in im.objects:
            assert im.caption[o.start:o.end].lower() == o.named
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= im.width and 0 <= y0 < y1 <= im.height


def test_captions_use_the_right_article():
    objs = [o for im in make_world(40, seed=1) for o in im.objects]
    oranges = [o for o in objs if o.colour == "orange"]
    assert oranges and all(o.named == f"an orange {o.shape}" for o in oranges)
    assert all(o.named.startswith("a ") for o in objs if o.colour != "orange")


def test_rendered_pixels_follow_the_boxes(world):
    from grounding.world import COLOURS
    im = world[0]
    pixels = im.render()
    for o in im.objects:
        cx, cy = (o.box[0] + o.box[2]) // 2, (o.box[1] + o.box[3]) // 2
        assert pixels.getpixel((cx, cy)) == COLOURS[o.colour]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers["Content-Type"], r.read()


def test_server_serves_images_and_broken_urls_fail(world_server, world):
    server, files = world_server
    table = pq.read_table(files.parquet).to_pylist()
    assert len(table) == len(world) + 5
    good = table[0]
    status, ctype, body = _get(good["URL"])
    assert status == 200 and ctype == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size == (good["WIDTH"], good["HEIGHT"])
    by_kind = {files.broken_keys[r["key"]]: r["URL"] for r in table if r["key"] in files.broken_keys}
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(by_kind["missing"])
    assert e.value.code == 404
    _, ctype, body = _get(by_kind["corrupt"])
    with pytest.raises(Exception):
        Image.open(io.BytesIO(body)).load()
    assert _get(by_kind["notimage"])[1] == "text/html"
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        _get(by_kind["slow"], timeout=1)


def test_coco_and_refs_match_world(world_server, world):
    _, files = world_server
    coco = json.loads(files.coco.read_text())
    refs = json.loads(files.refs.read_text())
    assert len(coco["images"]) == len(world)
    assert len(coco["annotations"]) == sum(len(w.objects) for w in world) == len(refs)
    first = world[0].objects[0]
    ann = coco["annotations"][0]
    assert ann["bbox"] == [first.box[0], first.box[1], first.box[2] - first.box[0], first.box[3] - first.box[1]]
    assert refs[0]["sentences"][0]["sent"] == first.phrase


def test_truth_shards_hold_true_boxes_and_qa(tmp_path, world):
    from grounding.boxes import denormalize_box, parse_boxes
    from grounding.schema import read_shard
    from grounding.world import write_truth_shards

    paths = write_truth_shards(world, tmp_path, rows_per_shard=5)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    rows = [r for p in paths for r in read_shard(p)]
    assert len(rows) == len(world)
    r, im = rows[0], world[0]
    assert r.num_boxes == len(im.objects)
    rec = [q for q in r.qa if q.task == "rec"]
    assert len(rec) == len(im.objects)
    assert rec[0].question == f"Question: Where is the {im.objects[0].phrase}?"
    (box,) = parse_boxes(rec[0].answer)
    back = denormalize_box(box, im.width, im.height)
    assert all(abs(a - b) <= max(im.width, im.height) / 1000 for a, b in zip(back, im.objects[0].box))
    assert r.grounded_caption.count("[[") == len(im.objects)
