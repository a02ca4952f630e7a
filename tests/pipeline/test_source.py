"""grounding.source: LAION columns, sampling, work shards, pre-filters and the URL guard (no Ray)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grounding.source import (FilterConfig, SourceConfig, check_url, list_sources, prefilter, read_source,
                              sample_rows, source_stem, split_shards)


def write_laion(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def laion_row(i, **kw):
    row = {"URL": f"http://8.8.8.8/img/{i}.jpg", "TEXT": f"A red ball and a blue box number {i}", "WIDTH": 200,
           "HEIGHT": 100, "punsafe": 0.01, "pwatermark": 0.1, "similarity": 0.3, "key": f"k{i:03d}"}
    row.update(kw)
    return row


def test_laion_columns_lower_case_and_generated_keys(tmp_path):
    rows = [{"url": "http://8.8.8.8/a.jpg", "text": "a cat on a mat", "width": 10, "height": 20}]
    path = write_laion(tmp_path / "part-00007.parquet", rows)
    t = read_source(path, SourceConfig(paths=[path]))
    d = t.to_pylist()[0]
    assert d["url"] == "http://8.8.8.8/a.jpg" and d["caption"] == "a cat on a mat"
    assert (d["width"], d["height"]) == (10, 20)
    assert d["punsafe"] is None and d["key"] == "part-00007-000000000" and d["source_row"] == 0


def test_custom_column_names_and_missing_url_column(tmp_path):
    path = write_laion(tmp_path / "x.parquet", [{"link": "http://8.8.8.8/a.jpg", "alt": "two dogs"}])
    t = read_source(path, SourceConfig(url_col="link", text_col="alt"))
    assert t["url"].to_pylist() == ["http://8.8.8.8/a.jpg"] and t["caption"].to_pylist() == ["two dogs"]
    with pytest.raises(ValueError, match="no 'URL' column"):
        read_source(path, SourceConfig())


def test_globs_are_sorted_and_stems_name_shards(tmp_path):
    for name in ("b.parquet", "a.parquet"):
        write_laion(tmp_path / name, [laion_row(0)])
    files = list_sources([str(tmp_path / "*.parquet")])
    assert [source_stem(f) for f in files] == ["a", "b"]
    with pytest.raises(FileNotFoundError):
        list_sources([str(tmp_path / "nothing-*.parquet")])
    t = read_source(files[0], SourceConfig())
    big = pa.concat_tables([t] * 5)
    assert [(n, p.num_rows) for n, p in split_shards(big, "a", 2)] == [("a-00000", 2), ("a-00001", 2), ("a-00002", 1)]


def test_sampling_is_deterministic_and_near_the_fraction(tmp_path):
    path = write_laion(tmp_path / "s.parquet", [laion_row(i) for i in range(1000)])
    t = read_source(path, SourceConfig())
    a, b = sample_rows(t, 0.3, seed=1), sample_rows(t, 0.3, seed=1)
    assert a["key"].to_pylist() == b["key"].to_pylist()
    assert 240 <= a.num_rows <= 360
    assert sample_rows(t, 0.3, seed=2)["key"].to_pylist() != a["key"].to_pylist()
    # order-independent: the same keys are chosen from a shuffled table
    rev = t.take(pa.array(list(range(999, -1, -1))))
    assert sorted(sample_rows(rev, 0.3, seed=1)["key"].to_pylist()) == sorted(a["key"].to_pylist())


@pytest.mark.parametrize("url,reason", [
    ("http://169.254.169.254/latest/meta-data/", "private_host"),    # cloud metadata (link-local)
    ("http://localhost:8000/a.jpg", "private_host"),                  # a name resolving to 127.0.0.1
    ("http://127.0.0.1/a.jpg", "private_host"),
    ("http://2130706433/a.jpg", "private_host"),                      # 127.0.0.1 as one decimal number
    ("http://10.1.2.3/a.jpg", "private_host"),
    ("http://192.168.0.1/a.jpg", "private_host"),
    ("http://[::1]/a.jpg", "private_host"),
    ("http://[::ffff:169.254.169.254]/a.jpg", "private_host"),       # IPv4-mapped IPv6
    ("http://224.0.0.1/a.jpg", "private_host"),                       # multicast
    ("http://0.0.0.0/a.jpg", "private_host"),
    ("http://240.0.0.1/a.jpg", "private_host"),                       # reserved
    ("ftp://8.8.8.8/a.jpg", "unsafe_scheme"),
    ("file:///etc/passwd", "unsafe_scheme"),
    ("gopher://8.8.8.8/", "unsafe_scheme"),
    ("http:///nohost.jpg", "bad_url"),
    ("", "bad_url"),
    ("http://no-such-host.invalid/a.jpg", "unresolved_host"),
    ("http://8.8.8.8/a.jpg", None),
    ("https://[2606:4700:4700::1111]/a.jpg", None),
])
def test_url_guard(url, reason):
    assert check_url(url)[0] == reason


def test_url_guard_allow_options():
    assert check_url("http://127.0.0.1:9/a.jpg", allow_hosts=["127.0.0.1"]) == (None, None)
    assert check_url("http://Images.Example.TEST/a.jpg", allow_hosts=["IMAGES.example.test"]) == (None, None)  # case-blind
    assert check_url("http://localhost:9/a.jpg", allow_hosts=["127.0.0.1"])[0] == "private_host"  # exact hosts only
    assert check_url("http://169.254.169.254/", allow_private_hosts=True) == (None, None)
    assert check_url("file:///etc/passwd", allow_private_hosts=True)[0] == "unsafe_scheme"  # scheme still checked


def test_prefilter_counts_each_reason_and_dedupes_across_shards(tmp_path):
    rows = [laion_row(0), laion_row(1, TEXT=" "), laion_row(2, TEXT="cat"), laion_row(3, WIDTH=700, HEIGHT=100),
            laion_row(4, punsafe=0.9), laion_row(5, pwatermark=0.95), laion_row(6, URL="http://169.254.169.254/x"),
            laion_row(7, URL=laion_row(0)["URL"]), laion_row(8, WIDTH=None, HEIGHT=None), laion_row(9, similarity=0.1)]
    path = write_laion(tmp_path / "p.parquet", rows)
    t = read_source(path, SourceConfig())
    kept, rejects = prefilter(t, "p-00000", FilterConfig(min_similarity=0.2))
    assert kept["key"].to_pylist() == ["k000", "k008"]  # unknown sizes pass the aspect rule
    reasons = {r["key"]: r["reason"] for r in rejects}
    assert reasons == {"k001": "empty_caption", "k002": "short_caption", "k003": "aspect_ratio", "k004": "punsafe",
                       "k005": "pwatermark", "k006": "private_host", "k007": "duplicate_url", "k009": "low_similarity"}
    assert all(r["stage"] == "prefilter" and r["source_shard"] == "p-00000" for r in rejects)
    assert kept.num_rows + len(rejects) == t.num_rows
    # run-wide dedupe: a later shard with the same URL loses it
    seen = set()
    prefilter(t.slice(0, 1), "p-00000", FilterConfig(), seen)
    kept2, rej2 = prefilter(t.slice(0, 1), "p-00001", FilterConfig(), seen)
    assert kept2.num_rows == 0 and rej2[0]["reason"] == "duplicate_url"


def test_filter_config_is_validated():
    with pytest.raises(ValueError, match="max_punsafe"):
        FilterConfig(max_punsafe=2.0)
    with pytest.raises(ValueError, match="aspect"):
        FilterConfig(min_aspect=2.0)
    with pytest.raises(ValueError, match="sample_fraction"):
        SourceConfig(sample_fraction=0.0)
