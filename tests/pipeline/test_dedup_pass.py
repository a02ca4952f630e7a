"""The URL dedup pre-pass's tasks run in-process on real Parquet files: whatever the map grouping and the
number of buckets, a shard's losers are exactly the rows whose URL occurred earlier in (shard, row) order."""
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grounding.source import FilterConfig, SourceConfig
from pipeline import dedup
from pipeline.plan import plan_shards


def run_pass(root: str, shards, max_files: int, partitions: int) -> tuple[dict[int, set[int]], int]:
    source, filters = SourceConfig(paths=[f"{root}/*.parquet"], shard_rows=5), FilterConfig(min_similarity=0.0)
    groups = dedup.map_groups(len(shards), max_files)
    candidates = sum(dedup.map_group(f"{root}/dedup", g, shards[lo:hi], source, filters, partitions)[0]
                     for g, (lo, hi) in enumerate(groups))
    for b in range(partitions):
        dedup.reduce_bucket(f"{root}/dedup", b, groups)
    for g, (lo, hi) in enumerate(groups[1:], start=1):  # group 0's losers come from its map task
        dedup.gather_group(f"{root}/dedup", g, lo, hi, partitions)
    return {s.index: dedup.duplicate_rows(f"{root}/dedup", s.index, dedup.group_of(groups, s.index)) for s in shards}, candidates


@pytest.mark.parametrize("max_files,partitions", [(100, 1), (100, 4), (3, 2), (2, 5), (1, 3)])
def test_first_occurrence_wins_whatever_the_grouping(tmp_path, max_files, partitions):
    rng = random.Random(max_files * 10 + partitions)
    urls = [f"http://example.com/{rng.randrange(12)}.jpg" for _ in range(33)]  # many repeats, within and across shards
    rows = [{"URL": u, "TEXT": f"a red ball and a blue box {i}", "key": f"k{i:02d}"} for i, u in enumerate(urls)]
    pq.write_table(pa.Table.from_pylist(rows[:21]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[21:]), tmp_path / "b.parquet")
    shards = plan_shards(SourceConfig(paths=[str(tmp_path / "*.parquet")], shard_rows=5))
    got, candidates = run_pass(str(tmp_path), shards, max_files, partitions)
    seen, want = set(), {s.index: set() for s in shards}
    for s in shards:
        offset = 0 if s.source_file.endswith("a.parquet") else 21
        for r in range(s.start, s.stop):
            if urls[offset + r] in seen:
                want[s.index].add(r)
            seen.add(urls[offset + r])
    assert candidates == 33 and got == want and sum(map(len, want.values())) == 33 - len(set(urls))
    groups = dedup.map_groups(len(shards), max_files)
    assert len(groups) <= max_files and [lo for lo, _ in groups] == sorted({lo for lo, _ in groups})
    assert len(list((tmp_path / "dedup" / "losers").iterdir())) == len(groups)  # one losers file per group, not per shard x bucket
