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
many shards as slots, else by row group, else by row. Every batch carries the slot's cursor
(``epoch``, row index, sample offset) so a trainer can save the exact data position and resume
from it (:meth:`GroundingBatches.resume`). A row whose image does not decode, or that has no QA
pair of the wanted task, is skipped and counted (``batch["skipped"]``), never fatal. Samples longer
than ``max_length`` are kept, cut, and counted apart (``batch["truncated"]``, samples in the batch).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from grounding.boxes import prompt_and_target
from grounding.image import ImageTransform, try_decode_image

IGNORE_INDEX = -100
READ_COLUMNS = ["key", "image", "width", "height", "qa"]
ImagePreprocessor = ImageTransform     # the old name (tests/model/test_data.py); the model ships it: model.image_transform


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
        self.paths = resolve_shards(config.shards)
        self.group_sizes = [row_group_sizes(p) for p in self.paths]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.cursors: dict[int, tuple[int, int, int]] = {}   # logical worker -> (epoch, row, offset)
        self.worker_offset = 0                                # which logical worker physical worker 0 plays
        if sum(map(sum, self.group_sizes)) == 0:
            raise ValueError(f"shards {self.paths} hold no rows")

    # -- splitting --
    @property
    def num_slots(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    def slot_of(self, worker: int) -> int:
        return self.rank * max(self.num_workers, 1) + worker

    def slot_rows(self, slot: int) -> list[list[RowRef]]:
        """The slot's rows, grouped by row group: shards, else row groups, else rows are dealt out."""
        n = self.num_slots
        groups = [(s, g, size) for s, sizes in enumerate(self.group_sizes) for g, size in enumerate(sizes)]
        if len(self.paths) >= n:
            mine = [(s, g, size) for s, g, size in groups if s % n == slot]
            return [[RowRef(s, g, r) for r in range(size)] for s, g, size in mine]
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
        qa = row.get("qa") or []
        by_task = {"caption": [q for q in qa if q["task"] == "caption"], "rec": [q for q in qa if q["task"] == "rec"]}
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
            samples.append({"input_ids": ids, "labels": labels, "pixel_values": pixels, "task": task, "key": row["key"],
                            "truncated": truncated})
        if cfg.pack_qa and len(samples) > 1:
            samples = [pack_samples(samples, cfg.max_length)]
        return samples

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
        truncated = 0                                         # kept samples cut at max_length (not skipped)
        while True:
            order = self.epoch_order(slot, epoch)
            if not order:
                raise ValueError(f"slot {slot} of {self.num_slots} got no rows: fewer rows than ranks x workers")
            while pos < len(order):
                ref = order[pos]
                if (ref.shard, ref.group) not in cache:
                    cache.clear()
                    cache[(ref.shard, ref.group)] = read_row_group(self.paths[ref.shard], ref.group)
                row = cache[(ref.shard, ref.group)][ref.row]
                samples = self.row_samples(row, ref, epoch, skipped)[offset:]
                for k, s in enumerate(samples):
                    pending.append(s)
                    truncated += bool(s.get("truncated"))
                    if len(pending) == self.config.batch_size:
                        nxt = (epoch, pos, offset + k + 1) if k + 1 < len(samples) else (epoch, pos + 1, 0)
                        batch = collate(pending, self.pad_id)
                        batch["worker"], batch["cursor"] = worker, nxt
                        batch["skipped"], batch["truncated"] = dict(skipped), truncated
                        yield batch
                        pending, skipped, truncated = [], Counter(), 0
                pos, offset = pos + 1, 0
            epoch, pos = epoch + 1, 0
            if not self.config.repeat:
                if pending:
                    batch = collate(pending, self.pad_id)
                    batch["worker"], batch["cursor"], batch["skipped"] = worker, (epoch, 0, 0), dict(skipped)
                    batch["truncated"] = truncated
                    yield batch
                return


def make_loader(dataset: GroundingBatches, seed: int = 0) -> torch.utils.data.DataLoader:
    """A loader over whole batches with its own generator, so creating it never draws from the global RNG."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=dataset.num_workers,
                                       generator=g, persistent_workers=False,
                                       prefetch_factor=2 if dataset.num_workers else None)
