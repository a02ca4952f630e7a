"""The measuring discipline of ``benchmarks/README.md`` as four small functions every benchmark uses.

- :func:`interleaved` times the sides of a comparison A/B, B/A, A/B, ... (order reversed every
  round, so drifting machine load favours no side) and keeps wall and process-CPU seconds per round.
- :func:`spread` gives median, min-max and quartiles of a list; :func:`paired_ratios` the ratio of
  two sides round by round (each round's sides ran back to back, under the same load).
- :func:`machine` records where and under what load a run was taken.
- :func:`write_result` stores a run in ``benchmarks/results/<name>.json`` under ``full`` or ``quick``
  and, for a quick run, whether each headline ratio lands within 25 % of the full run's.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

QUICK_TOLERANCE = 0.25  # a --quick ratio must land within 25 % of the full run's


def spread(values: list[float]) -> dict:
    """Median, min, max and quartiles (statistics' 'inclusive' method) of ``values``."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("spread of no values")
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else (v[0], v[0], v[0])
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q1, "q3": q3, "n": len(v)}


def paired_ratios(num: list[float], den: list[float]) -> dict:
    """Round-by-round ratios num[i] / den[i] (same round = same conditions), with their spread."""
    if len(num) != len(den):
        raise ValueError(f"{len(num)} vs {len(den)} rounds")
    rs = [a / b for a, b in zip(num, den)]
    return {"per_round": rs, **spread(rs)}


def interleaved(sides: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                sync: Callable[[], None] | None = None, on_round: Callable[[int, str, float], None] | None = None) -> dict:
    """Run every side once per round, in order A, B, ... on even rounds and reversed on odd ones.

    ``warmup`` untimed rounds go first. Returns ``{"wall": {side: [s, ...]}, "cpu": {side: [s, ...]},
    "order": [[side, ...] per round]}``; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after
    each timed call.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    order = []
    for r in range(rounds):
        this = names if r % 2 == 0 else names[::-1]
        order.append(list(this))
        for name in this:
            if sync:
                sync()
            t0, c0 = time.perf_counter(), time.process_time()
            sides[name]()
            if sync:
                sync()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if on_round:
                on_round(r, name, wall[name][-1])
    return {"wall": wall, "cpu": cpu, "order": order}


def machine() -> dict:
    """Host, CPU count, load average, library versions and the GPU (if torch sees one)."""
    info = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "host": platform.node(),
            "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_result(path: str | os.PathLike, result: dict, quick: bool, headline: dict[str, float]) -> dict:
    """Store ``result`` (with its ``headline`` ratios) under ``full`` or ``quick`` in ``path``.

    A quick run is compared with the stored full run: ``quick_vs_full[name] = {quick, full,
    relative_difference, within_25pct}``; a full run re-checks a stored quick run the same way.
    Returns the whole file's content.
    """
    path = Path(path)
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored = stored if isinstance(stored, dict) and ("full" in stored or "quick" in stored) else {}
    result = dict(result, headline=headline)
    stored["quick" if quick else "full"] = result
    full, q = stored.get("full"), stored.get("quick")
    if full and q:
        check = {}
        for name, value in q["headline"].items():
            ref = full["headline"].get(name)
            if ref is None or value is None:
                continue
            rel = abs(value - ref) / abs(ref)
            check[name] = {"quick": value, "full": ref, "relative_difference": round(rel, 4),
                           "within_25pct": rel <= QUICK_TOLERANCE}
        stored["quick_vs_full"] = check
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1) + "\n")
    return stored


def command(script: str, argv) -> str:
    return f"python {script} " + " ".join(argv if argv is not None else sys.argv[1:])


# A GPU's dense bf16 peak (TFLOP/s) for MFU, by a substring of torch.cuda.get_device_name(): more
# specific names first ("H100 PCIe" before "H100"). Pass --peak-tflops for anything else.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H20": 148.0,
                    "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0,
                    "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "A6000": 155.0}
