"""Build grounding shards from LAION-style Parquet: the project's main job (see :mod:`pipeline.job`).

    python pipeline/build_grounding.py --sample --output demo_out              # bundled sample, embedded Ray
    python pipeline/build_grounding.py --input 's3://bucket/laion/*.parquet' --output s3://bucket/grounding \\
        --detector-model IDEA-Research/grounding-dino-tiny --ray-detect-actors 4
    ray job submit --working-dir . -- python pipeline/build_grounding.py --input ... --output ...

Every field of :class:`pipeline.config.JobConfig` is a flag: ``--<section>-<field>`` for the nested
sections (``--source-shard-rows 5000``, ``--filters-max-punsafe 0.3``, ``--detector-box-threshold
0.3``, ``--ray-detect-actors 4``), plus short aliases for the common ones. ``--config FILE.json``
loads a config (e.g. a previous run's ``config.json``) that flags then override. The resolved
config is written to ``OUT/config.json``; rerunning the same command resumes. ``--sample`` (with
``--sample-size``, ``--sample-seed``) builds from the bundled synthetic sample (:mod:`pipeline.sample`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from grounding.cli import UsageError, apply_flags, flag_hint, run_cli  # noqa: E402
from grounding.schema import read_footer  # noqa: E402
from grounding.source import list_sources, resolve_column  # noqa: E402
from pipeline.config import JobConfig  # noqa: E402
from pipeline.job import run_job  # noqa: E402
from pipeline.sample import SampleConfig, sample_job, served_sample, with_sample_annotations  # noqa: E402

SECTIONS = ("source", "filters", "download", "phrases", "detector", "ray", "dedup")
ALIASES = {  # short flag -> (section or None, field)
    "input": ("source", "paths"), "limit": ("source", "limit"), "shard-rows": ("source", "shard_rows"),
    "sample-fraction": ("source", "sample_fraction"), "detector": ("detector", "backend"),
    "allow-private-hosts": ("filters", "allow_private_hosts"), "allow-host": ("filters", "allow_hosts"),
}


def _kind(f: dataclasses.Field) -> tuple[type, bool]:
    """(scalar type, is_list) of a dataclass field from its annotation string."""
    t = str(f.type)
    is_list = t.startswith(("list[", "tuple[")) or "list[" in t
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if name in t.replace("list[", "").replace("tuple[", ""):
            return typ, is_list
    return str, is_list


def _add(ap: argparse.ArgumentParser, flag: str, f: dataclasses.Field, dest: str) -> None:
    typ, is_list = _kind(f)
    if typ is bool and not is_list:
        ap.add_argument(f"--{flag}", dest=dest, action=argparse.BooleanOptionalAction, default=None)
    elif is_list:
        ap.add_argument(f"--{flag}", dest=dest, nargs="+", type=typ, default=None, metavar=f.name.upper())
    else:
        ap.add_argument(f"--{flag}", dest=dest, type=lambda v, typ=typ: None if v.lower() == "none" else typ(v),
                        default=None, metavar=f.name.upper())


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="build_grounding.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a JSON config file (nested like OUT/config.json); flags override it")
    demo = ap.add_argument_group("sample", "the bundled synthetic sample, served on 127.0.0.1 (the README demo)")
    demo.add_argument("--sample", action="store_true", help="build from the bundled sample instead of --input")
    demo.add_argument("--sample-size", type=int, default=SampleConfig.size, help="images in the sample")
    demo.add_argument("--sample-seed", type=int, default=SampleConfig.seed)
    for f in dataclasses.fields(JobConfig):
        if f.name not in SECTIONS:
            _add(ap, f.name.replace("_", "-"), f, f.name)
    defaults = sample_job()
    for section in SECTIONS:
        group = ap.add_argument_group(section)
        for f in dataclasses.fields(getattr(defaults, section)):
            _add(group, f"{section}-{f.name}".replace("_", "-"), f, f"{section}.{f.name}")
    for alias, (section, name) in ALIASES.items():
        f = next(x for x in dataclasses.fields(getattr(defaults, section)) if x.name == name)
        _add(ap, alias, f, f"{section}.{name}")
    ap.add_argument("--download-max-image-area", dest="max_pixels", type=int, default=None, metavar="MAX_PIXELS",
                    help="deprecated: the same as --max-pixels (img2dataset's limit and the header check are one setting)")
    return ap


def parse(argv: Sequence[str] | None = None) -> tuple[JobConfig, SampleConfig | None]:
    """Flags (and ``--config``) -> a validated :class:`JobConfig`, plus the sample to serve with ``--sample``."""
    args = vars(parser().parse_args(argv))
    size, seed = args.pop("sample_size"), args.pop("sample_seed")
    sample = SampleConfig(size, seed) if args.pop("sample") else None
    path = args.pop("config")
    base: dict[str, Any]
    if path:
        with open(path) as fh:
            base = json.load(fh)
    elif sample is not None:
        base = dataclasses.asdict(sample_job(args.get("output") or "demo_out"))
    else:
        base = {f.name: dataclasses.asdict(f.default_factory()) if f.default_factory is not dataclasses.MISSING
                else f.default for f in dataclasses.fields(JobConfig)}
    base.pop("config_hash", None)
    base.pop("rows_version", None)   # written beside the config by claim_output
    apply_flags(base, args)
    return JobConfig.from_dict(with_sample_annotations(base) if sample is not None else base), sample


def config_from_args(argv: Sequence[str] | None = None) -> JobConfig:
    return parse(argv)[0]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, sample = parse(argv)
    except (ValueError, TypeError, OSError) as e:  # a value out of range, an unknown or unreadable --config
        flags: dict[str, str] = {}
        for action in parser()._actions:  # section flags before their short aliases
            for name in (action.dest, action.dest.split(".", 1)[-1]):
                if action.option_strings:
                    flags.setdefault(name, action.option_strings[0])
        raise UsageError(flag_hint(str(e), flags)) from e
    if sample is None:
        try:
            for path in list_sources(config.source.paths):  # on the driver: a bad file is named here, not in a Ray task
                names = read_footer(path, flag="--input").schema.to_arrow_schema().names
                for flag, column in (("--source-url-col", config.source.url_col), ("--source-text-col", config.source.text_col)):
                    if resolve_column(names, column) is None:
                        raise UsageError(f"{path}: no {column!r} column (has {names}); set {flag}")
        except FileNotFoundError as e:
            raise UsageError(f"{e}; check --input") from e
    with served_sample(config, sample) if sample is not None else contextlib.nullcontext(config):
        report = run_job(config)
    return 0 if report["counts"]["adds_up"] else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
