"""The GPU suite's dry run (every section at tiny sizes on CPU) and the measuring helpers it shares."""
from __future__ import annotations

import json

import pytest

from benchmarks import gpu_suite
from benchmarks.measure import interleaved, paired_ratios, spread, write_result


def test_spread_and_paired_ratios():
    s = spread([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert s["q1"] == pytest.approx(1.75) and s["q3"] == pytest.approx(4.75)
    r = paired_ratios([2.0, 4.0, 9.0], [1.0, 4.0, 3.0])
    assert r["per_round"] == [2.0, 1.0, 3.0] and r["median"] == 2.0 and (r["min"], r["max"]) == (1.0, 3.0)
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


def test_interleaved_reverses_the_order_every_round():
    calls = []
    t = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A/B, B/A, A/B
    assert t["order"] == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert len(t["wall"]["a"]) == len(t["cpu"]["b"]) == 3


def test_quick_run_is_checked_against_the_full_run(tmp_path):
    out = tmp_path / "r.json"
    write_result(out, {"x": 1}, quick=False, headline={"speedup": 2.0, "other": 1.0})
    stored = write_result(out, {"x": 2}, quick=True, headline={"speedup": 2.4, "other": 1.3})
    check = stored["quick_vs_full"]
    assert check["speedup"]["within_25pct"] is True and check["speedup"]["relative_difference"] == pytest.approx(0.2)
    assert check["other"]["within_25pct"] is False  # 30 % off
    assert json.loads(out.read_text())["full"]["x"] == 1  # the full run is kept beside the quick one


@pytest.mark.slow
def test_dry_run_covers_every_section(tmp_path):
    """The JSON a user reads after a run: every section measured, nothing failed, figures in their ranges."""
    out = tmp_path / "gpu.json"
    gpu_suite.main(["--dry-run", "--peak-tflops", "1", "--out", str(out)])  # a CPU-sized peak, so MFU is computed
    result = json.loads(out.read_text())
    s = result["sections"]
    assert set(s) == set(gpu_suite.SECTIONS) and result["mode"] == "dry_run"
    assert result["failed"] == {} and result["not_run"] == {}
    assert set(result["seconds_per_section"]) == set(gpu_suite.SECTIONS)
    figures = [r["figure"] for r in result["summary"]]
    for prefix in ("detector ", "feeding: ", "job / detector-only", "train ", "REC generate"):  # one line per section
        assert any(f.startswith(prefix) for f in figures), (prefix, figures)
    assert result["command"].startswith("python benchmarks/gpu_suite.py --dry-run")

    det = s["detector"]
    assert set(det["images_per_s"]) == {"fp32_b1", "bf16_b1", "bf16_b2", "bf16_b4"}
    assert all(v["per_s_median"] > 0 for v in det["images_per_s"].values())
    assert det["prompt_phrases"] == 16 and det["prompt_tokens"] > 16

    feed = s["feeding"]
    per_image_s = sum(feed["cpu_ms_per_image"][k] for k in ("decode", "detector_preprocess", "spacy_phrases",
                                                            "tokenise_prompts")) / 1e3
    assert feed["images_per_s_per_core"] == pytest.approx(1 / per_image_s, rel=1e-2)
    assert feed["cores_per_gpu"] == pytest.approx(det["best_images_per_s"] * per_image_s, rel=1e-2)

    job = s["job"]
    assert job["job_exit_code"] == 0
    assert job["images_through_detector"] == job["images_in"] == 6  # every image went through the job's detector
    assert 0 < job["ratio"]["median"] < 1  # the job (Ray, download, actors) cannot beat the detector alone here

    train = s["training"]["settings"]
    frozen, unfrozen = train["stage2_lm_frozen"], train["lm_unfrozen"]
    assert frozen["parameters"] == unfrozen["parameters"]
    assert frozen["trainable_parameters"] < unfrozen["trainable_parameters"]  # LM frozen: experts + adapter only
    assert frozen["flops_per_step"] < unfrozen["flops_per_step"]  # no weight gradients for the frozen LM
    assert s["training"]["peak_tflops_bf16"] == 1.0 and s["training"]["peak_from"] == "--peak-tflops"
    for res in (frozen, unfrozen):
        for side in ("no_checkpointing", "checkpointing"):
            r = res[side]
            assert r["tokens_per_s"] > 0 and 0 < r["mfu"] <= 1, (side, r)
            median_step = r["step_seconds"]["median"]
            assert r["mfu"] == pytest.approx(res["flops_per_step"] / median_step / 1e12)
            assert r["tokens_per_s"] == pytest.approx(res["tokens_per_step"] / median_step)
    assert gpu_suite.peak_tflops(gpu_suite.dry_run()) == (None, "no GPU")  # no peak on CPU unless given: MFU None
    assert s["evaluation"]["samples_per_s"]["per_s_median"] > 0
    assert any(r["figure"].startswith("job / detector-only") for r in result["summary"])


def test_full_run_refuses_a_machine_without_cuda():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_suite.full()
    assert gpu_suite.full(sections=("feeding",), device="cpu").sections == ("feeding",)
