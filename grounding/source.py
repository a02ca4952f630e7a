"""LAION-style Parquet sources: column mapping, deterministic sampling, work shards, pre-filters.

Pure library code (no Ray): the pipeline's driver calls it before any download.

- :class:`SourceConfig` names the input files (paths or globs, local or any fsspec URL) and their
  columns, LAION's by default (``URL``, ``TEXT``, ``WIDTH``, ``HEIGHT``, ``punsafe``,
  ``pwatermark``, ``similarity``; lower-case variants are found too).
- :func:`source_rows` reads a file's row count from its footer; :func:`read_source` reads a row range
  of one file into the normalised columns of :data:`SOURCE_SCHEMA`; :func:`sample_rows` keeps a
  deterministic fraction.
- :func:`prefilter` applies :class:`FilterConfig`: empty/short captions, aspect ratio outside
  [1/6, 6] when sizes are known (CogVLM's rule), ``punsafe`` / ``pwatermark`` above thresholds,
  low CLIP similarity, unsafe URLs (:func:`check_url`) and duplicate URLs (found run-wide by the
  pipeline's dedup pre-pass, passed in as row numbers). Every rejected row
  becomes a :data:`grounding.schema.REJECTS_SCHEMA` dict with ``stage="prefilter"`` and a reason.

The URL guard accepts http(s) only, and rejects hosts that are, or resolve to, loopback, private,
link-local (cloud metadata 169.254.169.254), multicast, reserved or otherwise non-global addresses
unless ``allow_private_hosts`` or the host is in ``allow_hosts``. It checks the addresses the name
resolves to at filter time (:func:`check_urls`: distinct hosts resolved concurrently, each look-up
within its own timeout; :class:`HostResolver` caches definite answers per process and retries transient
failures). A name the DNS says does not exist is ``unresolved_host`` (filtered); a look-up that timed out
or kept failing is ``dns_timeout`` / ``dns_error`` (failed: nothing was shown about the host, and the row
is not fetched unchecked). The downloader resolves again later (a DNS-rebinding window remains).
"""
from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Collection, Iterable, Sequence
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grounding.cli import UsageError

STAGE_PREFILTER = "prefilter"

SOURCE_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("width", pa.int64()),        # as declared by the source (may be null)
    pa.field("height", pa.int64()),
    pa.field("punsafe", pa.float64()),
    pa.field("pwatermark", pa.float64()),
    pa.field("similarity", pa.float64()),
    pa.field("source_row", pa.int64(), nullable=False),  # row index in the source file
])


@dataclass
class SourceConfig:
    """Where the LAION-style rows come from and what their columns are called."""
    paths: list[str] = field(default_factory=list)   # files or globs; local or fsspec URLs
    url_col: str = "URL"
    text_col: str = "TEXT"
    width_col: str = "WIDTH"
    height_col: str = "HEIGHT"
    punsafe_col: str = "punsafe"
    pwatermark_col: str = "pwatermark"
    similarity_col: str = "similarity"
    key_col: str = "key"                 # generated as <stem>-<row> when the file has none
    limit: int | None = None             # at most this many source rows in all (the first in file order, before sampling)
    sample_fraction: float = 1.0         # deterministic: a hash of (seed, key) decides
    sample_seed: int = 0
    shard_rows: int = 10_000             # rows per work shard (the unit of resume)

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if not (0.0 < self.sample_fraction <= 1.0):
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}")


@dataclass
class FilterConfig:
    """Pre-download filters; every rejected row is counted under its reason."""
    min_caption_chars: int = 5
    min_caption_words: int = 2
    min_aspect: float = 1 / 6            # width / height, CogVLM's rule
    max_aspect: float = 6.0
    max_punsafe: float | None = 0.5
    max_pwatermark: float | None = 0.8
    min_similarity: float | None = None
    dedupe_urls: bool = True             # across the whole run, first occurrence kept
    allow_private_hosts: bool = False    # let loopback/private/link-local hosts through
    allow_hosts: list[str] = field(default_factory=list)  # exact host names / IPs let through

    def __post_init__(self):
        if not (0 < self.min_aspect <= 1 <= self.max_aspect):
            raise ValueError(f"need 0 < min_aspect <= 1 <= max_aspect, got {self.min_aspect}, {self.max_aspect}")
        for name in ("max_punsafe", "max_pwatermark"):
            v = getattr(self, name)
            if v is not None and not (0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be in [0, 1] or None, got {v}")
        if self.min_caption_chars < 0 or self.min_caption_words < 0:
            raise ValueError("min_caption_chars and min_caption_words must be >= 0")
        self.allow_hosts = [h.lower().strip("[]") for h in self.allow_hosts]


# --- files -------------------------------------------------------------------------------------

def list_sources(paths: Sequence[str]) -> list[str]:
    """Expand globs; return the files as URLs/paths in a stable (sorted, deduplicated) order."""
    out: list[str] = []
    for path in paths:
        fs, p = fsspec.core.url_to_fs(path)
        matches = sorted(fs.glob(p)) if any(c in p for c in "*?[") else [p]
        if not matches:
            raise FileNotFoundError(f"no source file matches {path!r}")
        for m in matches:
            if not fs.exists(m):
                raise FileNotFoundError(f"source file {path!r} does not exist")
            url = fs.unstrip_protocol(m) if "://" in path else m
            if url not in out:
                out.append(url)
    return out


def source_stem(path: str) -> str:
    """``s3://bucket/laion/part-00007.parquet`` -> ``part-00007``: the prefix of its shard names."""
    name = os.path.basename(path.rstrip("/"))
    for ext in (".parquet", ".pq"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name


def resolve_column(names: Sequence[str], wanted: str) -> str | None:
    """The file's column for ``wanted``: exact name first, then a case-insensitive match."""
    if wanted in names:
        return wanted
    lower = {n.lower(): n for n in names}
    return lower.get(wanted.lower())


def source_rows(path: str) -> int:
    """A file's row count, from its Parquet footer (nothing else is read)."""
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def read_source(path: str, config: SourceConfig, start: int = 0, stop: int | None = None) -> pa.Table:
    """Rows ``[start, stop)`` of one LAION-style file -> :data:`SOURCE_SCHEMA` (missing optional columns null).

    Only the row groups that overlap the range are read; ``source_row`` is the row's index in the file.
    """
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        wanted = {"url": config.url_col, "caption": config.text_col, "width": config.width_col,
                  "height": config.height_col, "punsafe": config.punsafe_col,
                  "pwatermark": config.pwatermark_col, "similarity": config.similarity_col, "key": config.key_col}
        found = {k: resolve_column(names, v) for k, v in wanted.items()}
        for k in ("url", "caption"):
            if found[k] is None:
                raise UsageError(f"{path}: no {wanted[k]!r} column (has {names}); set --source-{k if k == 'url' else 'text'}-col")
        meta = pf.metadata
        stop = meta.num_rows if stop is None else min(stop, meta.num_rows)
        groups, first, offset = [], None, 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if offset < stop and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        columns = sorted({c for c in found.values() if c is not None})
        raw = pf.read_row_groups(groups, columns=columns) if groups else pf.schema_arrow.empty_table().select(columns)
    raw = raw.slice(start - (first or 0), max(0, stop - start))
    n = raw.num_rows
    cols = {}
    for name in SOURCE_SCHEMA.names:
        typ = SOURCE_SCHEMA.field(name).type
        if name == "source_row":
            cols[name] = pa.array(range(start, start + n), pa.int64())
        elif name == "key":
            if found["key"] is not None:
                cols[name] = pc.cast(raw[found["key"]], pa.string())
            else:
                stem = source_stem(path)
                cols[name] = pa.array([f"{stem}-{i:09d}" for i in range(start, start + n)], pa.string())
        elif found.get(name) is not None:
            cols[name] = pc.cast(raw[found[name]], typ, safe=False)
        else:
            cols[name] = pa.nulls(n, typ)
    return pa.table(cols, schema=SOURCE_SCHEMA)


def sample_rows(table: pa.Table, fraction: float, seed: int = 0) -> pa.Table:
    """Keep a deterministic ``fraction`` of rows: ``hash(seed, key) < fraction`` (order-independent)."""
    if fraction >= 1.0:
        return table
    limit = int(fraction * 2**64)
    keep = [int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "big") < limit
            for k in table["key"].to_pylist()]
    return table.filter(pa.array(keep, pa.bool_()))


# --- the URL guard -------------------------------------------------------------------------------

def unsafe_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for loopback, private, link-local, multicast, reserved, unspecified or non-global addresses."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return unsafe_address(ip.ipv4_mapped)
    return (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global)


class DNSFailure(Exception):
    """A look-up that gave no definite answer: ``reason`` is ``dns_timeout`` or ``dns_error`` (both *failed*
    rows, never cached: the host was not shown not to resolve, so the next shard asks again)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# "no such name" / "no address for the name": the DNS answered, definitely
_DEFINITE = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY") if hasattr(socket, n)}


class HostResolver:
    """Host name -> its addresses, for the URL guard; one per process (:data:`RESOLVER`).

    Only definite answers are cached: the addresses, or ``()`` when the DNS says the name does not
    exist (``EAI_NONAME`` / ``EAI_NODATA``, NXDOMAIN). A transient failure (``EAI_AGAIN`` "temporary
    failure in name resolution", ``EAI_FAIL``, a socket error) is retried ``retries`` times after
    ``backoff``, 2 x ``backoff``, ... seconds and, if it persists, raises :class:`DNSFailure`
    (``dns_error``) without touching the cache. ``getaddrinfo`` is ``socket.getaddrinfo`` (looked up at
    call time) unless given.
    """

    def __init__(self, getaddrinfo=None, retries: int = 2, backoff: float = 0.2, max_entries: int = 65536):
        self.getaddrinfo, self.retries, self.backoff, self.max_entries = getaddrinfo, retries, backoff, max_entries
        self.cache: dict[str, tuple[str, ...]] = {}
        self.lock = threading.Lock()

    def __call__(self, host: str) -> tuple[str, ...]:
        with self.lock:
            if host in self.cache:
                return self.cache[host]
        getaddrinfo = self.getaddrinfo or socket.getaddrinfo
        for attempt in range(self.retries + 1):
            try:
                infos = getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
                addresses = tuple(sorted({info[4][0].split("%")[0] for info in infos}))
                break
            except UnicodeError:         # not encodable as a host name: it cannot resolve
                addresses = ()
                break
            except socket.gaierror as e:
                if e.errno in _DEFINITE:
                    addresses = ()
                    break
                error = e
            except OSError as e:
                error = e
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        else:
            raise DNSFailure("dns_error", f"{host}: {error} ({self.retries + 1} tries)")
        with self.lock:
            if len(self.cache) >= self.max_entries:
                self.cache.pop(next(iter(self.cache)))   # the oldest entry
            self.cache[host] = addresses
        return addresses


RESOLVER = HostResolver()


def resolve_host(host: str) -> tuple[str, ...]:
    """The addresses ``host`` resolves to (``()`` when it does not exist); raises :class:`DNSFailure`."""
    return RESOLVER(host)


def resolve_hosts(hosts: Iterable[str], threads: int = 32, timeout: float | None = None,
                  resolve=None) -> dict[str, tuple[str, ...] | DNSFailure]:
    """Resolve distinct host names concurrently: host -> addresses, or the :class:`DNSFailure` it met.

    At most ``threads`` look-ups run at once and **each** has ``timeout`` seconds from its own start
    (a budget per host, not one per call: a shard of thousands of hosts needs no more time per host
    than a shard of ten). A look-up past its timeout is given up (``dns_timeout``; the blocking
    ``getaddrinfo`` thread is left to finish on its own). Should every thread hang, the call still ends
    after ``timeout`` x (rounds of ``threads`` + 1) seconds, the hosts not answered by then ``dns_timeout``.
    """
    resolve = resolve or resolve_host
    hosts = sorted(set(hosts))
    if not hosts:
        return {}
    workers = max(1, min(threads, len(hosts)))
    started: dict[str, float] = {}

    def run(host: str) -> tuple[str, ...]:
        started[host] = time.monotonic()
        return resolve(host)

    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {h: pool.submit(run, h) for h in hosts}
    late: dict[str, str] = {}
    try:
        if timeout is None:
            wait(futures.values())
        else:
            budget = timeout * (math.ceil(len(hosts) / workers) + 1)
            cap = time.monotonic() + budget
            while True:
                now = time.monotonic()
                live = [h for h, f in futures.items() if not f.done() and h not in late]
                for h in live:
                    if h in started and now - started[h] >= timeout:
                        late[h] = f"{h}: DNS look-up not answered within {timeout:g} s"
                    elif now >= cap:
                        late[h] = f"{h}: DNS look-up not answered within the call's budget ({budget:g} s, all threads busy)"
                live = [h for h in live if h not in late]
                if not live:
                    break
                # the next deadline of a running look-up; one not started yet has at least `timeout` to go
                wake = min([started[h] + timeout if h in started else now + timeout for h in live] + [cap])
                wait([futures[h] for h in live], timeout=max(0.01, wake - now))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    out: dict[str, tuple[str, ...] | DNSFailure] = {}
    for h, f in futures.items():
        if h in late:
            out[h] = DNSFailure("dns_timeout", late[h])
        elif f.exception() is not None:
            e = f.exception()
            out[h] = e if isinstance(e, DNSFailure) else DNSFailure("dns_error", f"{h}: {e!r}")
        else:
            out[h] = f.result()
    return out


def check_url(url: str | None, allow_private_hosts: bool = False, allow_hosts: Iterable[str] = (),
              resolve=None) -> tuple[str | None, str | None]:
    """``(None, None)`` when ``url`` may be fetched, else ``(reason, detail)``.

    Reasons: ``bad_url`` (unparsable or empty), ``unsafe_scheme`` (not http/https), ``private_host``
    (the host is, or resolves to, a non-global address), ``unresolved_host`` (the DNS says the name
    has no address), ``dns_timeout`` / ``dns_error`` (no definite answer: failed, not filtered).
    ``resolve`` maps a host name to its addresses (:func:`resolve_host` unless given).
    """
    if not url or not isinstance(url, str):
        return "bad_url", "empty URL"
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        parts.port  # raises on a malformed port
    except ValueError as e:
        return "bad_url", str(e)
    if parts.scheme.lower() not in ("http", "https"):
        return "unsafe_scheme", f"scheme {parts.scheme!r}"
    if not host:
        return "bad_url", "no host"
    host = host.lower()
    if allow_private_hosts or host in {h.lower().strip("[]") for h in allow_hosts}:
        return None, None
    try:
        literal = ipaddress.ip_address(host)
        addresses: tuple[str, ...] = (str(literal),)
    except ValueError:
        try:
            addresses = (resolve or resolve_host)(host)
        except DNSFailure as e:
            return e.reason, e.detail
        if not addresses:
            return "unresolved_host", f"{host} does not resolve"
    bad = [a for a in addresses if unsafe_address(ipaddress.ip_address(a))]
    if bad:
        return "private_host", f"{host} -> {', '.join(bad)}"
    return None, None


def _host(url) -> str | None:
    try:
        h = urlsplit(url.strip()).hostname if isinstance(url, str) else None
    except ValueError:
        return None
    return h.lower() if h else None


def check_urls(urls: Sequence[str | None], allow_private_hosts: bool = False, allow_hosts: Iterable[str] = (),
               threads: int = 32, timeout: float | None = None, resolve=None) -> list[tuple[str | None, str | None]]:
    """:func:`check_url` over many URLs, the distinct host names resolved concurrently first
    (:func:`resolve_hosts`: ``threads`` at once, ``timeout`` seconds per look-up)."""
    allow_hosts = tuple(allow_hosts)
    answers: dict[str, tuple[str, ...] | DNSFailure] = {}
    if not allow_private_hosts:
        allowed = {h.lower().strip("[]") for h in allow_hosts}
        hosts = {h for h in map(_host, urls) if h and h not in allowed and not _is_ip_literal(h)}
        answers = resolve_hosts(hosts, threads, timeout, resolve)

    def answer(host: str) -> tuple[str, ...]:
        a = answers[host]
        if isinstance(a, DNSFailure):
            raise a
        return a

    return [check_url(u, allow_private_hosts, allow_hosts, answer) for u in urls]


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


# --- pre-filters ---------------------------------------------------------------------------------

def _reject(row: dict, shard: str, reason: str, error: str | None) -> dict:
    return {"key": row["key"], "url": row["url"], "caption": row["caption"], "source_shard": shard,
            "source_row": row["source_row"], "stage": STAGE_PREFILTER, "reason": reason, "error": error}


def check_row(row: dict, config: FilterConfig) -> tuple[str | None, str | None]:
    """The first pre-filter (other than URL checks) that ``row`` fails: ``(reason, detail)``."""
    caption = (row.get("caption") or "").strip()
    if not caption:
        return "empty_caption", None
    if len(caption) < config.min_caption_chars or len(caption.split()) < config.min_caption_words:
        return "short_caption", f"{len(caption)} chars, {len(caption.split())} words"
    w, h = row.get("width"), row.get("height")
    if w is not None and h is not None and w > 0 and h > 0:
        aspect = w / h
        if not (config.min_aspect <= aspect <= config.max_aspect):
            return "aspect_ratio", f"{w}x{h} (aspect {aspect:.3f})"
    for name, limit in (("punsafe", config.max_punsafe), ("pwatermark", config.max_pwatermark)):
        v = row.get(name)
        if limit is not None and v is not None and not math.isnan(v) and v > limit:
            return name, f"{name}={v:.3f} > {limit}"
    s = row.get("similarity")
    if config.min_similarity is not None and s is not None and not math.isnan(s) and s < config.min_similarity:
        return "low_similarity", f"similarity={s:.3f} < {config.min_similarity}"
    return None, None


def prefilter(table: pa.Table, shard: str, config: FilterConfig, duplicates: Collection[int] = (),
              dns_threads: int = 32, dns_timeout: float | None = None) -> tuple[pa.Table, list[dict]]:
    """Split a work shard into the rows to download and the rejected rows (``REJECTS_SCHEMA`` dicts).

    ``duplicates`` are the ``source_row`` numbers whose URL occurs earlier in the run (the dedup
    pre-pass decides, run-wide); they are rejected as ``duplicate_url`` unless an earlier check
    rejects them first (the same order as :func:`dedup_candidates` uses).
    """
    rows = table.to_pylist()
    url_checks = check_urls([r["url"] for r in rows], config.allow_private_hosts, config.allow_hosts,
                            threads=dns_threads, timeout=dns_timeout)
    duplicates = set(duplicates) if config.dedupe_urls else set()
    keep, rejects = [], []
    for i, (row, (url_reason, url_detail)) in enumerate(zip(rows, url_checks)):
        reason, detail = check_row(row, config)
        if reason is None and url_reason is not None:
            reason, detail = url_reason, url_detail
        if reason is None and row["source_row"] in duplicates:
            reason, detail = "duplicate_url", None
        if reason is None:
            keep.append(i)
        else:
            rejects.append(_reject(row, shard, reason, detail))
    return table.take(pa.array(keep, pa.int64())), rejects


def dedup_candidates(table: pa.Table, config: FilterConfig) -> pa.Table:
    """The rows that take part in URL dedup: those passing :func:`check_row` with a non-empty URL.

    Returns ``source_row`` and ``url_hash`` (16 bytes of BLAKE2b over the stripped URL). The URL
    guard is left out on purpose: every row of one URL gets the same guard verdict, so it cannot
    change which occurrence comes first.
    """
    rows, hashes = [], []
    for row in table.select(["url", "caption", "width", "height", "punsafe", "pwatermark", "similarity",
                             "source_row"]).to_pylist():
        url = row["url"].strip() if isinstance(row["url"], str) else ""
        if url and check_row(row, config)[0] is None:
            rows.append(row["source_row"])
            hashes.append(hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=16).digest())
    return pa.table({"source_row": pa.array(rows, pa.int64()), "url_hash": pa.array(hashes, pa.binary(16))})
