"""Command line of the phrase extractor: one JSON line per caption, from stdin or a Parquet column.

    printf 'A dog in a field of flowers\\nStock photo\\n' | python -m grounding.phrase_cli
    python -m grounding.phrase_cli --parquet laion.parquet --column TEXT --max-phrases 8

``python -m grounding.phrases`` is the same command (an alias kept for existing scripts).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterator

from grounding.phrases import PhraseConfig, PhraseExtractor

def _stdin_captions(stream) -> Iterator[str]:
    for line in stream:
        yield line.rstrip("\n").rstrip("\r")


def _parquet_captions(path: str, column: str) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if column not in f.schema_arrow.names:
        raise SystemExit(f"column {column!r} not in {path} (columns: {f.schema_arrow.names})")
    for batch in f.iter_batches(columns=[column], batch_size=4096):
        yield from batch.column(0).to_pylist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grounding.phrases", description=(
        "Referring phrases for a detector, one JSON line per caption: captions one per line on stdin, "
        "or a column of a Parquet file."))
    ap.add_argument("--parquet", help="read captions from this Parquet file instead of stdin")
    ap.add_argument("--column", default="TEXT", help="caption column of --parquet (default: TEXT, LAION's)")
    ap.add_argument("--output", "-o", help="write JSON lines here instead of stdout")
    d = PhraseConfig()
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--max-phrases", type=int, default=d.max_phrases)
    ap.add_argument("--no-expressions", action="store_true", help="emit noun chunks only")
    ap.add_argument("--extra-nonvisual", nargs="*", default=[], metavar="WORD", help="more non-visual head lemmas")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--n-process", type=int, default=d.n_process)
    ap.add_argument("--max-chars", type=int, default=d.max_chars)
    ap.add_argument("--no-ner", action="store_true",
                    help="skip NER (faster; places, dates, organisations and named people are then not recognised)")
    args = ap.parse_args(argv)
    try:
        config = PhraseConfig(model=args.model, max_phrases=args.max_phrases, expressions=not args.no_expressions,
                              extra_nonvisual=tuple(args.extra_nonvisual), batch_size=args.batch_size,
                              n_process=args.n_process, max_chars=args.max_chars, ner=not args.no_ner)
    except ValueError as exc:
        ap.error(str(exc))
    extractor = PhraseExtractor(config)
    captions = _parquet_captions(args.parquet, args.column) if args.parquet else _stdin_captions(sys.stdin)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for res in extractor.stream(captions):
            out.write(json.dumps(res.to_dict(), ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    from grounding.cli import run_cli
    raise SystemExit(run_cli(main))
