import duckdb
import pyarrow.parquet as pq
import pytest

from grounding.schema import (GROUNDING_SCHEMA, REJECTS_SCHEMA, SCHEMA_VERSION, GroundingRow, SchemaError,
                              read_metadata, read_shard, write_shard)


def _row(key="k1", caption="a red ball and a blue box"):
    return {
        "key": key, "url": f"http://x/{key}.jpg", "caption": caption, "width": 200, "height": 100,
        "original_width": 400, "original_height": 200, "image": b"\xff\xd8fake",
        "phrases": [
            {"text": "a red ball", "start": 0, "end": 10, "head": "ball", "kind": "chunk", "prompt": "red ball",
             "boxes_norm": [[10, 20, 300, 400]], "det_scores": [0.9]},
            {"text": "a blue box", "start": 15, "end": 25, "head": "box", "kind": "chunk", "prompt": "blue box",
             "boxes_norm": [[500, 500, 600, 700], [1, 2, 3, 4]], "det_scores": [0.8, 0.5]},
        ],
        "qa": [{"task": "rec", "question": "Question: Where is the red ball?", "answer": "Answer: [[010,020,300,400]]",
                "phrase_index": 0}],
        "grounded_caption": "a red ball [[010,020,300,400]] and a blue box [[500,500,600,700;001,002,003,004]]",
        "num_boxes": 3, "source_shard": "00000", "source_row": 4,
    }


def test_write_read_duckdb_same_values(tmp_path):
    path = str(tmp_path / "shards" / "00000.parquet")
    write_shard([_row("k1"), _row("k2")], path, provenance={"detector": "tiny", "config_hash": "abc"})
    rows = list(read_shard(path))
    assert [r.key for r in rows] == ["k1", "k2"]
    assert isinstance(rows[0], GroundingRow)
    assert rows[0].phrases[1].boxes_norm == [[500, 500, 600, 700], [1, 2, 3, 4]]
    assert rows[0].phrases[1].det_scores == pytest.approx([0.8, 0.5])
    assert rows[0].image == b"\xff\xd8fake"
    meta = read_metadata(path)
    assert meta == {"schema_version": SCHEMA_VERSION, "provenance": {"detector": "tiny", "config_hash": "abc"}}
    assert pq.read_schema(path).remove_metadata().equals(GROUNDING_SCHEMA)
    got = duckdb.sql(f"""
        SELECT key, p.text, p.boxes_norm[1][3] AS x1, p.det_scores[1] AS s
        FROM (SELECT key, unnest(phrases) AS p FROM read_parquet('{tmp_path}/shards/*.parquet'))
        ORDER BY key, p.start""").fetchall()
    assert got[:2] == [("k1", "a red ball", 300, pytest.approx(0.9)), ("k1", "a blue box", 600, pytest.approx(0.8))]
    assert len(got) == 4
    assert not [p for p in (tmp_path / "shards").iterdir() if p.name.endswith(".tmp")]  # no temp left


@pytest.mark.parametrize("mutate,msg", [
    (lambda r: r["phrases"][0].update(start=1), "does not match its text"),
    (lambda r: r["phrases"][0].update(boxes_norm=[[10, 20, 1000, 400]]), "not 4 ordered integers"),
    (lambda r: r["phrases"][0].update(det_scores=[]), "1 boxes but 0 scores"),
    (lambda r: r["phrases"][0].update(kind="noun"), "kind must be"),
    (lambda r: r["qa"][0].update(phrase_index=5), "phrase_index 5 out of range"),
    (lambda r: r.pop("caption"), "lack required columns"),
    (lambda r: r.update(width="wide"), "do not fit the schema"),
])
def test_writer_rejects_bad_rows(tmp_path, mutate, msg):
    r = _row()
    mutate(r)
    with pytest.raises(SchemaError, match=msg):
        write_shard([r], str(tmp_path / "bad.parquet"))
    assert not list(tmp_path.iterdir())  # nothing written, not even a temp file


def test_rejects_schema_and_datasets_loader(tmp_path):
    path = str(tmp_path / "rejects.parquet")
    write_shard([{"key": "k", "url": "u", "caption": "", "source_shard": "s", "source_row": 0,
                  "stage": "prefilter", "reason": "empty_caption", "error": None}], path, schema=REJECTS_SCHEMA)
    assert duckdb.sql(f"SELECT reason FROM '{path}'").fetchall() == [("empty_caption",)]
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=path, split="train")
    assert ds[0]["reason"] == "empty_caption"
