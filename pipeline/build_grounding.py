"""Build grounding shards from LAION-style Parquet: the project's main job (see :mod:`pipeline.job`).

    python pipeline/build_grounding.py --sample --output demo_out              # bundled sample, embedded Ray
    python pipeline/build_grounding.py --input 's3://bucket/laion/*.parquet' --output s3://bucket/grounding \\
        --detector-model IDEA-Research/grounding-dino-tiny --download-distributor ray
    ray job submit --working-dir . -- python pipeline/build_grounding.py --input ... --output ...

Every field of :class:`pipeline.job.JobConfig` is a flag: ``--<section>-<field>`` for the nested
sections (``--source-shard-rows 5000``, ``--filters-max-punsafe 0.3``, ``--detector-box-threshold
0.3``, ``--ray-detect-actors 4``), plus short aliases for the common ones. ``--config FILE.json``
loads a config (e.g. a previous run's ``config.json``) that flags then override. The resolved
config is written to ``OUT/config.json``; rerunning the same command resumes.
"""
from __future__ import annotations

import argparse
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

from grounding.cli import UsageError, flag_hint, run_cli  # noqa: E402
from grounding.schema import read_footer  # noqa: E402
from grounding.source import list_sources  # noqa: E402
from pipeline.job import JobConfig, run_job, sample_job  # noqa: E402

SECTIONS = ("source", "filters", "download", "phrases", "detector", "ray")
ALIASES = {  # short flag -> (section or None, field)
    "input": ("source", "paths"), "limit": ("source", "limit"), "shard-rows": ("source", "shard_rows"),
    "sample-fraction": ("source", "sample_fraction"), "detector": ("detector", "backend"),
    "allow-private-hosts": ("filters", "allow_private_hosts"), "allow-host": ("filters", "allow_hosts"),
    "blocks": ("ray", "num_blocks"),
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
    for f in dataclasses.fields(JobConfig):
        if f.name not in SECTIONS:
            _add(ap, f.name.replace("_", "-"), f, f.name)
    defaults = JobConfig(sample=True)
    for section in SECTIONS:
        group = ap.add_argument_group(section)
        for f in dataclasses.fields(getattr(defaults, section)):
            _add(group, f"{section}-{f.name}".replace("_", "-"), f, f"{section}.{f.name}")
    for alias, (section, name) in ALIASES.items():
        f = next(x for x in dataclasses.fields(getattr(defaults, section)) if x.name == name)
        _add(ap, alias, f, f"{section}.{name}")
    return ap


def config_from_args(argv: Sequence[str] | None = None) -> JobConfig:
    """Flags (and ``--config``) -> a validated :class:`JobConfig`; ``--sample`` starts from :func:`sample_job`."""
    args = vars(parser().parse_args(argv))
    base: dict[str, Any]
    path = args.pop("config")
    if path:
        with open(path) as fh:
            base = json.load(fh)
    else:
        base = dataclasses.asdict(sample_job() if args.get("sample") else JobConfig(sample=True))
        base["sample"] = bool(args.get("sample"))
    base.pop("config_hash", None)
    for dest, value in args.items():
        if value is None:
            continue
        if "." in dest:
            section, name = dest.split(".", 1)
            base[section][name] = value
        else:
            base[dest] = value
    return JobConfig.from_dict(base)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except (ValueError, TypeError, OSError) as e:  # a value out of range, an unknown or unreadable --config
        flags: dict[str, str] = {}
        for action in parser()._actions:  # section flags before their short aliases
            for name in (action.dest, action.dest.split(".", 1)[-1]):
                if action.option_strings:
                    flags.setdefault(name, action.option_strings[0])
        raise UsageError(flag_hint(str(e), flags)) from e
    if not config.sample:
        try:
            for path in list_sources(config.source.paths):
                read_footer(path, flag="--input")  # a text file named .parquet fails here, named, not deep in a stage
        except FileNotFoundError as e:
            raise UsageError(f"{e}; check --input") from e
    report = run_job(config)
    return 0 if report["counts"]["adds_up"] else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
