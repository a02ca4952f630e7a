"""grounding.source: LAION columns, sampling, work shards, pre-filters and the URL guard (no Ray)."""
from __future__ import annotations

import collections
import socket
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grounding.source import (FilterConfig, SourceConfig, check_url, check_urls, dedup_candidates, list_sources,
                              prefilter, read_source, sample_rows, source_rows, source_stem)
from grounding.reasons import FAILED, FILTERED, outcome


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


def test_row_ranges_read_only_their_rows_across_row_groups(tmp_path):
    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist([laion_row(i) for i in range(25)]), path, row_group_size=4)
    assert source_rows(str(path)) == 25
    whole = read_source(str(path), SourceConfig())
    for start, stop in [(0, 10), (3, 9), (8, 12), (20, 25), (24, 40), (25, 30)]:
        part = read_source(str(path), SourceConfig(), start, stop)
        assert part.to_pylist() == whole.slice(start, max(0, min(stop, 25) - start)).to_pylist()
        assert part["source_row"].to_pylist() == list(range(start, min(stop, 25)))
    # generated keys number the file's rows, whatever range is read
    gen = tmp_path / "g.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in laion_row(i).items() if k != "key"} for i in range(5)]), gen)
    assert read_source(str(gen), SourceConfig(), 3, 5)["key"].to_pylist() == ["g-000000003", "g-000000004"]


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


def test_prefilter_counts_each_reason_and_rejects_the_given_duplicates(tmp_path):
    rows = [laion_row(0), laion_row(1, TEXT=" "), laion_row(2, TEXT="cat"), laion_row(3, WIDTH=700, HEIGHT=100),
            laion_row(4, punsafe=0.9), laion_row(5, pwatermark=0.95), laion_row(6, URL="http://169.254.169.254/x"),
            laion_row(7, URL=laion_row(0)["URL"]), laion_row(8, WIDTH=None, HEIGHT=None), laion_row(9, similarity=0.1)]
    path = write_laion(tmp_path / "p.parquet", rows)
    t = read_source(path, SourceConfig())
    cand = dedup_candidates(t, FilterConfig(min_similarity=0.2))  # the rows that take part in dedup
    assert cand["source_row"].to_pylist() == [0, 6, 7, 8]
    assert cand["url_hash"][0] == cand["url_hash"][2]  # rows 0 and 7 share a URL
    kept, rejects = prefilter(t, "p-00000", FilterConfig(min_similarity=0.2), duplicates={7})
    assert kept["key"].to_pylist() == ["k000", "k008"]  # unknown sizes pass the aspect rule
    reasons = {r["key"]: r["reason"] for r in rejects}
    assert reasons == {"k001": "empty_caption", "k002": "short_caption", "k003": "aspect_ratio", "k004": "punsafe",
                       "k005": "pwatermark", "k006": "private_host", "k007": "duplicate_url", "k009": "low_similarity"}
    assert all(r["stage"] == "prefilter" and r["source_shard"] == "p-00000" for r in rejects)
    assert kept.num_rows + len(rejects) == t.num_rows
    # a duplicate that fails an earlier check keeps that reason; dedupe_urls=False ignores duplicates
    _, rej2 = prefilter(t, "p-00000", FilterConfig(), duplicates={1, 7})
    assert {r["key"]: r["reason"] for r in rej2}["k001"] == "empty_caption"
    kept3, _ = prefilter(t, "p-00000", FilterConfig(dedupe_urls=False), duplicates={7})
    assert "k007" in kept3["key"].to_pylist()


PUBLIC = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))]  # what a public name answers


def fresh_hosts(n: int, tag: str) -> list[str]:
    """Names no earlier test resolved (the resolver caches per process)."""
    run = uuid.uuid4().hex[:8]
    return [f"img{i}.{tag}-{run}.example" for i in range(n)]


def test_dns_budget_is_per_host_not_one_deadline_per_shard(monkeypatch):
    """400 distinct hosts at 20 ms a look-up, 8 threads, a 0.5 s timeout: every host resolves (~1 s in all).
    One 0.5 s deadline for the whole shard used to leave half of them ``unresolved_host`` (filtered)."""
    def dns(host, *args, **kwargs):
        time.sleep(0.02)
        return PUBLIC

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    urls = [f"http://{h}/a.jpg" for h in fresh_hosts(400, "budget")]
    t0 = time.perf_counter()
    out = check_urls(urls, threads=8, timeout=0.5)
    assert collections.Counter(r for r, _ in out) == {None: 400}
    assert time.perf_counter() - t0 < 10


def test_a_dns_timeout_fails_the_row_and_is_not_cached(monkeypatch):
    """A look-up that outlasts its timeout proves nothing about the host: the row is *failed* as
    ``dns_timeout`` (not filtered as unresolvable, not fetched unchecked), the other hosts are unaffected,
    and a later shard asks again."""
    slow, fast = fresh_hosts(2, "timeout")
    hang = {"s": 1.5}

    def dns(host, *args, **kwargs):
        if host == slow:
            time.sleep(hang["s"])
        return PUBLIC

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    t0 = time.perf_counter()
    out = check_urls([f"http://{slow}/a.jpg", f"http://{fast}/b.jpg", "http://8.8.4.4/c.jpg"], timeout=0.2)
    assert time.perf_counter() - t0 < 1.2
    assert out[0][0] == "dns_timeout" and "0.2 s" in out[0][1] and outcome("dns_timeout") == FAILED
    assert out[1:] == [(None, None), (None, None)]
    hang["s"] = 0.0   # the DNS answers again: the next shard resolves the host
    assert check_urls([f"http://{slow}/a.jpg"], timeout=0.2) == [(None, None)]


def test_one_hung_host_costs_its_own_timeout_not_the_shards(monkeypatch):
    """Among 60 hosts over 4 threads, the first one submitted hangs: it alone is ``dns_timeout`` after its
    0.3 s, the other 59 resolve, and the call does not wait for the hung resolver (3 s)."""
    hosts = fresh_hosts(60, "onehung")
    hung = min(hosts)

    def dns(host, *args, **kwargs):
        time.sleep(3.0 if host == hung else 0.01)
        return PUBLIC

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    t0 = time.perf_counter()
    out = dict(zip(hosts, check_urls([f"http://{h}/a.jpg" for h in hosts], threads=4, timeout=0.3)))
    assert time.perf_counter() - t0 < 2.0
    assert out.pop(hung)[0] == "dns_timeout" and set(out.values()) == {(None, None)}


def test_hung_lookups_on_every_thread_still_end_the_call(monkeypatch):
    """A DNS that never answers: with every thread stuck, the call ends after timeout x (rounds + 1)
    seconds, each host ``dns_timeout``, instead of waiting for the resolver."""
    hosts = fresh_hosts(3, "hung")
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: time.sleep(1.5) or PUBLIC)
    t0 = time.perf_counter()
    out = check_urls([f"http://{h}/a.jpg" for h in hosts], threads=1, timeout=0.1)
    assert time.perf_counter() - t0 < 1.0   # 0.1 s x (3 rounds + 1), not 3 x 1.5 s
    assert [r for r, _ in out] == ["dns_timeout"] * 3


def test_a_transient_dns_failure_is_retried_and_never_cached(monkeypatch):
    """EAI_AGAIN ("temporary failure in name resolution") is retried within the look-up; one that
    persists fails the row as ``dns_error`` for this shard only: the next shard asks the DNS again."""
    once, down = fresh_hosts(2, "flaky")
    failures = {once: 1, down: 10}
    calls = collections.Counter()

    def dns(host, *args, **kwargs):
        calls[host] += 1
        if calls[host] <= failures[host]:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return PUBLIC

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    out = check_urls([f"http://{once}/a.jpg", f"http://{down}/b.jpg"], timeout=5)
    assert out[0] == (None, None)
    assert out[1][0] == "dns_error" and "Temporary failure" in out[1][1] and outcome("dns_error") == FAILED
    failures[down] = 0
    assert check_urls([f"http://{down}/b.jpg"], timeout=5) == [(None, None)]


def test_a_name_that_does_not_exist_is_filtered_and_cached(monkeypatch):
    """The real resolver's NXDOMAIN is a definite answer: ``unresolved_host`` (filtered), asked once."""
    real, calls = socket.getaddrinfo, collections.Counter()

    def counting(host, *args, **kwargs):
        calls[host] += 1
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    host = f"no-such-host-{uuid.uuid4().hex[:8]}.invalid"
    for _ in range(2):
        (reason, detail), = check_urls([f"http://{host}/a.jpg"], timeout=5)
        assert reason == "unresolved_host" and outcome(reason) == FILTERED
    assert calls[host] == 1


def test_filter_config_is_validated():
    with pytest.raises(ValueError, match="max_punsafe"):
        FilterConfig(max_punsafe=2.0)
    with pytest.raises(ValueError, match="aspect"):
        FilterConfig(min_aspect=2.0)
    with pytest.raises(ValueError, match="sample_fraction"):
        SourceConfig(sample_fraction=0.0)
