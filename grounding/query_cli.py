"""``grounding-query`` (or ``python -m grounding.query``): the command line over :mod:`grounding.query`.

Command line (``python -m grounding.query`` or ``grounding-query``)::

    grounding-query "SELECT count(*) FROM shards" --data OUT           # sql is the default command
    grounding-query sql "SELECT ..." --data OUT -o result.csv          # csv | json (NDJSON) | parquet
    grounding-query reports                                            # the report names
    grounding-query report top_heads --data OUT --limit 20
    grounding-query export SUBSET --data OUT --where "num_boxes >= 3"  # see grounding.export
    grounding-query export SUBSET --data OUT --cap 100 --min-images 3 --seed 0
    grounding-query export COCO_DIR --data OUT --format coco            # coco | odvg | grit: grounding.convert
    grounding-query render sheet.png --data OUT --where "num_boxes >= 3" -n 16

``--data`` defaults to the ``GROUNDING_SHARDS`` environment variable.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import duckdb

from grounding.cli import USAGE_EXIT, run_cli
from grounding.query import ENV_DATA, FORMATS, REPORTS, check_source, connect, report, resolve_source, write_result


# --- command line ----------------------------------------------------------------------------

COMMANDS = ("sql", "report", "reports", "export", "render", "audit")


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help=f"pipeline output folder, shards folder, shard file or glob (default ${ENV_DATA})")
    p.add_argument("--shards", help="explicit glob of grounding shards (overrides what --data implies)")
    p.add_argument("--rejects", help="explicit glob of rejects shards")
    p.add_argument("--threads", type=int, help="DuckDB threads (default: all cores)")


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--format", choices=FORMATS, help="table (default), csv, json (NDJSON) or parquet; "
                   "inferred from --output's extension")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.add_argument("--max-rows", type=int, default=100, help="rows a printed table shows (default 100)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grounding-query", description="DuckDB over grounding shards: SQL, named reports, subset export, contact sheets, audits.",
                                     epilog=__doc__[__doc__.index("Command line"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sql", help="run a SQL query over the shards/rejects views")
    p.add_argument("query", help='SQL, e.g. "SELECT key, num_boxes FROM shards LIMIT 5"')
    _source_args(p)
    _output_args(p)

    p = sub.add_parser("report", help="run a named report")
    p.add_argument("name", choices=sorted(REPORTS))
    p.add_argument("--limit", type=int, help="rows of top_heads / top_phrases")
    p.add_argument("--bins", type=int, help="bins of box_area / scores")
    p.add_argument("--show-sql", action="store_true", help="print the report's SQL and exit")
    _source_args(p)
    _output_args(p)

    sub.add_parser("reports", help="list the named reports")

    p = sub.add_parser("export", help="write a filtered or concept-balanced subset as new shards")
    p.add_argument("dest", help="output folder: DEST/shards/*.parquet and DEST/export.json")
    p.add_argument("--where", help='SQL filter over shards, e.g. "num_boxes >= 3"')
    p.add_argument("--cap", type=int, help="balance: at most this many images chosen per concept")
    p.add_argument("--min-images", type=int, default=3, help="balance: drop concepts in fewer images (default 3)")
    p.add_argument("--by", choices=("head", "phrase"), default="head", help="balance concept (default head noun)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in DEST")
    p.add_argument("-f", "--format", choices=("shards", "coco", "odvg", "grit"), default="shards",
                   help="shards (default), or a converted format: coco (JSON + images), odvg or grit (JSONL + images)")
    _source_args(p)

    p = sub.add_parser("render", help="contact sheet PNG of images with their boxes and phrases")
    p.add_argument("output", help="PNG path")
    p.add_argument("--where", help="SQL filter over shards choosing the candidates")
    p.add_argument("--sql", help="a query returning a `key` column, in the order to show")
    p.add_argument("-n", "--count", type=int, default=16, help="images on the sheet (default 16)")
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--cell", type=int, default=320, help="cell size in pixels (default 320)")
    p.add_argument("--seed", type=int, default=0, help="random sample under this seed (with --where)")
    p.add_argument("--min-score", type=float, default=0.0, help="hide boxes scored below this")
    _source_args(p)

    p = sub.add_parser("audit", help="pseudo-boxes against human boxes: IoU, precision/recall by score, threshold")
    from grounding.audit import main_args as audit_args
    audit_args(p)
    p.add_argument("-o", "--output", help="write the JSON report here instead of stdout")
    _source_args(p)
    return parser


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string, of any command, that takes a value (``--where``, ``-n``, ``--data`` ...):
    read from the parser itself, so a new option cannot be forgotten here."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                found |= _value_options(p)
        elif action.option_strings and action.nargs != 0:
            found.update(action.option_strings)
    return found


def _command_first(argv: list[str]) -> list[str]:
    """Let options come before the command (`--data OUT --where "..." export DEST`), and make a bare
    SQL string mean the `sql` command (`grounding-query "SELECT ..."`)."""
    value_options = _value_options(build_parser())
    i = 0
    while i < len(argv):
        if argv[i].startswith("-"):
            i += 2 if argv[i] in value_options else 1  # `--opt=value` is one word: not in the set
            continue
        if argv[i] in COMMANDS:
            return [argv[i]] + argv[:i] + argv[i + 1:]
        return ["sql"] + argv
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = _command_first(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)

    if args.command == "reports":
        for r in REPORTS.values():
            print(f"{r.name:18s} {r.doc.splitlines()[0]}")
        return 0
    if args.command == "report" and args.show_sql:
        print(REPORTS[args.name].text(), end="")
        return 0

    try:
        check_source(resolve_source(args.data, shards=args.shards, rejects=args.rejects))
        con = connect(args.data, shards=args.shards, rejects=args.rejects, threads=args.threads)
    except (OSError, ValueError) as e:  # no such folder, a file that is no shard of its kind (check_shard)
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    try:
        return _run(con, args)
    except (duckdb.Error, OSError, ValueError) as e:  # bad SQL, an existing export, a bad config
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return USAGE_EXIT
    finally:
        con.close()


def _format_for(output: str | None, fmt: str | None) -> str:
    if fmt:
        return fmt
    if output:
        ext = Path(output).suffix.lower().lstrip(".")
        return {"csv": "csv", "json": "json", "jsonl": "json", "ndjson": "json", "parquet": "parquet"}.get(ext, "table")
    return "table"


def _run(con: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> int:
    if args.command == "sql":
        rel = con.sql(args.query)
        if rel is not None:  # None: a statement without a result (CREATE, COPY ...)
            write_result(con, rel, _format_for(args.output, args.format), args.output, args.max_rows)
    elif args.command == "report":
        rel = report(con, args.name, **{k: getattr(args, k) for k in REPORTS[args.name].params})
        write_result(con, rel, _format_for(args.output, args.format), args.output, args.max_rows)
    elif args.command == "export":
        from grounding.export import ExportConfig, export_shards

        cfg = ExportConfig(where=args.where, cap=args.cap, min_images=args.min_images, by=args.by,
                           seed=args.seed, rows_per_shard=args.rows_per_shard)
        if args.format == "shards":
            result = export_shards(con, args.dest, cfg, overwrite=args.overwrite)
        else:
            from grounding.export import export_converted

            result = export_converted(con, args.dest, args.format, cfg, overwrite=args.overwrite)
        print(json.dumps(result.summary(), indent=1))
    elif args.command == "render":
        from grounding.render import ContactSheetConfig, render_contact_sheet

        cfg = ContactSheetConfig(count=args.count, columns=args.columns, cell=args.cell, min_score=args.min_score)
        sheet = render_contact_sheet(con, where=args.where, sql=args.sql, seed=args.seed, config=cfg)
        sheet.image.save(args.output)
        print(f"{args.output}: {len(sheet.keys)} images, {sheet.image.width}x{sheet.image.height}"
              + (f", {len(sheet.errors)} undecodable" if sheet.errors else ""))
    elif args.command == "audit":
        from grounding.audit import run as run_audit

        run_audit(con, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
