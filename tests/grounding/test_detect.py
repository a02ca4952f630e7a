"""grounding.detect: a tiny random-init GroundingDINO saved to disk and loaded back, on world images."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from grounding.detect import BERT_SPECIAL_IDS, BoxDetector, DetectorConfig, image_error
from grounding.positive_map import PhraseBoxes, clean_phrase, plan_prompts, select_boxes, suppress_overlaps, token_span
from grounding.testing import save_tiny_detector
from grounding.world import make_world, write_world

HAS_GDPY = importlib.util.find_spec("groundingdino") is not None
# Every query becomes a candidate for every phrase: outputs can be compared with the raw model.
OPEN = dict(box_threshold=0.0, text_threshold=0.0, nms_iou=1.0, top_k=100, min_box_size=0.0, max_area_fraction=1.0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_detector(str(tmp_path_factory.mktemp("tiny-gd")))


@pytest.fixture(scope="module")
def open_detector(tiny_dir):
    return BoxDetector(DetectorConfig(model=tiny_dir, **OPEN))


def assert_same(a: list[PhraseBoxes], b: list[PhraseBoxes], atol: float = 1e-4, box_atol: float = 1e-2):
    """Equal up to float noise (batch composition changes summation order)."""
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert pa.error == pb.error and len(pa.boxes) == len(pb.boxes)
        assert pa.scores == pytest.approx(pb.scores, abs=atol)
        assert torch.allclose(torch.tensor(pa.boxes).reshape(-1, 4), torch.tensor(pb.boxes).reshape(-1, 4), atol=box_atol)


def words_of(world):
    return sorted({w.strip(",.").lower() for im in world for w in im.caption.split()})


# --- the tiny detector on disk ----------------------------------------------------------------

def test_tiny_detector_loads_from_disk_with_bert_ids(tiny_dir, open_detector, world):
    from transformers import GroundingDinoForObjectDetection

    from grounding.testing import tiny_detector_config

    tok = open_detector.model.tokenizer
    assert tok.convert_tokens_to_ids(list(BERT_SPECIAL_IDS)) == [101, 102, 1012, 1029]
    # every word of the world's captions is one whole token, and unknown words are spelled, not [UNK]
    for w in words_of(world):
        assert tok.tokenize(w) == [w], w
    assert tok.unk_token_id not in tok("A xylophone, 3 zebras!")["input_ids"]
    torch.manual_seed(0)  # save_tiny_detector's default seed: the same random init, built again
    fresh = GroundingDinoForObjectDetection(tiny_detector_config(len(tok))).state_dict()
    loaded = open_detector.model.model.state_dict()
    assert loaded.keys() == fresh.keys() and all(torch.equal(loaded[k], v) for k, v in fresh.items())
    assert open_detector.name == "grounding-dino/transformers"


def test_weights_id_tells_different_weights_apart(tmp_path, tiny_dir):
    other = BoxDetector(DetectorConfig(model=save_tiny_detector(str(tmp_path / "seed1"), seed=1)))
    same = BoxDetector(DetectorConfig(model=save_tiny_detector(str(tmp_path / "seed0"), seed=0)))
    ref = BoxDetector(DetectorConfig(model=tiny_dir))
    assert same.weights_id.split("@")[1] == ref.weights_id.split("@")[1]
    assert other.weights_id.split("@")[1] != ref.weights_id.split("@")[1]


# --- token spans and prompt planning ----------------------------------------------------------

def test_token_spans_for_shared_words_and_spelled_words(open_detector):
    tok = open_detector.model.tokenizer
    phrases = ["red ball", "red", "ball", "big red ball", "xylophone"]
    passes, errors = plan_prompts(phrases, tok, 256)
    assert errors == {} and len(passes) == 1
    (p,) = passes
    assert p.text == "red ball . red . ball . big red ball . xylophone ."
    ids = tok(p.text)["input_ids"]
    assert p.token_spans[:4] == [(1, 3), (4, 5), (6, 7), (8, 11)]  # counted by hand: [CLS]=0, '.' between
    for k, (s, e) in zip(p.phrases, p.token_spans):
        assert tok.decode(ids[s:e]).replace(" ", "") == phrases[k].replace(" ", "")
    s, e = p.token_spans[4]
    assert e - s == len(tok.tokenize("xylophone")) > 1 and ids[e] == 1012 and ids[e + 1] == 102


def test_token_span_needs_a_covering_token():
    assert token_span([(0, 0), (0, 3), (4, 8), (0, 0)], 4, 8) == (2, 3)
    with pytest.raises(ValueError):
        token_span([(0, 0), (0, 3), (0, 0)], 5, 9)


def test_long_prompts_are_split_never_truncated(open_detector):
    tok = open_detector.model.tokenizer
    phrases = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange") for s in ("ball", "box", "kite", "cone")]
    passes, errors = plan_prompts(phrases, tok, 20)  # each phrase: 2 tokens + '.'; 6 fit in 2 + 18
    assert errors == {}
    assert [len(p.phrases) for p in passes] == [6, 6, 6, 6]
    assert [k for p in passes for k in p.phrases] == list(range(len(phrases)))
    for p in passes:
        ids = tok(p.text)["input_ids"]
        assert len(ids) <= 20 and ids[0] == 101 and ids[-1] == 102
        for k, (s, e) in zip(p.phrases, p.token_spans):
            assert tok.decode(ids[s:e]) == phrases[k]
    long_phrase = "a very big red ball on the left of a small blue box near a green kite"
    passes, errors = plan_prompts(["red ball", long_phrase, "", "\u200b"], tok, 12)
    assert set(errors) == {1, 2, 3} and errors[1].startswith("phrase_too_long")
    assert errors[2] == errors[3] == "phrase_empty"  # U+200B: a character the tokenizer drops
    assert [p.phrases for p in passes] == [[0]]


# --- the positive-map method against the raw model ---------------------------------------------

def test_scores_and_boxes_are_the_positive_map_of_each_span(open_detector, world):
    im = world[0]
    image = im.render()
    phrases = ["red ball", "blue box", "grey background"]
    (res,) = open_detector([image], [phrases])
    m = open_detector.model
    text = "red ball . blue box . grey background ."
    enc = m.tokenizer([text], return_tensors="pt")
    assert enc["input_ids"][0].tolist()[:10] == [101] + m.tokenizer.convert_tokens_to_ids(
        ["red", "ball", ".", "blue", "box", ".", "grey", "background", "."])
    pixels = m.prepare(image)[None]
    with torch.no_grad():
        out = m.model(pixel_values=pixels, **enc)
    probs = out.logits[0].sigmoid()  # (Q, 256)
    w, h = image.size
    for (s, e), pb in zip([(1, 3), (4, 6), (7, 9)], res):
        expect = probs[:, s:e].mean(dim=1)  # (Q,)
        assert len(pb.scores) == len(expect) == 20  # every query is a candidate under OPEN
        assert pb.scores == pytest.approx(sorted(expect.tolist(), reverse=True), abs=1e-5)
        best = int(expect.argmax())
        cx, cy, bw, bh = out.pred_boxes[0, best].tolist()
        clamp = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
        box = (clamp(cx - bw / 2) * w, clamp(cy - bh / 2) * h, clamp(cx + bw / 2) * w, clamp(cy + bh / 2) * h)
        assert pb.boxes[0] == pytest.approx(box, abs=1e-3)


def test_repeated_phrase_gets_the_boxes_of_its_first_mention(open_detector, world):
    image = world[1].render()
    res, = open_detector([image], [["red ball", "blue box", "Red ball."]])
    alone, = open_detector([image], [["red ball", "blue box"]])
    assert res[0] == res[2] == alone[0] and res[1] == alone[1]
    assert res[0].boxes and res[0].error is None


def test_split_prompt_equals_running_each_pass_alone(tiny_dir, world):
    image = world[2].render()
    phrases = [f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("ball", "box", "kite")]
    split = BoxDetector(DetectorConfig(model=tiny_dir, max_text_tokens=20, **OPEN))
    res, = split([image], [phrases])
    full, = BoxDetector(DetectorConfig(model=tiny_dir, **OPEN))([image], [phrases[6:]])
    last_pass, = split([image], [phrases[6:]])
    assert_same(res[6:], last_pass)  # the last phrases, in their own pass, map back to their own indices
    assert res[-1].boxes and res[-1].scores != full[-1].scores  # a different prompt: really another pass


# --- thresholds and post-processing -----------------------------------------------------------

def test_thresholds_filter_by_score(tiny_dir, world):
    images = [im.render() for im in world[:2]]
    phrases = [[o.phrase for o in im.objects] for im in world[:2]]
    loose = BoxDetector(DetectorConfig(model=tiny_dir, box_threshold=0.0, text_threshold=0.3, nms_iou=1.0,
                                       top_k=100, min_box_size=0.0, max_area_fraction=1.0))(images, phrases)
    scores = [s for r in loose for pb in r for s in pb.scores]
    assert scores and min(scores) > 0.3
    cut = sorted(scores)[len(scores) // 2]
    strict = BoxDetector(DetectorConfig(model=tiny_dir, box_threshold=0.0, text_threshold=cut, nms_iou=1.0,
                                        top_k=100, min_box_size=0.0, max_area_fraction=1.0))(images, phrases)
    for lr, sr in zip(loose, strict):
        for lp, sp in zip(lr, sr):
            assert sp.scores == [s for s in lp.scores if s > cut]
    none = BoxDetector(DetectorConfig(model=tiny_dir, box_threshold=0.0, text_threshold=max(scores)))(images, phrases)
    assert all(not pb.boxes for r in none for pb in r)
    # box_threshold filters queries by their best token: a phrase score (a mean over the phrase's
    # tokens) above it always passes, lower ones may or may not.
    boxed = BoxDetector(DetectorConfig(model=tiny_dir, box_threshold=cut, text_threshold=0.3, nms_iou=1.0,
                                       top_k=100, min_box_size=0.0, max_area_fraction=1.0))(images, phrases)
    for lr, br in zip(loose, boxed):
        for lp, bp in zip(lr, br):
            assert set(bp.scores) <= set(lp.scores)
            assert {s for s in lp.scores if s > cut} <= set(bp.scores)


def test_default_postprocessing_invariants(tiny_dir, world):
    cfg = DetectorConfig(model=tiny_dir, box_threshold=0.3, text_threshold=0.2, top_k=2, batch_size=3)
    det = BoxDetector(cfg)
    images = [im.render() for im in world]
    phrases = [[o.phrase for o in im.objects] for im in world]
    results = det(images, phrases)
    assert [len(r) for r in results] == [len(p) for p in phrases]
    n = 0
    for image, r in zip(images, results):
        w, h = image.size
        kept = [b for pb in r for b in pb.boxes]
        for pb in r:
            assert pb.error is None and len(pb.boxes) == len(pb.scores) <= 2
            assert pb.scores == sorted(pb.scores, reverse=True) and all(s > 0.2 for s in pb.scores)
            for x0, y0, x1, y1 in pb.boxes:
                n += 1
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
                assert x1 - x0 >= 4 and y1 - y0 >= 4 and (x1 - x0) * (y1 - y0) <= 0.95 * w * h
        ious = [_iou(a, b) for i, a in enumerate(kept) for b in kept[i + 1:]]
        assert all(v <= 0.5 for v in ious)  # class-agnostic NMS across phrases
    assert n > 0


def _iou(a, b):
    from grounding.boxes import box_iou
    return box_iou(a, b)


def test_nms_hand_computed():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
    # IoU(0, 1) = 81 / (100 + 100 - 81) = 0.6807; IoU(0, 3) = 1
    assert suppress_overlaps(boxes, scores, 0.5) == [0, 2]
    assert suppress_overlaps(boxes, scores, 0.7) == [0, 1, 2]
    assert suppress_overlaps(boxes, scores, 1.0) == [0, 1, 2, 3]
    assert suppress_overlaps(boxes, torch.tensor([0.1, 0.8, 0.7, 0.6], dtype=torch.float64), 0.5) == [1, 2]
    assert suppress_overlaps(torch.zeros((0, 4)), torch.zeros(0), 0.5) == []
    # with a phrase per box and top-k 1, it stops once every phrase has its box
    assert suppress_overlaps(boxes, scores, 0.7, groups=[0, 1, 1, 0], per_group=1) == [0, 1]
    assert suppress_overlaps(boxes, scores, 0.7, groups=[0, 1, 1, 0], per_group=2) == [0, 1, 2]


def test_select_boxes_across_phrases_hand_computed():
    cfg = DetectorConfig(backend="transformers", nms_iou=0.5, top_k=2, min_box_size=4, max_area_fraction=0.95)
    cands = [
        (0, (0, 0, 10, 10), 0.9),
        (1, (1, 1, 11, 11), 0.8),      # IoU 0.68 with phrase 0's box: suppressed across phrases
        (1, (20, 20, 30, 30), 0.7),
        (0, (-5, -5, 45, 45), 0.95),   # clipped to (0, 0, 40, 40): the whole image -> dropped by area
        (2, (30, 30, 33, 40), 0.99),   # 3 px wide -> dropped by min size
        (2, (5, 25, 15, 38), 0.5),
        (2, (5, 26, 15, 38), 0.4),     # duplicate of the one above
        (2, (0, 28, 4, 32), 0.3),      # 4 px sides: just large enough; phrase 2's second box
    ]
    out = select_boxes(cands, 3, 40, 40, cfg)
    assert out[0] == PhraseBoxes([(0.0, 0.0, 10.0, 10.0)], [0.9])
    assert out[1] == PhraseBoxes([(20.0, 20.0, 30.0, 30.0)], [0.7])
    assert out[2] == PhraseBoxes([(5.0, 25.0, 15.0, 38.0), (0.0, 28.0, 4.0, 32.0)], [0.5, 0.3])
    loose = select_boxes(cands, 3, 40, 40, DetectorConfig(nms_iou=1.0, top_k=1, min_box_size=0, max_area_fraction=1.0))
    assert loose[0] == PhraseBoxes([(0.0, 0.0, 40.0, 40.0)], [0.95])  # clipped, kept without the area rule
    assert loose[1].scores == [0.8] and loose[2].scores == [0.99]


# --- batching and bad images ------------------------------------------------------------------

def test_batched_equals_one_at_a_time_for_same_size_images(tiny_dir):
    world = make_world(4, seed=3, size=(192, 160))
    images = [im.render() for im in world]
    phrases = [[o.phrase for o in im.objects] for im in world]
    batched = BoxDetector(DetectorConfig(model=tiny_dir, batch_size=4, **OPEN))(images, phrases)
    single = BoxDetector(DetectorConfig(model=tiny_dir, batch_size=1, **OPEN))(images, phrases)
    for br, sr in zip(batched, single):
        assert_same(br, sr)


def test_boxes_do_not_depend_on_batch_neighbours_of_other_sizes():
    """Mixed-size images: batch 1 and batch 8 give the same boxes and scores (no padding to a neighbour)."""
    demo = Path(__file__).resolve().parents[2] / "assets" / "demo_detector"
    world = make_world(12, seed=12)
    images = [im.render() for im in world]
    assert len({im.size for im in images}) > 3  # the point: neighbours of other sizes
    phrases = [[o.phrase for o in im.objects] for im in world]
    detector = BoxDetector(DetectorConfig(model=str(demo), box_threshold=0.0, text_threshold=0.0, batch_size=1))
    alone = detector(images, phrases)
    detector.config.batch_size = 8
    batched = detector(images, phrases)
    assert sum(pb.boxes != [] for r in alone for pb in r) > 10
    for a, b in zip(alone, batched):
        assert_same(a, b, atol=1e-5, box_atol=1e-4)


def test_articles_and_end_punctuation_do_not_change_the_boxes():
    """The API / CLI prompt "a red ball" as the pipeline prompts "red ball" (its phrase_prompt drops the article)."""
    assert clean_phrase("A Red  ball!") == "red ball" and clean_phrase("the dog, ") == "dog"
    assert clean_phrase("An apple.") == "apple" and clean_phrase("theatre seat") == "theatre seat"
    demo = Path(__file__).resolve().parents[2] / "assets" / "demo_detector"
    world = make_world(6, seed=12)
    images = [im.render() for im in world]
    bare = [[o.phrase for o in im.objects] for im in world]
    dressed = [[f"{art} {p}{end}" for p, art, end in zip(ps, ("a", "The", "an", "the"), ("", ".", "!", " ,"))]
               for ps in bare]
    detector = BoxDetector(DetectorConfig(model=str(demo)))
    plain, with_articles = detector(images, bare), detector(images, dressed)
    assert sum(pb.boxes != [] for r in plain for pb in r) > 5
    for a, b in zip(plain, with_articles):
        assert [(pa.boxes, pa.scores) for pa in a] == [(pb.boxes, pb.scores) for pb in b]


def test_a_bad_image_is_an_error_marker_not_a_crash(open_detector, world):
    good = world[0].render()
    thin = Image.new("RGB", (1, 3000))  # the processor rejects it (a 0-pixel-wide resize)
    empty = Image.new("RGB", (0, 0))
    res = open_detector([thin, good, empty, good], [["red ball", "blue box"], ["red ball"], ["a"], []])
    assert [len(r) for r in res] == [2, 1, 1, 0]
    assert image_error(res[0]).startswith("image_preprocess_failed") and res[0][0].boxes == []
    assert image_error(res[2]).startswith("image_preprocess_failed")
    assert image_error(res[1]) is None and res[1] == open_detector([good], [["red ball"]])[0]
    assert image_error(res[3]) is None
    odd, = open_detector([good], [["red ball", "\u200b", "??", "a " * 300]])
    assert [pb.error.split(":")[0] if pb.error else None for pb in odd] == [None, "phrase_empty", "phrase_empty",
                                                                             "phrase_too_long"]
    assert odd[0] == res[1][0] and image_error(odd) is None  # phrase errors are not image errors


def test_caller_bugs_raise(open_detector):
    with pytest.raises(ValueError, match="phrase lists"):
        open_detector([Image.new("RGB", (32, 32))], [])


# --- annotations backend ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def world_files(tmp_path_factory, world):
    return write_world(tmp_path_factory.mktemp("world-ann"), world)


def test_annotation_backend_reproduces_world_truth(world_files, world):
    det = BoxDetector(DetectorConfig(backend="annotations", annotations=str(world_files.coco), refs=str(world_files.refs)))
    images = [im.render() for im in world]
    phrases = [[o.phrase for o in im.objects] + [f"The {o.phrase}" for o in im.objects] for im in world]
    results = det(images, phrases, keys=[im.key for im in world])
    for im, r in zip(world, results):
        truth = [PhraseBoxes([tuple(float(v) for v in o.box)], [1.0]) for o in im.objects]
        assert r == truth + truth
    assert det.name == "annotations" and det.weights_id.startswith("coco.json+refs.json@sha256:")


def test_annotation_backend_head_nouns_unknown_keys_and_scaling(world_files, world):
    det = BoxDetector(DetectorConfig(backend="annotations", annotations=str(world_files.coco)))
    im = next(w for w in world if len({o.shape for o in w.objects}) < len(w.objects))  # a shape twice
    shape = next(s for s in sorted({o.shape for o in im.objects}) if sum(o.shape == s for o in im.objects) >= 2)
    res, missing = det([im.render(), None], [[f"a shiny {shape}", "a zebra"], ["red ball"]], keys=[im.key, "nope"])
    assert sorted(res[0].boxes) == sorted(tuple(float(v) for v in o.box) for o in im.objects if o.shape == shape)
    assert res[1] == PhraseBoxes([], [])
    assert missing[0].error.startswith("no_annotations")
    half = im.render().resize((im.width // 2, im.height // 2))
    (scaled,) = det([half], [[f"{im.objects[0].phrase}"]], keys=[im.key])
    assert scaled[0].boxes[0] == pytest.approx(tuple(v * (half.width / im.width if i % 2 == 0 else half.height / im.height)
                                                     for i, v in enumerate(im.objects[0].box)))
    with pytest.raises(ValueError, match="keys"):
        det([im.render()], [["red ball"]])


def test_cli_prints_boxes_as_json(world_files, world, capsys):
    from grounding.detect_cli import main

    im = world[0]
    assert main([str(world_files.images / f"{im.key}.jpg"), "--phrases", im.objects[0].phrase, "zebra",
                 "--backend", "annotations", "--annotations", str(world_files.coco), "--refs", str(world_files.refs)]) == 0
    out = json.loads(capsys.readouterr().out)
    (first, second) = out["images"][0]["phrases"]
    assert first["phrase"] == im.objects[0].phrase and first["boxes"] == [list(map(float, im.objects[0].box))]
    assert second["boxes"] == [] and out["config"]["backend"] == "annotations"


# --- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="yolo"), "backend"),
    (dict(box_threshold=1.5), "box_threshold"),
    (dict(nms_iou=0.0), "nms_iou"),
    (dict(top_k=0), "top_k"),
    (dict(max_area_fraction=0.0), "max_area_fraction"),
    (dict(dtype="int8"), "dtype"),
    (dict(device="tpu"), "device"),
    (dict(backend="annotations"), "annotations"),
    (dict(max_text_tokens=3), "max_text_tokens"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DetectorConfig(**kwargs)


def test_resize_override_reaches_the_processor(tiny_dir):
    det = BoxDetector(DetectorConfig(model=tiny_dir, shortest_edge=64, longest_edge=96))
    assert det.model.prepare(Image.new("RGB", (300, 200))).shape == (3, 64, 96)
    assert BoxDetector(DetectorConfig(model=tiny_dir)).model.prepare(Image.new("RGB", (300, 200))).shape == (3, 213, 320)


def test_fp16_on_cpu_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="float16"):
        BoxDetector(DetectorConfig(model=tiny_dir, device="cpu", dtype="fp16"))
    assert DetectorConfig(dtype="bf16").dtype == "bfloat16"        # old spellings land on torch's names


@pytest.mark.skipif(HAS_GDPY, reason="groundingdino is installed here")
def test_groundingdino_py_missing_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match="envs/groundingdino-py/setup.sh"):
        BoxDetector(DetectorConfig(backend="groundingdino-py", model=str(tmp_path)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_on_gpu_matches_fp32(tiny_dir, world):
    images = [im.render() for im in world[:4]]
    phrases = [[o.phrase for o in im.objects] for im in world[:4]]
    fp32 = BoxDetector(DetectorConfig(model=tiny_dir, device="cuda", dtype="float32", **OPEN))(images, phrases)
    bf16 = BoxDetector(DetectorConfig(model=tiny_dir, device="cuda", dtype="bfloat16", **OPEN))(images, phrases)
    for a, b in zip(fp32, bf16):
        for pa, pb in zip(a, b):
            assert max(pa.scores) == pytest.approx(max(pb.scores), abs=0.05)


# --- groundingdino-py (separate environment: envs/groundingdino-py/) ---------------------------

@pytest.mark.groundingdino_py
@pytest.mark.skipif(not HAS_GDPY, reason="groundingdino not installed: build envs/groundingdino-py/setup.sh")
def test_groundingdino_py_backend_on_world_images(tmp_path, world):
    """Random-init SwinT-OGC (bundled config) with a tiny offline BERT, saved and loaded back."""
    import shutil
    from pathlib import Path

    import groundingdino
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig
    from transformers import BertConfig, BertModel

    from grounding.testing import save_bert_tokenizer, tiny_vocab

    bert = tmp_path / "bert"
    save_bert_tokenizer(str(bert))
    BertModel(BertConfig(vocab_size=len(tiny_vocab()), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    cfg = tmp_path / "model" / "GroundingDINO_SwinT_OGC.py"
    cfg.parent.mkdir()
    shutil.copy(Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py", cfg)
    args = SLConfig.fromfile(str(cfg))
    args.device, args.text_encoder_type = "cpu", str(bert)
    torch.manual_seed(0)
    # like IDEA's released checkpoints: the weights plus the training args (an argparse.Namespace)
    torch.save({"model": build_model(args).state_dict(), "args": argparse.Namespace(lr=1e-4)},
               cfg.parent / "random.pth")
    det = BoxDetector(DetectorConfig(backend="groundingdino-py", model=str(cfg.parent), text_encoder=str(bert),
                                     shortest_edge=224, longest_edge=320, device="cpu", **OPEN))
    images = [im.render() for im in world[:2]]
    phrases = [[o.phrase for o in im.objects] for im in world[:2]]
    results = det(images, phrases)
    assert det.name == "grounding-dino/groundingdino-py"
    for image, r, ps in zip(images, results, phrases):
        assert len(r) == len(ps)
        for pb in r:
            assert pb.error is None and len(pb.boxes) == 100  # top_k of the 900 queries under OPEN
            assert all(0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height for x0, y0, x1, y1 in pb.boxes)
            assert all(0 < s <= 1 and not math.isnan(s) for s in pb.scores), pb.scores[:3]
    # the same positive-map scores as the raw groundingdino forward (one image: batching pads it);
    # world phrases are 2 tokens each
    (single,) = det(images[:1], phrases[:1])
    m = det.model
    text = " . ".join(phrases[0]) + " ."
    with torch.no_grad():
        out = m.model(m.nest([m.prepare(images[0])]), captions=[text])
    probs = out["pred_logits"][0].sigmoid()  # (900, 256)
    for k, pb in enumerate(single):
        expect = probs[:, 1 + 3 * k:3 + 3 * k].mean(dim=1)
        assert pb.scores == pytest.approx(sorted(expect.tolist(), reverse=True)[:100], abs=1e-5)
