"""A corpus of malformed inputs, made here (no committed binaries), run through every command line.

Each case is a file a user could hand a command by mistake or receive from a broken job. Every
command must end within seconds (``pytest-timeout`` guards against a hang) with the documented
outcome: exit code 2 and one ``error: …`` line naming the file and what is wrong, or a run that
finishes and counts what it skipped. README.md's "Troubleshooting" lists the same errors.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grounding.cli import run_cli
from grounding.schema import GROUNDING_SCHEMA, META_VERSION, REJECTS_SCHEMA, provenance_metadata, to_table, write_shard
from grounding.world import make_world, truth_rows

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def run_bounded(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command line in its own process group; past ``timeout`` the whole group is killed (torchrun's
    workers too) and the test fails as a hang."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... still running after {timeout} s: a hang")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# --- the corpus ------------------------------------------------------------------------------

def _write(table: pa.Table, path: Path, version: str | None = "1") -> str:
    meta = provenance_metadata({"made_by": "test_malformed"})
    if version is None:
        meta.pop(META_VERSION)
    else:
        meta[META_VERSION] = version.encode()
    pq.write_table(table.replace_schema_metadata(meta), path)
    return str(path)


def _with_answers(rows: list[dict], answer: str) -> list[dict]:
    return [{**r, "qa": [{**q, "answer": answer} if q["task"] == "rec" else q for q in r["qa"]]} for r in rows]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """name -> path of one malformed (or merely unusual) file; ``good`` is a sound shard."""
    root = tmp_path_factory.mktemp("malformed")
    rows = truth_rows(make_world(4, seed=21))
    good = to_table(rows)
    files = {"good": write_shard(rows, str(root / "good.parquet"))}
    data = Path(files["good"]).read_bytes()
    (root / "truncated.parquet").write_bytes(data[: len(data) // 2])     # a copy cut short
    files["truncated"] = str(root / "truncated.parquet")
    (root / "text.parquet").write_text("key,url,caption\n1,http://x/1.jpg,a red ball\n")
    files["text"] = str(root / "text.parquet")
    files["rejects"] = write_shard([{"key": "k", "url": "http://x", "caption": "c", "source_shard": "s", "source_row": 0,
                                     "stage": "download", "reason": "http_404", "error": "404"}],
                                   str(root / "rejects.parquet"), schema=REJECTS_SCHEMA)
    files["missing_column"] = _write(good.drop_columns(["image"]), root / "missing_column.parquet")
    files["extra_column"] = _write(good.append_column("licence", pa.array(["cc-by"] * good.num_rows)),
                                   root / "extra_column.parquet")
    files["renamed_column"] = _write(good.rename_columns(["qas" if c == "qa" else c for c in good.column_names]),
                                     root / "renamed_column.parquet")
    files["wrong_type"] = _write(good.set_column(good.schema.get_field_index("qa"), "qa",
                                                 pa.array([json.dumps(r["qa"]) for r in rows])),
                                 root / "wrong_type.parquet")
    files["newer_version"] = _write(good, root / "newer_version.parquet", version="99")
    files["empty"] = write_shard(GROUNDING_SCHEMA.empty_table(), str(root / "empty.parquet"))
    files["corrupt_images"] = _write(good.set_column(good.schema.get_field_index("image"), "image",
                                                     pa.array([b"\xff\xd8\xff not a jpeg"] * good.num_rows, pa.binary())),
                                     root / "corrupt_images.parquet")
    # written past write_shard's validation, as a foreign tool would
    files["boxes_outside"] = _write(pa.Table.from_pylist(_with_answers(rows, "Answer: [[100,200,1500,999]]"),
                                                         schema=GROUNDING_SCHEMA), root / "boxes_outside.parquet")
    files["unparseable_answers"] = _write(pa.Table.from_pylist(_with_answers(rows, "Answer: somewhere on the left"),
                                                               schema=GROUNDING_SCHEMA), root / "unparseable.parquet")
    files["empty_captions"] = _write(pa.Table.from_pylist([{**r, "caption": "", "grounded_caption": ""} for r in rows],
                                                          schema=GROUNDING_SCHEMA), root / "empty_captions.parquet")
    huge = "a red ball on a table " * 50_000                            # ~1.1 MB of caption per row
    files["huge_captions"] = _write(pa.Table.from_pylist([{**r, "caption": huge, "grounded_caption": huge} for r in rows],
                                                         schema=GROUNDING_SCHEMA), root / "huge_captions.parquet")
    return files


# The documented outcome of each command on each case: ("error", text in the one line) or ("ok", None).
BAD_FILE = {
    "truncated": "not a readable Parquet file",
    "text": "not a readable Parquet file",
    "rejects": "is a rejects shard",
    "missing_column": "missing column(s) image",
    "renamed_column": "missing column(s) qa",
    "wrong_type": "column 'qa' is string",
    "newer_version": "schema_version '99' is newer",
}
TRAIN = {**{k: ("error", v) for k, v in BAD_FILE.items()},
         "empty": ("error", "hold no rows"),
         "corrupt_images": ("error", "gave no usable sample"),
         "boxes_outside": ("error", "bad_answer: coordinates must be three digits"),
         "unparseable_answers": ("error", "bad_answer: no '[[' in output"),
         "extra_column": ("ok", None), "empty_captions": ("ok", None), "huge_captions": ("ok", None)}
EVALUATE = {**{k: ("error", v) for k, v in BAD_FILE.items()},
            "empty": ("error", "nothing to evaluate"),
            "boxes_outside": ("error", "every REC pair of --shards was skipped (13 bad_truth: coordinates must be three"),
            "unparseable_answers": ("error", "every REC pair of --shards was skipped (13 bad_truth: no '[[' in output)"),
            "corrupt_images": ("ok", None),              # every example a miss, counted as "image: ..."
            "extra_column": ("ok", None), "empty_captions": ("ok", None), "huge_captions": ("ok", None)}
QUERY = {**{k: ("error", v) for k, v in BAD_FILE.items()},
         **{k: ("ok", None) for k in ("empty", "corrupt_images", "boxes_outside", "unparseable_answers", "extra_column",
                                      "empty_captions", "huge_captions")}}


def one_error_line(err: str, text: str, path: str | None = None) -> None:
    """stderr holds exactly one ``error:`` line, with ``text`` (and the file) in it, and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert text in lines[0], lines[0]
    if path is not None:
        assert path in lines[0], lines[0]


def check(code: int, err: str, expected: tuple[str, str | None], path: str, names_file: bool) -> None:
    kind, text = expected
    if kind == "ok":
        assert code == 0 and "error:" not in err, err[-2000:]
    else:
        assert code == 2, err[-2000:]
        one_error_line(err, text, path if names_file else None)


# --- model.train -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_json(tmp_path_factory) -> str:
    """The debug model's config as a --model JSON (its tiny checkpoints written once)."""
    from model.testing import write_debug_model

    root = tmp_path_factory.mktemp("model")
    path = root / "model.json"
    path.write_text(json.dumps(dataclasses.asdict(write_debug_model(root / "debug"))))
    return str(path)


def train_args(shards, out, model_json, *extra) -> list[str]:
    return ["--shards", *shards, "--out-dir", str(out), "--model", model_json, "--max-steps", "2", "--batch-size", "2",
            "--save-every", "0", "--progress", "false", *extra]


@pytest.mark.parametrize("case", sorted(TRAIN))
def test_train_on_each_case(case, corpus, model_json, tmp_path, capsys):
    from model.train import main

    code = run_cli(main, train_args([corpus[case]], tmp_path / "run", model_json))
    check(code, capsys.readouterr().err, TRAIN[case], corpus[case], case in BAD_FILE)


SKIP_FORMS = [("--skip-bad-shards",), ("--skip-bad-shards", "true")]   # the same two forms on both command lines


@pytest.mark.parametrize("form", SKIP_FORMS, ids=" ".join)
def test_train_skips_bad_files_when_asked_and_counts_them(form, corpus, model_json, tmp_path, capsys):
    from model.train import main

    shards = [corpus["good"], corpus["truncated"], corpus["rejects"]]
    assert run_cli(main, train_args(shards, tmp_path / "stop", model_json, "--skip-bad-shards", "false")) == 2
    one_error_line(capsys.readouterr().err, "is a rejects shard", corpus["rejects"])  # the first bad file, sorted
    assert run_cli(main, train_args(shards, tmp_path / "run", model_json, *form)) == 0
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert sorted(start["bad_shards"]) == sorted([corpus["truncated"], corpus["rejects"]])
    assert "is a rejects shard" in start["bad_shards"][corpus["rejects"]]


def test_corrupt_images_stop_a_loader_worker_with_one_line(corpus, model_json, tmp_path):
    """Through a DataLoader worker process and the real entry point: the worker's error, not its traceback."""
    proc = run_bounded([sys.executable, "-m", "model.train",
                        *train_args([corpus["corrupt_images"]], tmp_path / "run", model_json, "--num-workers", "1")], 100)
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_error_line(proc.stderr, "4 of the first 4 rows gave no usable sample")
    assert "4 corrupt_image: UnidentifiedImageError (the image bytes do not decode)" in proc.stderr


def test_skip_fraction_is_a_flag(corpus, model_json, tmp_path, capsys):
    """A third of the rows corrupt: the default 0.5 lets the run go on, counting them; 0.1 stops it."""
    from model.train import main

    shards = [corpus["extra_column"], corpus["empty_captions"], corpus["corrupt_images"]]  # 8 good rows, 4 corrupt
    more = ["--max-steps", "6"]                                      # 12 samples: more than one pass is read
    assert run_cli(main, train_args(shards, tmp_path / "ok", model_json, *more)) == 0
    strict = ["--max-skip-fraction", "0.1", "--skip-check-rows", "1"]
    assert run_cli(main, train_args(shards, tmp_path / "strict", model_json, *more, *strict)) == 2
    one_error_line(capsys.readouterr().err, "more than --max-skip-fraction 0.1")
    log = [json.loads(line) for line in (tmp_path / "ok" / "log.jsonl").read_text().splitlines()]
    assert sum(log[-1]["skipped"].values()) > 0                    # skipped rows stay counted in the log


# --- model.evaluate --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(corpus, model_json, tmp_path_factory) -> str:
    from model.train import main

    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert run_cli(main, train_args([corpus["good"]], out, model_json)) == 0
    return str(out)


def eval_args(checkpoint, shards, out, *extra) -> list[str]:
    return ["--checkpoint", checkpoint, "--shards", *shards, "--limit", "4", "--batch-size", "4",
            "--max-new-tokens", "2", "--pictures", "0", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.parametrize("case", sorted(EVALUATE))
def test_evaluate_on_each_case(case, corpus, checkpoint, tmp_path, capsys):
    from model.evaluate import main

    code = run_cli(main, eval_args(checkpoint, [corpus[case]], tmp_path / "r.json"))
    check(code, capsys.readouterr().err, EVALUATE[case], corpus[case], case in BAD_FILE)
    if case == "corrupt_images":
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["n"] == 4 and report["acc@0.5"] == 0
        assert report["parse_failure_reasons"] == {"image: UnidentifiedImageError": 4}


@pytest.mark.parametrize("form", SKIP_FORMS, ids=" ".join)
def test_evaluate_skips_bad_files_when_asked(form, corpus, checkpoint, tmp_path, capsys):
    from model.evaluate import main

    shards = [corpus["good"], corpus["text"]]
    assert run_cli(main, eval_args(checkpoint, shards, tmp_path / "r.json", "--skip-bad-shards", "false")) == 2
    one_error_line(capsys.readouterr().err, "not a readable Parquet file", corpus["text"])
    report = main(eval_args(checkpoint, shards, tmp_path / "r.json", *form))
    assert report["n"] == 4 and report["skipped"] == {"bad_shard": 1}


def test_evaluate_names_the_checkpoint_and_refs_flags(corpus, checkpoint, tmp_path, capsys):
    from model.evaluate import main

    assert run_cli(main, eval_args(str(tmp_path / "no_run"), [corpus["good"]], tmp_path / "r.json")) == 2
    one_error_line(capsys.readouterr().err, "check --checkpoint")
    (tmp_path / "refs.json").write_bytes(b"\x80\x04 a pickle")
    args = ["--checkpoint", checkpoint, "--refs", str(tmp_path / "refs.json"), "--instances", str(tmp_path / "refs.json"),
            "--images", str(tmp_path)]
    assert run_cli(main, args) == 2
    one_error_line(capsys.readouterr().err, "not JSON", str(tmp_path / "refs.json"))


# --- grounding-query -------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(QUERY))
def test_query_on_each_case(case, corpus, capsys):
    from grounding.query_cli import main

    code = run_cli(main, ["SELECT count(*) AS n FROM shards", "--shards", corpus[case], "-f", "csv"])
    captured = capsys.readouterr()
    check(code, captured.err, QUERY[case], corpus[case], case in BAD_FILE)
    if QUERY[case][0] == "ok":
        assert captured.out.split() == ["n", "0" if case == "empty" else "4"]


def test_query_wants_rejects_under_rejects(corpus, capsys):
    from grounding.query_cli import main

    assert run_cli(main, ["SELECT count(*) AS n FROM rejects", "--shards", corpus["good"], "--rejects", corpus["good"]]) == 2
    one_error_line(capsys.readouterr().err, "missing column(s) stage", corpus["good"])
    assert run_cli(main, ["SELECT count(*) AS n FROM rejects", "--shards", corpus["good"], "--rejects", corpus["rejects"],
                          "-f", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", "1"]


# --- build_grounding.py ----------------------------------------------------------------------

def test_build_grounding_names_the_bad_input_file(corpus, tmp_path):
    """The real script, as a user runs it: a text file named .parquet is one line, exit 2, before Ray starts."""
    proc = run_bounded([sys.executable, str(REPO / "pipeline" / "build_grounding.py"), "--input", corpus["text"],
                        "--output", str(tmp_path / "out")], 100)
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_error_line(proc.stderr, "not a readable Parquet file", corpus["text"])
    assert "remove it from --input" in proc.stderr


@pytest.mark.parametrize("args, text", [
    (["--input", "{truncated}"], "not a readable Parquet file"),
    (["--input", "{laion_link}"], "no 'URL' column"),
    (["--input", "{dir}/nothing-*.parquet"], "no source file matches"),
    (["--input", "{laion_link}", "--source-sample-fraction", "2"], "(flag --source-sample-fraction)"),
    (["--input", "{laion_link}", "--ray-detect-actors", "0"], "(flag --ray-detect-actors)"),
])
def test_build_grounding_user_errors_name_the_flag(args, text, corpus, tmp_path, capsys):
    from pipeline.build_grounding import main

    laion = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"link": ["http://127.0.0.1/a.jpg"], "TEXT": ["a red ball"]}), laion)
    names = {"truncated": corpus["truncated"], "laion_link": str(laion), "dir": str(tmp_path)}
    argv = [a.format(**names) for a in args] + ["--output", str(tmp_path / "out")]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    one_error_line(err, text)
    if "laion_link" in args[1] and len(args) == 2:
        assert "set --source-url-col" in err


# --- grounding.detect and grounding.phrases ----------------------------------------------------

def test_detect_names_the_bad_image_and_flag(corpus, tmp_path, capsys):
    from grounding.detect_cli import main

    assert run_cli(main, [corpus["text"], "--phrases", "red ball"]) == 2
    one_error_line(capsys.readouterr().err, "not a readable image", corpus["text"])
    assert run_cli(main, [corpus["text"], "--phrases", "red ball", "--box-threshold", "1.5"]) == 2
    one_error_line(capsys.readouterr().err, "(flag --box-threshold)")
    img = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(img)
    assert run_cli(main, [str(img), "--phrases", "red ball", "--model", str(tmp_path / "no_model")]) == 2
    one_error_line(capsys.readouterr().err, "cannot load the detector")


# --- detector.train ------------------------------------------------------------------------------

@pytest.mark.parametrize("case, text", [
    ("coco_text", "not COCO instances"), ("coco_missing", "not COCO instances"), ("coco_empty", "no trainable image"),
    ("config_text", "not a JSON config"), ("steps", "(flag --steps, --batch-size, --threads)"), ("lr", "(flag --optim-lr")])
def test_detector_train_names_the_bad_file_and_flag(case, text, corpus, tmp_path, capsys):
    from detector.train import main

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    coco = {"coco_text": corpus["text"], "coco_missing": str(tmp_path / "no.json"), "coco_empty": str(empty)}.get(case, str(empty))
    extra = {"config_text": ["--config", corpus["text"]], "steps": ["--steps", "0"], "lr": ["--optim-lr", "-1"]}.get(case, [])
    assert run_cli(main, ["--coco", coco, "--images", str(tmp_path), "--output", str(tmp_path / "out"), *extra]) == 2
    one_error_line(capsys.readouterr().err, text, coco if case.startswith("coco") else None)


def test_detector_train_command_line_prints_one_error_line(corpus, tmp_path):
    proc = run_bounded([sys.executable, "-m", "detector.train", "--coco", corpus["text"], "--images", str(tmp_path),
                        "--output", str(tmp_path / "out")], 100)
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_error_line(proc.stderr, "not COCO instances", corpus["text"])


def test_detect_command_line_runs_as_a_module(corpus):
    """``python -m grounding.detect`` (README) still reaches the command line, which lives in grounding.detect_cli."""
    proc = run_bounded([sys.executable, "-m", "grounding.detect", corpus["text"], "--phrases", "red ball"], 100)
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_error_line(proc.stderr, "not a readable image", corpus["text"])


def test_phrases_names_the_missing_column(corpus, capsys):
    from grounding.phrases import main

    assert run_cli(main, ["--parquet", corpus["good"], "--column", "TEXT"]) == 2
    one_error_line(capsys.readouterr().err, "column 'TEXT' not in")


@pytest.mark.timeout(240)
def test_a_rank_with_unusable_data_stops_the_whole_torchrun_job(corpus, model_json, tmp_path):
    """Two DDP ranks, one shard each; rank 0's is all corrupt images. Rank 0 stops with the error line and
    exits (it does not wait in a barrier for rank 1), and torchrun then ends rank 1: nothing hangs (with the
    barrier on the failing rank, this job hung until killed)."""
    shards = [corpus["corrupt_images"], corpus["good"]]               # sorted: rank 0 gets the corrupt shard
    proc = run_bounded([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "model.train", *train_args(shards, tmp_path / "run", model_json, "--max-steps", "50"),
                        "--device", "cpu"], 180)
    assert proc.returncode != 0
    assert "error: " in proc.stderr and "4 of the first 4 rows gave no usable sample" in proc.stderr, proc.stderr[-3000:]
