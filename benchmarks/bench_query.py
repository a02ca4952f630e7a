"""What the named reports read: bytes and seconds over shards with large images, prefetch off vs on.

Builds shards whose rows carry the synthetic world's phrases and boxes but incompressible image bytes
(``--image-kib`` each), runs every named report with DuckDB's file-system log on, and compares with
a query that reads the images. Also times a balanced export and a contact sheet. Prints a table and
writes ``benchmarks/results/query.json``.

    .venv/bin/python benchmarks/bench_query.py [--shards 4 --rows 256 --image-kib 128 --repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import duckdb

from grounding.export import ExportConfig, export_shards
from grounding.query import REPORTS, connect, measure_read
from grounding.render import ContactSheetConfig, render_contact_sheet
from grounding.schema import write_shard
from grounding.world import make_world, truth_rows

RESULTS = Path(__file__).resolve().parent / "results"


def build(root: Path, shards: int, rows: int, image_kib: int, seed: int = 0) -> int:
    """Write ``shards`` x ``rows`` rows; returns the total image bytes. Row 0 of each shard keeps a
    real JPEG (for the contact sheet); the others carry random bytes of ``image_kib`` KiB."""
    base = truth_rows(make_world(64, seed=seed))
    image_bytes = 0
    for s in range(shards):
        out = []
        for i in range(rows):
            r = dict(base[(s * rows + i) % len(base)])
            r["key"] = f"{s:05d}{i:06d}"
            r["source_shard"] = f"{s:05d}"
            if i:
                r["image"] = os.urandom(image_kib << 10)
            image_bytes += len(r["image"])
            out.append(r)
        write_shard(out, str(root / "shards" / f"{s:05d}.parquet"), provenance={"detector": "world-truth"})
    return image_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--image-kib", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "query.json"))
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_query_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        image_bytes = build(root, args.shards, args.rows, args.image_kib)
        build_s = time.perf_counter() - t0
        file_bytes = sum(f.stat().st_size for f in (root / "shards").glob("*.parquet"))
        queries = {name: (r.sql, {k: v for k, v in r.params.items() if f"${k}" in r.sql} or None)
                   for name, r in REPORTS.items()}
        queries["images (sum of image sizes)"] = ("SELECT sum(octet_length(image)) FROM shards", None)
        rows = []
        for name, (sql, params) in queries.items():
            row = {"query": name}
            for prefetch in (False, True):
                con = connect(root, prefetch=prefetch)
                stats = [measure_read(con, sql, params) for _ in range(args.repeat)]
                con.close()
                tag = "prefetch_on" if prefetch else "prefetch_off"
                row[f"{tag}_bytes"] = stats[-1].bytes_read
                row[f"{tag}_s"] = statistics.median(s.seconds for s in stats)
            row["share_of_file_bytes_off"] = row["prefetch_off_bytes"] / file_bytes
            row["share_of_file_bytes_on"] = row["prefetch_on_bytes"] / file_bytes
            rows.append(row)

        con = connect(root)
        t0 = time.perf_counter()
        res = export_shards(con, root / "subset", ExportConfig(cap=50, min_images=3, seed=0))
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sheet = render_contact_sheet(con, sql="SELECT key FROM shards WHERE key LIKE '%000000' ORDER BY key",
                                     config=ContactSheetConfig(count=4, columns=4, cell=256))
        render_s = time.perf_counter() - t0

    print(f"{args.shards} shards x {args.rows} rows, {image_bytes / 2**20:.1f} MiB of image bytes, "
          f"{file_bytes / 2**20:.1f} MiB of Parquet (built in {build_s:.1f} s)")
    print(f"{'query':32s} {'read, prefetch off':>20s} {'read, prefetch on':>20s} {'s off':>8s} {'s on':>8s}")
    for r in rows:
        print(f"{r['query']:32s} {r['prefetch_off_bytes'] / 2**20:16.2f} MiB {r['prefetch_on_bytes'] / 2**20:16.2f} MiB "
              f"{r['prefetch_off_s']:8.3f} {r['prefetch_on_s']:8.3f}")
    print(f"balanced export (cap 50): {res.images} images in {export_s:.2f} s; "
          f"contact sheet of {len(sheet.keys)}: {render_s:.2f} s")

    result = {
        "benchmark": "query", "command": "python benchmarks/bench_query.py " + " ".join(argv or []),
        "config": vars(args), "image_bytes": image_bytes, "parquet_bytes": file_bytes, "reports": rows,
        "export": {"images": res.images, "seconds": export_s}, "contact_sheet_seconds": render_s,
        "duckdb": duckdb.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "note": "Files are in the page cache after the first run, so seconds measure DuckDB, not the disk; bytes are "
                "what DuckDB asked the file system for (its FileSystem log). Timings taken on a 2-core machine shared "
                "with other jobs: noisy.",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
