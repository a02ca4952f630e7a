"""What the named reports read: bytes and seconds over shards with large images, prefetch off vs on.

Builds shards whose rows carry the synthetic world's phrases and boxes but incompressible image bytes
(``--image-kib`` each), runs every named report with DuckDB's file-system log on, and compares with
a query that reads the images. Prefetch off and on are the two sides: for every query they run
interleaved (off/on, on/off, ...) on two open connections, after one untimed warm-up call each
(files then sit in the page cache: seconds measure DuckDB, not the disk); seconds are reported as
median and min-max. Bytes read do not vary from run to run. Also times a balanced export and a
contact sheet. Prints a table and writes ``benchmarks/results/query.json`` (``full`` / ``quick``).

    .venv/bin/python benchmarks/bench_query.py            # full: 4 shards x 256 rows of 128 KiB, 7 rounds (~1 min)
    .venv/bin/python benchmarks/bench_query.py --quick    # the same shards, 2 rounds (~30 s)

The quick run keeps the shard sizes on purpose: what prefetch reads depends on the row-group layout
(at 2 x 128 rows it reads 0.26 MiB, not 8.4), so smaller shards would measure something else.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb  # noqa: E402

from benchmarks.measure import command, interleaved, load_now, machine, paired_ratios, spread, write_result  # noqa: E402
from grounding.export import ExportConfig, export_shards
from grounding.query import REPORTS, connect, measure_read  # noqa: E402
from grounding.render import ContactSheetConfig, render_contact_sheet  # noqa: E402
from grounding.schema import write_shard  # noqa: E402
from grounding.world import make_world, truth_rows  # noqa: E402

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
    ap.add_argument("--quick", action="store_true", help="the same shards, 2 rounds instead of 7")
    ap.add_argument("--shards", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--image-kib", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=None, help="timed interleaved rounds per query")
    ap.add_argument("--out", default=str(RESULTS / "query.json"))
    args = ap.parse_args(argv)
    for name, full, quick in (("shards", 4, 4), ("rows", 256, 256), ("repeat", 7, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    info = machine()

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
        cons = {"prefetch_off": connect(root, prefetch=False), "prefetch_on": connect(root, prefetch=True)}
        for name, (sql, params) in queries.items():
            row = {"query": name}
            stats = {tag: [] for tag in cons}
            timing = interleaved({tag: lambda c=c, tag=tag: stats[tag].append(measure_read(c, sql, params))
                                  for tag, c in cons.items()}, rounds=args.repeat, warmup=1)
            for tag in cons:
                row[f"{tag}_bytes"] = stats[tag][-1].bytes_read
                row[f"{tag}_s"] = spread([s.seconds for s in stats[tag][1:]])  # DuckDB's own timing, warm-up dropped
            row["seconds_off_over_on"] = paired_ratios(timing["wall"]["prefetch_off"], timing["wall"]["prefetch_on"])
            row["share_of_file_bytes_off"] = row["prefetch_off_bytes"] / file_bytes
            row["share_of_file_bytes_on"] = row["prefetch_on_bytes"] / file_bytes
            rows.append(row)
        for c in cons.values():
            c.close()

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
              f"{r['prefetch_off_s']['median']:8.3f} {r['prefetch_on_s']['median']:8.3f}")
    print(f"balanced export (cap 50): {res.images} images in {export_s:.2f} s; "
          f"contact sheet of {len(sheet.keys)}: {render_s:.2f} s")

    summary = next(r for r in rows if r["query"] == "summary")
    headline = {"summary_share_of_file_bytes_prefetch_off": summary["share_of_file_bytes_off"],
                "summary_bytes_prefetch_on_over_off": summary["prefetch_on_bytes"] / summary["prefetch_off_bytes"]}
    result = {
        "benchmark": "query", "mode": "quick" if args.quick else "full", "command": command("benchmarks/bench_query.py", argv),
        "config": vars(args), "image_bytes": image_bytes, "parquet_bytes": file_bytes, "reports": rows,
        "export": {"images": res.images, "seconds": export_s}, "contact_sheet_seconds": render_s,
        "duckdb": duckdb.__version__, "machine": info, "load_average_at_end": load_now(),
        "note": "Files are in the page cache after the warm-up call, so seconds measure DuckDB, not the disk; bytes are "
                "what DuckDB asked the file system for (its FileSystem log) and do not vary between runs. Prefetch "
                "off and on interleaved per query (order reversed every round). Timings taken on a 2-core machine "
                "shared with other jobs (load averages recorded): milliseconds, noisy; the headline is bytes.",
    }
    stored = write_result(args.out, result, args.quick, headline)
    print("headline:", headline, "quick vs full:", stored.get("quick_vs_full"))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
