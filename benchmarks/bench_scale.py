"""The grounding job at scale, four figures side by side in one run (issue 12).

    python benchmarks/bench_scale.py            # full: 1e4 vs 1e6 rows, 64 images x 3 interleaved repeats
    python benchmarks/bench_scale.py --quick    # ~2 min: 1e3 vs 2e4 rows, 8 images x 1, tiny detector (a smoke run)

1. **Driver peak RSS** for two input sizes (10^4 and 10^6 rows; nearly all stopped by the pre-filter's
   URL guard without DNS, a few dozen served from 127.0.0.1): each job runs with a child process of the
   benchmark as its Ray driver (embedded Ray); its RSS is sampled every 20 ms from after ``ray.init``
   to the end of the job (``ray.init``'s own variation, ~20 MiB, is left out). The process's
   ``ru_maxrss`` is recorded too but is not the figure: Linux keeps the parent's high-water mark
   across fork + exec, so it shows the benchmark writing the 10^6-row input before the child started.
   Target: <= 50 MiB extra per million rows. The URL dedup pre-pass then runs alone on the 10^6-row
   input (no shard tasks beside it): its seconds per million rows, files and bytes.
2. **Image bytes received by the driver**: every object the driver's ``ray.get`` returns is pickled
   and searched for ``bytes`` values, in the same runs. Target: 0.
3. **Time to the first written grounding shard / total time**, on the bundled sample cut into >= 16
   work shards. Target: <= 0.3.
4. **Job images/s / detector-only images/s** with the ~7.4 M-parameter random GroundingDINO on CPU
   (``--quick``: the tiny one): the job's rows through the detector over its time after the detector
   actor finished loading; the detector alone (``BoxDetector``, same config, batch size and one torch
   thread, as the actor) on the same downloaded images and phrases, model loaded before timing.
   Repeats interleaved (job, detector, job, detector, ...), median and spread. Target: >= 0.8.
   The end-to-end ratio (Ray start, dedup and model load included) is reported beside it.

Writes ``benchmarks/results/scale.json`` (``--quick``: ``scale_quick.json``; ``--only memory|stream``: one
half, ``scale[_quick]_<half>.json``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["OMP_NUM_THREADS"] = "1"  # before torch loads: the detector-only side gets what the Ray actor gets
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def save_small_detector(path: str) -> str:
    """A random GroundingDINO of ~7.4 M parameters (Swin embed 48, d_model 128, 100 queries, 480-640 px):
    heavy enough on a CPU for the detector to dominate, as the real one does on a GPU."""
    import torch
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    from grounding.testing import save_tokenizer_and_processor

    tokenizer = save_tokenizer_and_processor(path, 480, 640)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=48, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 4], out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=256),
        d_model=128, num_queries=100, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=256, decoder_ffn_dim=256,
        encoder_attention_heads=4, decoder_attention_heads=4, max_text_len=256)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(path)
    return path


def spread(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4),
            "values": [round(x, 4) for x in xs]}


# --- 1 + 2: the driver's memory and what it receives --------------------------------------------------

def write_big_source(path: str, rows: int, served) -> None:
    """``rows`` LAION rows: all but the served ones point at private IP literals (stopped by the URL
    guard, no DNS; they pass the caption checks, so they go through the dedup pre-pass); 1% repeat a URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    filler = rows - served.num_rows
    ids = [i if i % 100 else i // 2 for i in range(filler)]  # every 100th row repeats an earlier URL
    table = pa.table({
        "URL": pa.array([f"http://10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}/img/{i}.jpg" for i in ids]),
        "TEXT": pa.array([f"A red ball and a blue box, picture {i}" for i in range(filler)]),
        "key": pa.array([f"filler{i:08d}" for i in range(filler)]),
    })
    table = pa.concat_tables([served.select(["URL", "TEXT", "key"]), table])
    pq.write_table(table, path, row_group_size=100_000)


def driver_child(config_json: str, result_json: str) -> int:
    """The job with this process as its Ray driver; writes peak RSS and what ``ray.get`` returned."""
    import threading

    import psutil
    import ray

    from pipeline.config import JobConfig
    from pipeline.job import run_job

    received = {"objects": 0, "pickled_bytes": 0, "binary_bytes": 0}
    real_get = ray.get

    def binary_bytes(x) -> int:
        if isinstance(x, (bytes, bytearray, memoryview)):
            return len(x)
        if isinstance(x, dict):
            return sum(binary_bytes(k) + binary_bytes(v) for k, v in x.items())
        if isinstance(x, (list, tuple, set)):
            return sum(binary_bytes(v) for v in x)
        if hasattr(x, "__dict__"):
            return binary_bytes(vars(x))
        return 0

    def counting_get(refs, *a, **kw):
        out = real_get(refs, *a, **kw)
        for v in out if isinstance(refs, list) else [out]:
            received["objects"] += 1
            received["pickled_bytes"] += len(pickle.dumps(v))
            received["binary_bytes"] += binary_bytes(v)
        return out

    ray.get = counting_get
    with open(config_json) as f:
        config = JobConfig.from_dict(json.load(f))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    me = psutil.Process()
    rss_before_job = me.memory_info().rss / 2**20
    peak = {"rss": rss_before_job}
    stop = threading.Event()

    def sample():  # the driver's RSS every 20 ms while the job runs
        while not stop.wait(0.02):
            peak["rss"] = max(peak["rss"], me.memory_info().rss / 2**20)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    max_rss = {"before_job": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    report = run_job(config)
    stop.set()
    sampler.join()
    max_rss["after_job"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ray.shutdown()
    max_rss["after_ray_shutdown"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(result_json, "w") as f:
        json.dump({"peak_rss_mib": peak["rss"], "rss_before_job_mib": rss_before_job,
                   "process_max_rss_mib": max_rss,
                   "received": received, "counts": report["counts"],
                   "timings": report["timings_seconds"], "dedup": report["dedup"],
                   "shards": report["shards"]["total"]}, f)
    return 0


def driver_run(rows: int, tmp: str, served, base_config) -> dict:
    src = os.path.join(tmp, f"big{rows}")
    os.makedirs(src, exist_ok=True)
    write_big_source(os.path.join(src, "laion.parquet"), rows, served)
    config = replace(base_config, output=os.path.join(tmp, f"out{rows}"),
                     source=replace(base_config.source, paths=[os.path.join(src, "laion.parquet")]))
    cfg, res = os.path.join(tmp, f"config{rows}.json"), os.path.join(tmp, f"result{rows}.json")
    with open(cfg, "w") as f:
        json.dump(asdict(config), f)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--driver-child", cfg, res],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-4000:])
    with open(res) as f:
        return {"input_rows": rows, **json.load(f)}


def dedup_alone(rows: int, tmp: str, base_config) -> dict:
    """The URL dedup pre-pass alone (no shard tasks beside it) on the ``rows``-row input of the driver run:
    wall seconds on an embedded 2-CPU Ray, files and bytes it wrote."""
    import ray

    from pipeline.job import DedupPass
    from pipeline.output import Layout
    from pipeline.plan import plan_shards

    config = replace(base_config, output=os.path.join(tmp, f"dedup{rows}"),
                     source=replace(base_config.source, paths=[os.path.join(tmp, f"big{rows}", "laion.parquet")]))
    shards = plan_shards(config.source)
    layout = Layout(config.output)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        stats = DedupPass(config, layout, shards, limit=4).wait()
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    files = [os.path.join(d, f) for d, _, fs in os.walk(layout.dedup) for f in fs]
    return {"input_rows": rows, "work_shards": len(shards), "seconds": round(seconds, 2),
            "seconds_per_million_rows": round(seconds / (rows / 1e6), 1), "files": len(files),
            "bytes": sum(os.path.getsize(f) for f in files), **stats}


def driver_memory(sizes: tuple[int, int], tmp: str) -> dict:
    import pyarrow.parquet as pq

    from grounding.detect import DetectorConfig
    from grounding.source import FilterConfig, SourceConfig
    from grounding.world import WorldServer, make_world, write_world
    from pipeline.config import JobConfig
    from pipeline.download import DownloadConfig

    world = make_world(24, seed=3)
    with WorldServer(os.path.join(tmp, "world")) as server:
        files = write_world(os.path.join(tmp, "world"), world, base_url=server.base_url)
        served = pq.read_table(files.parquet)
        base = JobConfig(source=SourceConfig(paths=["-"], shard_rows=10_000),
                         filters=FilterConfig(allow_hosts=["127.0.0.1"]), download=DownloadConfig(threads=8, timeout=3),
                         detector=DetectorConfig(backend="annotations", annotations=str(files.coco), refs=str(files.refs)))
        small, big = (driver_run(n, tmp, served, base) for n in sizes)
    alone = dedup_alone(sizes[1], tmp, base)
    extra = big["peak_rss_mib"] - small["peak_rss_mib"]
    per_million = extra / ((big["input_rows"] - small["input_rows"]) / 1e6)
    dedup_per_million = alone["seconds_per_million_rows"]
    return {
        "runs": [small, big],
        "driver_peak_rss_extra_mib": round(extra, 1),
        "driver_peak_rss_extra_mib_per_million_rows": round(per_million, 1),
        "target_mib_per_million_rows": 50, "meets_target": per_million <= 50,
        "image_bytes_received_by_driver": small["received"]["binary_bytes"] + big["received"]["binary_bytes"],
        "dedup_prepass_seconds_per_million_rows": round(dedup_per_million, 1),
        "dedup_prepass_alone": alone,
        "dedup_prepass_seconds_beside_shards": big["timings"]["dedup"],
    }


# --- 3 + 4: streaming and the detector's share --------------------------------------------------------

def detector_only(config, downloads: str) -> tuple:
    """The job's successfully downloaded images with their phrases, and a loaded BoxDetector (untimed)."""
    import pyarrow.parquet as pq
    from PIL import Image

    from grounding.detect import BoxDetector
    from grounding.phrases import PhraseExtractor
    from grounding.schema import detection_targets, phrase_prompt

    rows = []
    for name in sorted(os.listdir(downloads)):
        if name.endswith(".parquet"):
            t = pq.read_table(os.path.join(downloads, name), columns=["sample_key", "caption", "status", "jpg"])
            rows += [r for r in t.to_pylist() if r["status"] == "success"]
    extractor = PhraseExtractor(config.phrases)
    images, prompts, keys = [], [], []
    for r, res in zip(rows, extractor([r["caption"] for r in rows])):
        if not res.phrases:
            continue
        phrases = [s.to_dict() for s in res.phrases]
        with Image.open(io.BytesIO(r["jpg"])) as im:
            images.append(im.convert("RGB"))
        prompts.append([phrase_prompt(phrases[i]) for i in detection_targets(phrases)])
        keys.append(r["sample_key"])
    return images, prompts, keys, BoxDetector(config.detector)


def time_detector(data, batch_size: int) -> float:
    images, prompts, keys, detector = data
    t0 = time.perf_counter()
    for s in range(0, len(images), batch_size):
        detector(images[s:s + batch_size], prompts[s:s + batch_size], keys=keys[s:s + batch_size])
    return len(images) / (time.perf_counter() - t0)


def streaming_and_ratio(images: int, repeats: int, small: bool, tmp: str) -> dict:
    import ray
    import torch

    from pipeline.job import run_job
    from pipeline.sample import SampleConfig, sample_job, served_sample

    torch.set_num_threads(1)
    model = save_small_detector(os.path.join(tmp, "small")) if small else None
    base = sample_job(os.path.join(tmp, "job"))
    base = replace(base, source=replace(base.source, shard_rows=4),
                   ray=replace(base.ray, detect_batch_size=4, max_shards_in_flight=4),
                   detector=replace(base.detector, batch_size=4, **({"model": model} if model else {})))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs, alone, data = [], [], None
    for k in range(repeats):
        out = os.path.join(tmp, f"job{k}")
        config = replace(base, output=out, source=replace(base.source, paths=[os.path.join(out, "sample", "laion.parquet")]))
        with served_sample(config, SampleConfig(images, seed=0)):
            report = run_job(config)
        t = report["timings_seconds"]
        detected = report["throughput"]["detected_rows_this_run"]
        runs.append({"total_seconds": t["total"], "first_shard_written_seconds": t["first_shard_written"],
                     "detectors_loaded_seconds": t.get("detectors_loaded"),
                     "first_shard_started_seconds": t.get("first_shard_started"),
                     "first_shard_detect_called_seconds": t.get("first_shard_detect_called"),
                     "dedup_seconds": t.get("dedup"), "shards_done_seconds": t["shards_done"],
                     "detected": detected, "shards": report["shards"]["total"],
                     "first_over_total": t["first_shard_written"] / t["total"],
                     "images_per_second_after_load": detected / (t["shards_done"] - t["detectors_loaded"]),
                     "images_per_second_end_to_end": detected / t["total"], "counts": report["counts"],
                     "slowest_stage": report["throughput"]["slowest_stage"]})
        if data is None:  # the same images for every detector-only repeat; the model loaded once, untimed
            data = detector_only(config, os.path.join(out, "downloads"))
        alone.append(time_detector(data, base.ray.detect_batch_size))
    ray.shutdown()
    ratio = [r["images_per_second_after_load"] / a for r, a in zip(runs, alone)]
    ratio_e2e = [r["images_per_second_end_to_end"] / a for r, a in zip(runs, alone)]
    first = [r["first_over_total"] for r in runs]
    return {
        "images": images, "work_shards": runs[0]["shards"], "repeats": repeats,
        "detector": "random GroundingDINO ~7.4 M params, 480-640 px" if small else "tiny random GroundingDINO ~0.5 M params",
        "jobs": runs, "detector_only_images_per_second": spread(alone),
        "detector_only_images": len(data[0]),
        "first_shard_over_total": spread(first), "first_shard_target": 0.3,
        "first_shard_meets_target": statistics.median(first) <= 0.3,
        "job_over_detector_only": spread(ratio), "job_over_detector_only_target": 0.8,
        "job_over_detector_only_meets_target": statistics.median(ratio) >= 0.8,
        "job_over_detector_only_end_to_end": spread(ratio_e2e),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="<= 2 min: smaller inputs, tiny detector, one repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--only", choices=("memory", "stream"), help="one half of the benchmark (-> scale[_quick]_<half>.json)")
    ap.add_argument("--driver-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.driver_child:
        return driver_child(*args.driver_child)
    quick = args.quick
    sizes = (1_000, 20_000) if quick else (10_000, 1_000_000)
    images = args.images or (8 if quick else 64)
    repeats = args.repeats or (1 if quick else 3)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        memory = driver_memory(sizes, tmp) if args.only != "stream" else None
        stream = streaming_and_ratio(images, repeats, small=not quick, tmp=tmp) if args.only != "memory" else None
    result = {
        "note": ("2-core CPU shared with other engineers' runs (load average in the JSON): timings are noisy. "
                 "Ratios use the same images, batch size and one torch thread on both sides; model load "
                 "excluded on both; repeats interleaved."),
        "command": "python benchmarks/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average": os.getloadavg(), "seconds": round(time.perf_counter() - t0, 1),
        "driver_memory": memory, "streaming_and_detector_share": stream,
        "figures": {
            **({"driver_peak_rss_extra_mib_per_million_rows": memory["driver_peak_rss_extra_mib_per_million_rows"],
                "image_bytes_received_by_driver": memory["image_bytes_received_by_driver"],
                "dedup_prepass_seconds_per_million_rows": memory["dedup_prepass_seconds_per_million_rows"]}
               if memory else {}),
            **({"first_shard_over_total_median": stream["first_shard_over_total"]["median"],
                "job_over_detector_only_median": stream["job_over_detector_only"]["median"]} if stream else {}),
        },
    }
    print(json.dumps(result["figures"], indent=2))
    os.makedirs(RESULTS, exist_ok=True)
    name = ("scale_quick" if quick else "scale") + (f"_{args.only}" if args.only else "")
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
