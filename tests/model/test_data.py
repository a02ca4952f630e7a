"""model.data: shard streaming, rank/worker splits, the caption:REC mixture, masking, corrupt rows."""
from __future__ import annotations

import io
import itertools
import os
from collections import Counter

import pytest
import torch
from PIL import Image
from helpers_train import debug_model, debug_model_config, one_thread, make_multibox_shards, make_shards, shards8  # noqa: F401

from grounding.boxes import parse_boxes, prompt_and_target
from grounding.schema import read_shard, write_shard, row_to_dict
from model.data import (
    IGNORE_INDEX, DataConfig, DataError, GroundingBatches, collate, encode_prompt, encode_qa,
    make_loader, pad_left, resolve_shards,
)
from grounding.image import NORMALIZATION, ImageTransform


@pytest.fixture(scope="module")
def tok(debug_model):
    return debug_model.tokenizer


@pytest.fixture(scope="module")
def pre(debug_model):
    return debug_model.image_transform


def read_rows(folder) -> list[dict]:
    return [row_to_dict(r) for p in resolve_shards(folder) for r in read_shard(p)]


def one_epoch(cfg: DataConfig, tok, pre, **kw) -> list[dict]:
    cfg.repeat = False
    return list(GroundingBatches(cfg, tok, pre, **kw))


def test_rec_sample_masks_bos_and_prompt_and_supervises_answer_and_eos(tok):
    q, a = "Question: Where is the red ball?", "Answer: [[012,345,678,901]]"
    ids, labels, truncated = encode_qa(tok, q, a, max_length=64)
    prompt, target = prompt_and_target(q, a)
    n_prompt = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert not truncated and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]                       # same positions: the model shifts
    assert tok.decode(ids[n_prompt:-1]) == target == " [[012,345,678,901]]"
    assert tok.decode(ids[1:n_prompt]) == prompt
    assert parse_boxes(tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True)) == [(12, 345, 678, 901)]


def test_collate_right_pads_with_mask_and_ignored_labels(tok):
    a = {"input_ids": [1, 5, 6], "labels": [-100, -100, 6], "pixel_values": torch.zeros(3, 4, 4), "task": "rec", "key": "a"}
    b = {"input_ids": [1, 7, 8, 9, 2], "labels": [-100, -100, 8, 9, 2], "pixel_values": torch.ones(3, 4, 4), "task": "rec", "key": "b"}
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 7, 8, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 6, -100, -100], [-100, -100, 8, 9, 2]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    ids, mask = pad_left([[1, 5], [1, 7, 8]], pad_id=0)
    assert ids.tolist() == [[0, 1, 5], [1, 7, 8]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_batches_hold_the_shards_qa_pairs_with_matching_images(shards8, tok, pre):
    rows = {r.key: r for p in resolve_shards(shards8) for r in read_shard(p)}
    batches = one_epoch(DataConfig(shards=[shards8], batch_size=3, shuffle=False), tok, pre)
    samples = [(b, i) for b in batches for i in range(len(b["keys"]))]
    assert sorted(b["keys"][i] for b, i in samples) == sorted(rows)   # one REC pair per image, every image once
    for b, i in samples:
        row = rows[b["keys"][i]]
        text = tok.decode(b["input_ids"][i][b["attention_mask"][i].bool()], skip_special_tokens=True)
        assert text in {"".join(prompt_and_target(q.question, q.answer)) for q in row.qa if q.task == "rec"}
        want = pre(Image.open(io.BytesIO(row.image)))
        assert torch.equal(b["pixel_values"][i], want)


def test_the_models_transform_squashes_without_crop_and_normalises(debug_model, pre):
    """A 90x30 image, red left third, blue right third: resized (not cropped) to the tower's square, both
    ends survive at the first and last columns, normalised with the tower's mean/std (hand-computed)."""
    S = debug_model.vision.image_size
    im = Image.new("RGB", (90, 30), (0, 255, 0))
    im.paste((255, 0, 0), (0, 0, 30, 30))
    im.paste((0, 0, 255), (60, 0, 90, 30))
    mean, std = (torch.tensor(v) for v in NORMALIZATION["clip"])
    want = lambda rgb: (torch.tensor(rgb, dtype=torch.float32) / 255 - mean) / std  # noqa: E731
    x = pre(im)
    assert x.shape == (3, S, S)
    torch.testing.assert_close(x[:, S // 2, 0], want((255, 0, 0)), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, S // 2, S - 1], want((0, 0, 255)), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, 0, S // 2], want((0, 255, 0)), atol=1e-5, rtol=0)
    assert torch.equal(debug_model.preprocess([im, im]), torch.stack([x, x]))
    with pytest.raises(ValueError):
        ImageTransform(0)


@pytest.mark.parametrize("n_shards,world,workers", [(4, 2, 1), (2, 2, 2), (1, 1, 3)])
def test_ranks_and_workers_split_rows_without_overlap(tmp_path, tok, pre, n_shards, world, workers):
    shards = make_shards(tmp_path, n_images=12, rows_per_shard=12 // n_shards)
    cfg = DataConfig(shards=[shards])
    seen = []
    for rank in range(world):
        ds = GroundingBatches(cfg, tok, pre, rank=rank, world_size=world, num_workers=workers)
        for w in range(workers):
            rows = ds.epoch_order(ds.slot_of(w), epoch=0)
            assert rows, "every slot gets rows"
            seen.extend((r.shard, r.group, r.row) for r in rows)
    assert len(seen) == len(set(seen)) == 12                         # disjoint, and together all rows


def test_loader_workers_stream_disjoint_rows(shards8, tok, pre):
    ds = GroundingBatches(DataConfig(shards=[shards8], batch_size=2, repeat=False), tok, pre, num_workers=2)
    keys = [k for b in make_loader(ds) for k in b["keys"]]
    assert sorted(keys) == sorted(r.key for p in resolve_shards(shards8) for r in read_shard(p))


def test_mixture_and_qa_per_image(shards8, tok, pre):
    only_caption = one_epoch(DataConfig(shards=[shards8], batch_size=4, caption_weight=1, rec_weight=0), tok, pre)
    assert {t for b in only_caption for t in b["tasks"]} == {"caption"}
    mixed = one_epoch(DataConfig(shards=[shards8], batch_size=4, caption_weight=1, rec_weight=1, qa_per_image=3), tok, pre)
    tasks = Counter(t for b in mixed for t in b["tasks"])
    assert sum(tasks.values()) == 8 * 3 and tasks["caption"] <= 8 and tasks["rec"] >= 8   # one caption pair per image
    per_key = Counter(k for b in mixed for k in b["keys"])
    assert set(per_key.values()) == {3}
    texts = Counter((b["keys"][i], tuple(b["input_ids"][i].tolist())) for b in mixed for i in range(len(b["keys"])))
    assert max(texts.values()) == 1                                  # drawn without replacement within an image
    with pytest.raises(ValueError):
        DataConfig(shards=[shards8], caption_weight=0, rec_weight=0)


def test_corrupt_image_is_skipped_and_counted(tmp_path, shards8, tok, pre):
    rows = [row_to_dict(r) for r in read_shard(resolve_shards(shards8)[0])]
    rows[1]["image"] = b"\xff\xd8\xff\xe0 not a jpeg at all"
    rows[2]["image"] = rows[3]["image"] = b"not an image"            # PIL's messages differ (object address)
    bad_keys = {rows[i]["key"] for i in (1, 2, 3)}
    write_shard(rows, str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"3 of the first 4 rows gave no usable sample, more than --max-skip-fraction 0.5"):
        one_epoch(DataConfig(shards=[str(tmp_path / "bad.parquet")], batch_size=2), tok, pre)
    batches = one_epoch(DataConfig(shards=[str(tmp_path / "bad.parquet")], batch_size=2, max_skip_fraction=1.0), tok, pre)
    keys = [k for b in batches for k in b["keys"]]
    assert not bad_keys & set(keys) and len(keys) == len(rows) - 3
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    assert skipped == {"corrupt_image: OSError": 1, "corrupt_image: UnidentifiedImageError": 2}  # one key per kind


def test_long_samples_are_kept_truncated_and_not_counted_as_skipped(shards8, tok, pre):
    full = one_epoch(DataConfig(shards=[shards8], batch_size=4, max_length=64), tok, pre)
    assert sum(b["truncated"] for b in full) == 0 and max(b["input_ids"].shape[1] for b in full) > 8
    rec = [q["question"] for r in read_rows(shards8) for q in r["qa"] if q["task"] == "rec"]
    longest_prompt = max(len(encode_prompt(tok, q)) for q in rec)  # BOS + prompt
    cut_at = longest_prompt + 1                                      # one answer token left for every pair
    cut = one_epoch(DataConfig(shards=[shards8], batch_size=4, max_length=cut_at), tok, pre)
    assert sorted(k for b in cut for k in b["keys"]) == sorted(k for b in full for k in b["keys"])   # all 8 kept
    assert all(b["input_ids"].shape[1] == cut_at for b in cut)
    assert all((b["labels"] != IGNORE_INDEX).sum(1).min() >= 1 for b in cut)
    assert sum(b["truncated"] for b in cut) == 8 and all(b["skipped"] == {} for b in cut)


def test_samples_cut_before_their_answer_are_skipped_as_too_long(tmp_path, shards8, tok, pre):
    with pytest.raises(DataError, match=r"8 of the first 8 rows gave no usable sample.*8 too_long .*--max-length"):
        one_epoch(DataConfig(shards=[shards8], batch_size=4, max_length=8), tok, pre)
    rows = read_rows(shards8)[:4]
    for r in rows[:2]:                                               # a huge caption's phrase fills the prompt
        for q in r["qa"]:
            q["question"] = "Question: Where is the " + "very " * 60 + "big thing?"
    write_shard(rows, str(tmp_path / "long.parquet"))
    batches = one_epoch(DataConfig(shards=[str(tmp_path / "long.parquet")], batch_size=2, max_length=48,
                                   qa_per_image=4, max_skip_fraction=1.0), tok, pre)
    fits = {r["key"] for r in rows[2:]}
    assert sum(b["skipped"].get("too_long", 0) for b in batches) == len(rows) - len(fits)
    assert all((b["labels"] != IGNORE_INDEX).sum(1).min() >= 1 for b in batches)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_cursor_continues_the_stream_exactly(shards8, tok, pre, workers):
    cfg = DataConfig(shards=[shards8], batch_size=3, qa_per_image=2, caption_weight=1, rec_weight=1)
    ds = GroundingBatches(cfg, tok, pre, num_workers=workers)
    it = iter(make_loader(ds))
    cursors, first = {}, []
    for _ in range(5):
        b = next(it)
        cursors[b["worker"]] = tuple(b["cursor"])
        first.append(b)
    straight = [next(it) for _ in range(6)]                          # crosses an epoch boundary (16 samples/epoch)
    state = ds.state_after(cursors, 5)
    ds2 = GroundingBatches(cfg, tok, pre, num_workers=workers)
    ds2.resume(state)
    resumed = [b for _, b in zip(range(6), make_loader(ds2))]
    for a, b in zip(straight, resumed):
        assert a["keys"] == b["keys"] and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(ValueError, match="layout"):
        GroundingBatches(cfg, tok, pre, num_workers=workers + 3).resume(state)


def test_resolve_shards_globs_and_folders(shards8, tmp_path):
    files = resolve_shards(shards8)
    assert len(files) == 2 and all(f.endswith(".parquet") for f in files)
    assert resolve_shards(os.path.join(shards8, "*.parquet")) == files == resolve_shards(files)
    with pytest.raises(FileNotFoundError):
        resolve_shards(str(tmp_path / "nothing" / "*.parquet"))


def test_packed_qa_pairs_share_one_image_pass_and_keep_their_masks(shards8, tok, pre):
    cfg = DataConfig(shards=[shards8], batch_size=8, qa_per_image=3, pack_qa=True, max_length=200, shuffle=False)
    batch = one_epoch(cfg, tok, pre)[0]
    assert len(batch["keys"]) == 8 and len(set(batch["keys"])) == 8          # one sequence per image
    row = next(r for p in resolve_shards(shards8) for r in read_shard(p) if r.key == batch["keys"][0])
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    labels = batch["labels"][0][: len(ids)].tolist()
    n_pairs = min(3, sum(q.task == "rec" for q in row.qa))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and ids.count(tok.eos_token_id) == n_pairs
    answers = tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True)
    truth = {prompt_and_target(q.question, q.answer)[1] for q in row.qa if q.task == "rec"}
    assert answers.count("[[") == n_pairs and all(a in truth for a in answers.replace("]] [[", "]]| [[").split("|"))


def test_a_row_group_that_does_not_read_names_its_file_or_is_skipped_and_counted(tmp_path, shards8, tok, pre):
    """A valid footer over corrupt pages passes the open-time check; reading the group stops the run naming
    the file, or with skip_bad_shards its rows are skipped as ``unreadable_row_group``."""
    import pyarrow.parquet as pq

    from grounding.schema import ShardError

    bad = tmp_path / "pages.parquet"
    data = bytearray(open(resolve_shards(shards8)[0], "rb").read())
    chunk = pq.ParquetFile(resolve_shards(shards8)[0]).metadata.row_group(0).column(0)   # `key`'s pages
    data[chunk.data_page_offset + 10: chunk.data_page_offset + chunk.total_compressed_size] = \
        b"\x55" * (chunk.total_compressed_size - 10)
    bad.write_bytes(bytes(data))
    shards = [str(bad), resolve_shards(shards8)[1]]
    with pytest.raises(ShardError, match=rf"{bad}: row group 0 does not read .*--skip-bad-shards"):
        one_epoch(DataConfig(shards=shards, batch_size=2), tok, pre)
    cfg = DataConfig(shards=shards, batch_size=2, skip_bad_shards=True, max_skip_fraction=1.0)
    batches = list(itertools.islice(iter(GroundingBatches(cfg, tok, pre)), 3))  # a pass and a bit: all skips reported
    good = {r["key"] for r in read_rows(shards[1])}
    assert {k for b in batches for k in b["keys"]} <= good and len(batches) == 3
    assert sum(b["skipped"].get("unreadable_row_group", 0) for b in batches) >= 4


def test_empty_shards_are_left_out_before_rows_are_dealt(tmp_path, tok, pre):
    """The pipeline writes a shard with no rows when it keeps none of its input. 5 files (one empty) over 4
    loader slots: dealt by file, one slot would get only the empty one and stop the run mid-way; empty files
    are left out first, every slot gets rows and one pass reads every row once."""
    rows = read_rows(make_shards(tmp_path, n_images=8, rows_per_shard=8))
    folder = tmp_path / "with_empty"
    for i, chunk in enumerate([rows[0:2], rows[2:4], rows[4:6], [], rows[6:8]]):
        write_shard(chunk, str(folder / f"{i:05d}.parquet"))
    ds = GroundingBatches(DataConfig(shards=[str(folder)], batch_size=2, repeat=False), tok, pre, num_workers=4)
    assert len(ds.paths) == 5 and [len(ds.epoch_order(ds.slot_of(w), 0)) for w in range(4)] == [2, 2, 2, 2]
    keys = [k for b in make_loader(ds) for k in b["keys"]]
    assert sorted(keys) == sorted(r["key"] for r in rows)


def test_fewer_rows_than_loader_slots_is_an_error_at_once(tmp_path, tok, pre):
    shards = make_shards(tmp_path, n_images=3, rows_per_shard=3)
    n = len(read_rows(shards))
    with pytest.raises(DataError, match=rf"the shards hold {n} rows, fewer than the 4 loader slots "
                                        r"\(2 ranks x 2 workers\).*--num-workers"):
        GroundingBatches(DataConfig(shards=[shards]), tok, pre, rank=1, world_size=2, num_workers=2)
    fits = GroundingBatches(DataConfig(shards=[shards]), tok, pre, rank=1, world_size=2, num_workers=1)   # 2 slots
    assert fits.num_slots == 2 and fits.epoch_order(fits.slot_of(0), 0)


def test_rec_answers_cut_at_max_length_are_counted_apart(tmp_path, tok, pre):
    """3-box answers ``[[a;b;c]]`` (a top_k=3 pipeline's) do not fit max_length 48: the samples are kept (their
    first boxes still teach) but counted as answer_cut, so the trainer can say so; at 200 tokens nothing is cut."""
    folder = make_multibox_shards(tmp_path)
    rec = [q for r in read_rows(folder) for q in r["qa"] if q["task"] == "rec"]
    cut_by_hand = sum(encode_qa(tok, q["question"], q["answer"], 48)[2] for q in rec)
    assert cut_by_hand > len(rec) // 2
    cfg = dict(shards=[folder], batch_size=4, qa_per_image=4, shuffle=False)
    short = one_epoch(DataConfig(max_length=48, **cfg), tok, pre)
    assert sum(len(b["keys"]) for b in short) == len(rec)                 # every pair kept ...
    assert sum(b["answer_cut"] for b in short) == sum(b["truncated"] for b in short) == cut_by_hand  # ... counted
    long = one_epoch(DataConfig(max_length=200, **cfg), tok, pre)
    assert sum(b["answer_cut"] for b in long) == 0 and sum(len(b["keys"]) for b in long) == len(rec)
