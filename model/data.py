"""Stage-two training data: grounding shards -> padded batches of (image, prompt, answer).

CogVLM's second pretraining stage trains referring expression comprehension (REC) as VQA,
``Question: Where is the {phrase}? Answer: [[x0,y0,x1,y1]]``, mixed with image captioning. Each
sample is laid out as ``BOS + prompt + target + EOS`` with ``(prompt, target) =
grounding.boxes.prompt_and_target(question, answer)`` from the shard's ``qa`` list; the labels are
``-100`` on BOS and the prompt, so only the answer (and EOS) is supervised. The prompt and target
are tokenized separately, exactly as generation sees them (prompt in, target out).

Boxes in a shard are integers 0..999 in the frame of the stored image (``width`` x ``height``);
they are relative coordinates, so resizing the image to the vision tower's square input (no crop,
no padding) keeps them valid. That is why the model's image transform (grounding.image.ImageTransform) resizes and never crops.

:class:`GroundingBatches` is an ``IterableDataset`` that yields whole collated batches. Its rows
are split over ``(rank, loader worker)`` slots without overlap: by shard when there are at least as
many non-empty shards as slots (a shard may hold no rows), else by row group, else by row; fewer rows
than slots is an error at once. Every batch carries the slot's cursor
(``epoch``, row index, sample offset) so a trainer can save the exact data position and resume
from it (:meth:`GroundingBatches.resume`). A row whose image does not decode, or that has no QA
pair of the wanted task, is skipped and counted (``batch["skipped"]``, rows by reason; REC pairs whose
answer does not parse are left out and counted as ``bad_answer: …``). Samples longer than
``max_length`` are kept, cut, and counted apart (``batch["truncated"]``, samples in the batch); REC
samples among them lost the end of their box answer and its EOS, and are counted again as
``batch["answer_cut"]`` (the trainer logs and warns: raise ``max_length``); a sample cut before its
first answer token teaches nothing and is skipped as ``too_long``.

Bad data never loops silently: every shard is checked when opened (:func:`grounding.schema.check_shards`:
a rejects shard, missing columns, a truncated or non-Parquet file stop at once with the file's name,
or are left out and listed in :attr:`GroundingBatches.bad_shards` with ``skip_bad_shards``), and a
pass over the data that yields no usable sample, or more skipped rows than ``max_skip_fraction``,
raises :class:`DataError` with the skip counts and what each reason means.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from grounding.boxes import prompt_and_target, try_parse_boxes
from grounding.cli import UsageError
from grounding.image import try_decode_image
from grounding.reasons import meaning
from grounding.schema import ShardError, check_shards

IGNORE_INDEX = -100
READ_COLUMNS = ["key", "image", "width", "height", "qa"]


# --- shards ----------------------------------------------------------------------------------

def resolve_shards(patterns: Sequence[str] | str) -> list[str]:
    """Paths, globs or folders (any fsspec URL) -> sorted, de-duplicated ``.parquet`` paths."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for pat in patterns:
        fs, p = fsspec.core.url_to_fs(pat)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if fs.isdir(p):
            found = fs.glob(p.rstrip("/") + "/*.parquet")
        elif any(c in p for c in "*?["):
            found = fs.glob(p)
        else:
            found = [p] if fs.exists(p) else []
        if not found:
            raise FileNotFoundError(f"no parquet shards match {pat!r}")
        out.extend(prefix + f for f in found if not f.rsplit("/", 1)[-1].startswith("."))
    return sorted(set(out))


def row_group_sizes(path: str) -> list[int]:
    """Rows per row group of one Parquet file (footer only; no data read)."""
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


class DataError(UsageError):
    """The shards yield (almost) no usable sample: the message gives the skip counts and their meaning."""


def check_slots(rows: int, world_size: int, num_workers: int) -> None:
    """Every (rank, loader worker) slot needs a row of its own: fewer rows than slots is a :class:`DataError`."""
    slots = world_size * max(num_workers, 1)
    if rows < slots:
        raise DataError(f"the shards hold {rows} rows, fewer than the {slots} loader slots ({world_size} ranks x "
                        f"{max(num_workers, 1)} workers) that each need one: use fewer --num-workers or ranks, "
                        "or more data")


def describe_skips(skipped: Counter) -> str:
    """``"64 corrupt_image: UnidentifiedImageError (the image bytes do not decode), ..."``: each reason's
    meaning from the one table of reasons (grounding.reasons)."""
    parts = []
    for reason, n in skipped.most_common():
        text = meaning(reason)
        parts.append(f"{n} {reason}" + (f" ({text})" if text else ""))
    return ", ".join(parts) or "none"


def read_row_group(path: str, index: int, columns: Sequence[str] = READ_COLUMNS) -> list[dict]:
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        return pq.ParquetFile(f).read_row_group(index, columns=list(columns)).to_pylist()


# --- images ----------------------------------------------------------------------------------

def encode_qa(tokenizer, question: str, answer: str, max_length: int) -> tuple[list[int], list[int], bool]:
    """``BOS + prompt + target + EOS`` ids and labels (``-100`` on BOS and prompt); truncated flag."""
    prompt, target = prompt_and_target(question, answer)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = [tokenizer.bos_token_id] + p + t
    labels = [IGNORE_INDEX] * (1 + len(p)) + t
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def encode_prompt(tokenizer, question: str) -> list[int]:
    """``BOS + prompt`` ids for generation (the same prompt text training saw)."""
    prompt, _ = prompt_and_target(question, "")
    return [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def pack_samples(samples: Sequence[dict], max_length: int) -> dict:
    """Several QA samples of one image as one sequence ``BOS p1 t1 EOS p2 t2 EOS ...`` (BOS kept once).

    Each target and its EOS stay supervised, every prompt masked; pairs that would pass
    ``max_length`` are left out whole (the first is always kept).
    """
    ids, labels, tasks = list(samples[0]["input_ids"]), list(samples[0]["labels"]), [samples[0]["task"]]
    for s in samples[1:]:
        if len(ids) + len(s["input_ids"]) - 1 > max_length:
            break
        ids += s["input_ids"][1:]
        labels += s["labels"][1:]
        tasks.append(s["task"])
    return {**samples[0], "input_ids": ids, "labels": labels, "task": "+".join(tasks)}


def collate(samples: Sequence[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest sample: ``input_ids``/``attention_mask``/``labels`` (B, T), images (B, 3, S, S)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n] = torch.tensor(s["input_ids"])
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(s["labels"])
    return {
        "input_ids": input_ids,                                     # (B, T)
        "attention_mask": attention_mask,                           # (B, T)
        "labels": labels,                                           # (B, T)
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),  # (B, 3, S, S)
        "tasks": [s["task"] for s in samples],
        "keys": [s["key"] for s in samples],
    }


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompt ids for batched generation: ``(input_ids, attention_mask)``, both (B, T)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(list(p))
        mask[i, T - len(p):] = 1
    return ids, mask


# --- the dataset -----------------------------------------------------------------------------

@dataclass
class DataConfig:
    """Which shards, which QA pairs, how many per image, batch size and text length."""
    shards: list[str] = field(default_factory=list)
    batch_size: int = 8                 # per rank, per micro-step
    caption_weight: float = 0.0         # caption:REC mixture, as relative weights
    rec_weight: float = 1.0
    qa_per_image: int = 1               # QA pairs drawn from one image (each its own sample ...)
    pack_qa: bool = False               # ... or all in one sequence: BOS p1 t1 EOS p2 t2 EOS ... (one image pass)
    max_length: int = 64                # tokens of BOS + prompt + target + EOS, truncated beyond
    shuffle: bool = True
    seed: int = 0
    repeat: bool = True                 # loop over epochs forever (training); False: one pass
    skip_bad_shards: bool = False       # leave out unreadable / wrong-schema files (listed) instead of stopping
    max_skip_fraction: float = 0.5      # stop when more of the rows read than this give no sample ...
    skip_check_rows: int = 256          # ... checked from this many rows on, and at the end of every pass

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.caption_weight < 0 or self.rec_weight < 0 or self.caption_weight + self.rec_weight <= 0:
            raise ValueError("caption_weight and rec_weight must be >= 0 with a positive sum")
        if self.qa_per_image < 1:
            raise ValueError(f"qa_per_image must be >= 1, got {self.qa_per_image}")
        if self.max_length < 4:
            raise ValueError(f"max_length must be >= 4, got {self.max_length}")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.skip_check_rows < 1:
            raise ValueError(f"skip_check_rows must be >= 1, got {self.skip_check_rows}")


@dataclass(frozen=True)
class RowRef:
    shard: int
    group: int
    row: int


class GroundingBatches(IterableDataset):
    """Collated training batches streamed from grounding shards; see the module docstring.

    ``rank``/``world_size`` split rows between processes, loader workers split a rank's rows
    further. Use with ``DataLoader(ds, batch_size=None, num_workers=W)``.
    """

    def __init__(self, config: DataConfig, tokenizer, preprocess: Callable[[Image.Image], torch.Tensor],
                 rank: int = 0, world_size: int = 1, num_workers: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.config = config
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.rank, self.world_size, self.num_workers = rank, world_size, max(num_workers, 0)
        footers, self.bad_shards = check_shards(resolve_shards(config.shards), columns=READ_COLUMNS,
                                                skip_bad=config.skip_bad_shards)
        self.paths = list(footers)
        self.group_sizes = [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in footers.values()]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.cursors: dict[int, tuple[int, int, int]] = {}   # logical worker -> (epoch, row, offset)
        self.worker_offset = 0                                # which logical worker physical worker 0 plays
        if sum(map(sum, self.group_sizes)) == 0:
            raise DataError(f"shards {self.paths} hold no rows: check --shards")
        check_slots(sum(map(sum, self.group_sizes)), world_size, self.num_workers)

    # -- splitting --
    @property
    def num_slots(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    def slot_of(self, worker: int) -> int:
        return self.rank * max(self.num_workers, 1) + worker

    def slot_rows(self, slot: int) -> list[list[RowRef]]:
        """The slot's rows, grouped by row group: non-empty shards, else row groups, else rows are dealt out
        (a shard with no rows, which the pipeline writes when it keeps none, is left out first)."""
        n = self.num_slots
        groups = [(s, g, size) for s, sizes in enumerate(self.group_sizes) for g, size in enumerate(sizes) if size]
        shards = sorted({s for s, _, _ in groups})
        if len(shards) >= n:
            mine = {s for i, s in enumerate(shards) if i % n == slot}
            return [[RowRef(s, g, r) for r in range(size)] for s, g, size in groups if s in mine]
        if len(groups) >= n:
            return [[RowRef(s, g, r) for r in range(size)] for i, (s, g, size) in enumerate(groups) if i % n == slot]
        out, k = [], 0
        for s, g, size in groups:
            rows = []
            for r in range(size):
                if k % n == slot:
                    rows.append(RowRef(s, g, r))
                k += 1
            if rows:
                out.append(rows)
        return out

    def epoch_order(self, slot: int, epoch: int) -> list[RowRef]:
        """The slot's rows in this epoch's order: row groups shuffled, rows shuffled within each."""
        groups = self.slot_rows(slot)
        if not self.config.shuffle:
            return [r for g in groups for r in g]
        rng = np.random.default_rng([self.config.seed, epoch, slot])
        order = []
        for gi in rng.permutation(len(groups)):
            g = groups[gi]
            order.extend(g[i] for i in rng.permutation(len(g)))
        return order

    # -- samples --
    def row_samples(self, row: dict, ref: RowRef, epoch: int, skipped: Counter) -> list[dict]:
        """The samples of one row (``qa_per_image`` QA pairs, drawn by the mixture), or [] and a count."""
        cfg = self.config
        rng = random.Random(f"{cfg.seed}-{epoch}-{ref.shard}-{ref.group}-{ref.row}")
        qa = [q for q in row.get("qa") or [] if isinstance(q.get("question"), str) and isinstance(q.get("answer"), str)]
        rec = []
        for q in qa:
            if q["task"] == "rec":
                boxes, reason = try_parse_boxes(q["answer"])
                if boxes is None:
                    skipped[f"bad_answer: {reason}"] += 1
                else:
                    rec.append(q)
        by_task = {"caption": [q for q in qa if q["task"] == "caption"], "rec": rec}
        weights = {"caption": cfg.caption_weight if by_task["caption"] else 0.0,
                   "rec": cfg.rec_weight if by_task["rec"] else 0.0}
        if weights["caption"] + weights["rec"] <= 0:
            skipped["no_qa_for_mixture"] += 1
            return []
        picks = []
        pools = {t: list(qs) for t, qs in by_task.items()}
        for _ in range(cfg.qa_per_image):
            live = {t: w for t, w in weights.items() if w > 0 and pools[t]}
            if not live:
                break
            task = rng.choices(list(live), weights=list(live.values()))[0]
            picks.append((task, pools[task].pop(rng.randrange(len(pools[task])))))
        image, reason = try_decode_image(row["image"])
        if image is None:
            skipped[reason] += 1
            return []
        try:
            pixels = self.preprocess(image)
        except Exception as e:
            skipped[f"preprocess_failed: {type(e).__name__}"] += 1
            return []
        samples = []
        for task, q in picks:
            ids, labels, truncated = encode_qa(self.tokenizer, q["question"], q["answer"], cfg.max_length)
            if truncated and all(x == IGNORE_INDEX for x in labels):
                continue                                      # cut before the answer: nothing to learn
            samples.append({"input_ids": ids, "labels": labels, "pixel_values": pixels, "task": task, "key": row["key"],
                            "truncated": truncated, "answer_cut": truncated and task == "rec"})
        if not samples:
            skipped["too_long"] += 1
            return []
        if cfg.pack_qa and len(samples) > 1:
            samples = [pack_samples(samples, cfg.max_length)]
        return samples

    def read_group(self, shard: int, group: int) -> list[dict | None]:
        """The rows of one row group; a group that does not read stops the run naming the file, or, with
        ``skip_bad_shards``, gives ``None`` rows (skipped and counted as ``unreadable_row_group``)."""
        path = self.paths[shard]
        try:
            return read_row_group(path, group)
        except (OSError, pa.ArrowException) as e:
            if self.config.skip_bad_shards:
                return [None] * self.group_sizes[shard][group]
            raise ShardError(f"{path}: row group {group} does not read ({str(e).splitlines()[0]}); "
                             "remove the file from --shards or pass --skip-bad-shards true") from e

    def resume(self, state: dict) -> None:
        """Continue from a trainer's saved ``data_state`` (:meth:`state_after`)."""
        if state.get("num_slots") != self.num_slots or state.get("paths") != self.paths:
            raise ValueError("data state was saved with other shards or another rank/worker layout "
                             f"({state.get('num_slots')} slots, this run has {self.num_slots}); exact resume needs the same")
        self.cursors = {int(k): tuple(v) for k, v in state["cursors"].items()}
        self.worker_offset = int(state["batches"]) % max(self.num_workers, 1)

    def state_after(self, cursors: dict[int, tuple[int, int, int]], batches: int) -> dict:
        """The data position a trainer saves: per-worker cursors and batches consumed."""
        return {"num_slots": self.num_slots, "paths": self.paths, "batches": batches,
                "cursors": {str(k): list(v) for k, v in cursors.items()}}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != max(self.num_workers, 1):
            raise ValueError(f"dataset built for {self.num_workers} workers but the loader has {workers}")
        worker = (physical + self.worker_offset) % workers
        slot = self.slot_of(worker)
        epoch, pos, offset = self.cursors.get(worker, (0, 0, 0))
        cache: dict[tuple[int, int], list[dict]] = {}
        pending: list[dict] = []
        skipped: Counter = Counter()
        truncated = answer_cut = 0                            # kept samples cut at max_length (not skipped); REC ones
        guard = SkipGuard(self.config, slot, self.num_slots)
        while True:
            order = self.epoch_order(slot, epoch)
            guard.start_pass(whole=pos == 0)
            if not order:
                raise ValueError(f"slot {slot} of {self.num_slots} got no rows: fewer rows than ranks x workers")
            while pos < len(order):
                ref = order[pos]
                if (ref.shard, ref.group) not in cache:
                    cache.clear()
                    cache[(ref.shard, ref.group)] = self.read_group(ref.shard, ref.group)
                row = cache[(ref.shard, ref.group)][ref.row]
                row_skips: Counter = Counter()
                if row is None:
                    row_skips["unreadable_row_group"] += 1
                    samples = []
                else:
                    samples = self.row_samples(row, ref, epoch, row_skips)
                skipped.update(row_skips)
                guard.count(bool(samples), row_skips, len(order))
                samples = samples[offset:]
                for k, s in enumerate(samples):
                    pending.append(s)
                    truncated += bool(s.get("truncated"))
                    answer_cut += bool(s.get("answer_cut"))
                    if len(pending) == self.config.batch_size:
                        nxt = (epoch, pos, offset + k + 1) if k + 1 < len(samples) else (epoch, pos + 1, 0)
                        batch = collate(pending, self.pad_id)
                        batch["worker"], batch["cursor"] = worker, nxt
                        batch["skipped"], batch["truncated"], batch["answer_cut"] = dict(skipped), truncated, answer_cut
                        yield batch
                        pending, skipped, truncated, answer_cut = [], Counter(), 0, 0
                pos, offset = pos + 1, 0
            guard.end_pass(len(order))
            epoch, pos = epoch + 1, 0
            if not self.config.repeat:
                if pending:
                    batch = collate(pending, self.pad_id)
                    batch["worker"], batch["cursor"], batch["skipped"] = worker, (epoch, 0, 0), dict(skipped)
                    batch["truncated"], batch["answer_cut"] = truncated, answer_cut
                    yield batch
                return


class SkipGuard:
    """Counts the rows of one loader slot that gave no sample and stops a run that would spin on them:
    a whole pass without a usable row, or more than ``max_skip_fraction`` of the rows read (checked
    from ``skip_check_rows`` rows on, or from a pass's worth of rows when a pass is shorter)."""

    def __init__(self, config: DataConfig, slot: int, num_slots: int):
        self.config, self.where = config, f"loader slot {slot} of {num_slots}" if num_slots > 1 else "the loader"
        self.seen = self.unusable = self.pass_usable = 0
        self.whole = False
        self.reasons: Counter = Counter()
        self.shards = ", ".join(config.shards[:3]) + (" ..." if len(config.shards) > 3 else "")

    def start_pass(self, whole: bool) -> None:
        """A pass begins: ``whole`` unless it resumes in the middle of one."""
        self.whole, self.pass_usable = whole, 0

    def count(self, usable: bool, row_skips: Counter, pass_rows: int) -> None:
        """One row read: ``usable`` when it gave a sample; ``row_skips`` its skip reasons."""
        self.seen += 1
        self.unusable += not usable
        self.pass_usable += usable
        self.reasons.update(row_skips)
        checked = self.seen >= min(self.config.skip_check_rows, pass_rows)
        if checked and self.unusable > self.config.max_skip_fraction * self.seen:
            raise DataError(f"{self.shards}: {self.unusable} of the first {self.seen} rows gave no usable sample, more "
                            f"than --max-skip-fraction {self.config.max_skip_fraction:g} ({self.where}); "
                            f"skipped: {describe_skips(self.reasons)}")

    def end_pass(self, pass_rows: int) -> None:
        if self.whole and not self.pass_usable:
            raise DataError(f"{self.shards}: a whole pass over {pass_rows} rows gave no usable sample ({self.where}); "
                            f"skipped: {describe_skips(self.reasons)}")


def make_loader(dataset: GroundingBatches, seed: int = 0) -> torch.utils.data.DataLoader:
    """A loader over whole batches with its own generator, so creating it never draws from the global RNG."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=dataset.num_workers,
                                       generator=g, persistent_workers=False,
                                       prefetch_factor=2 if dataset.num_workers else None)
