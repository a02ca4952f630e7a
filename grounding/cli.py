"""How every command line of the project reports a user's mistake: one ``error: …`` line, exit code 2.

A user error is something the person at the keyboard fixes by changing a flag or an input file: a
glob that matches nothing, a rejects shard given as training data, a column name, a value out of
range. Code raises :class:`UsageError` (or a subclass, e.g. :class:`grounding.schema.ShardError`)
with a message that names the file and the flag to change; :func:`run_cli` prints it and exits 2,
like argparse does for a malformed flag. Anything else is a bug and keeps its traceback.

    if __name__ == "__main__":
        sys.exit(run_cli(main))
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Mapping, Sequence

USAGE_EXIT = 2


class UsageError(ValueError):
    """A mistake in the command line or its inputs; the message says what to change."""


def flag_hint(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with the flags of the config fields it names: ``"batch_size must be >= 1"`` and
    ``{"batch_size": "--batch-size"}`` give ``"batch_size must be >= 1 (flag --batch-size)"``."""
    named = [flag for name, flag in flags.items() if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", message)]
    named = list(dict.fromkeys(named))
    return f"{message} (flag {', '.join(named)})" if named else message


def field_flags(fields: Sequence[str], prefix: str = "") -> dict[str, str]:
    """Dataclass field names -> their ``--kebab-case`` flags (``prefix`` for nested sections)."""
    return {f: "--" + (prefix + f).replace("_", "-") for f in fields}


def parse_bool(s: str) -> bool:
    """A boolean flag's value: ``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case)."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_bool_flag(parser: argparse.ArgumentParser, flag: str, default: bool | None = None, **kwargs) -> None:
    """A boolean flag with one form on every command line: ``--flag`` alone means true, ``--flag true|false`` sets it."""
    parser.add_argument(flag, nargs="?", const=True, type=parse_bool, default=default, metavar="{true,false}", **kwargs)


def _one_line(message: str) -> str:
    """The user's message out of a DataLoader worker's re-raised one (it appends the worker's traceback)."""
    if "Original Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


def apply_flags(base: dict, flags: Mapping[str, object]) -> dict:
    """Overlay parsed flags on a config dict: ``"section.field"`` or ``"field"`` -> value (``None``: not given)."""
    for dest, value in flags.items():
        if value is None:
            continue
        if "." in dest:
            section, name = dest.split(".", 1)
            base.setdefault(section, {})[name] = value
        else:
            base[dest] = value
    return base


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; a :class:`UsageError` (or ``SystemExit("message")``) becomes ``error: message`` on
    stderr and exit code 2. Returns ``main``'s int result (0 for anything else it returns)."""
    try:
        result = main(argv)
    except UsageError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return USAGE_EXIT
    except SystemExit as e:
        if isinstance(e.code, str):
            print(f"error: {e.code}", file=sys.stderr)
            return USAGE_EXIT
        raise
    return result if isinstance(result, int) else 0
