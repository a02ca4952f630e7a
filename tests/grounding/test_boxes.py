
import pytest
from hypothesis import given, strategies as st

from grounding.boxes import (BoxParseError, box_iou, denormalize_box, format_answer, format_boxes,
                             format_question, grounded_caption, normalize_box, parse_boxes, try_parse_boxes)


def test_normalize_rule_floor_clamp_order():
    # 640x480: x scale 1000/640 = 1.5625, y scale 1000/480
    assert normalize_box((64, 48, 320, 240), 640, 480) == (100, 100, 500, 500)
    assert normalize_box((0, 0, 640, 480), 640, 480) == (0, 0, 999, 999)          # right edge clamps to 999
    assert normalize_box((-5, -5, 700, 500), 640, 480) == (0, 0, 999, 999)        # out of image clamps
    assert normalize_box((320, 240, 64, 48), 640, 480) == (100, 100, 500, 500)    # corners reordered
    assert normalize_box((0.639, 0, 1.28, 1), 640, 480) == (0, 0, 2, 2)           # floor, not round


def test_format_three_digits_and_several_boxes():
    assert format_boxes([(1, 22, 333, 999)]) == "[[001,022,333,999]]"
    assert format_boxes([(1, 2, 3, 4), (10, 20, 30, 40)]) == "[[001,002,003,004;010,020,030,040]]"
    with pytest.raises(ValueError):
        format_boxes([(0, 0, 1000, 5)])
    with pytest.raises(ValueError):
        format_boxes([])


def test_question_answer_templates():
    assert format_question("the red ball") == "Question: Where is the red ball?"
    assert format_question("dog") == "Question: Where is the dog?"
    assert format_answer([(1, 2, 3, 4)]) == "Answer: [[001,002,003,004]]"


@pytest.mark.parametrize("text,reason", [
    ("no boxes here", "no '[[' in output"),
    ("[[001,002,003,004", "unterminated box group (no ']]')"),
    ("[[001,002,003]]", "a box needs 4 coordinates, got 3"),
    ("[[1,2,3,4]]", "coordinates must be three digits 000-999"),
    ("[[001,002,003,0040]]", "coordinates must be three digits 000-999"),
    ("[[500,500,100,900]]", "box corners out of order (need x0<=x1, y0<=y1)"),
    ("[[001,002,003,004;]]", "a box needs 4 coordinates, got 1"),
    ("[[-01,002,003,004]]", "coordinates must be three digits 000-999"),
])
def test_parse_malformed(text, reason):
    with pytest.raises(BoxParseError) as e:
        parse_boxes(text)
    assert e.value.reason == reason
    assert try_parse_boxes(text) == (None, reason)


def test_parse_with_text_and_spaces():
    assert parse_boxes("Answer: [[ 001, 002,003,004 ; 005,006,007,008 ]] done") == [(1, 2, 3, 4), (5, 6, 7, 8)]


@given(st.integers(1, 5000), st.integers(1, 5000), st.data())
def test_round_trip_bounds(w, h, data):
    xs = sorted(data.draw(st.lists(st.floats(0, w), min_size=2, max_size=2)))
    ys = sorted(data.draw(st.lists(st.floats(0, h), min_size=2, max_size=2)))
    box = (xs[0], ys[0], xs[1], ys[1])
    nb = normalize_box(box, w, h)
    assert all(0 <= v <= 999 for v in nb) and nb[0] <= nb[2] and nb[1] <= nb[3]
    assert parse_boxes(format_answer([nb])) == [nb]                    # text round trip is exact
    px = denormalize_box(nb, w, h)
    for orig, back, size in zip(box, px, (w, h, w, h)):                # pixel round trip: within one bin
        assert abs(orig - back) <= size / 1000 + 1e-6
    assert normalize_box(px, w, h) == nb                               # bin centres map to themselves


def test_iou_hand_computed():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0


def test_grounded_caption_inserts_after_spans():
    cap = "a dog on a mat"
    out = grounded_caption(cap, [(11, 14, [(1, 2, 3, 4)]), (0, 5, [(5, 6, 7, 8), (9, 9, 9, 9)])])
    assert out == "a dog [[005,006,007,008;009,009,009,009]] on a mat [[001,002,003,004]]"


def test_prompt_and_target_split():
    from grounding.boxes import prompt_and_target
    assert prompt_and_target("Question: Where is the dog?", "Answer: [[001,002,003,004]]") == (
        "Question: Where is the dog? Answer:", " [[001,002,003,004]]")
    assert prompt_and_target("Question: Describe the image.", "Answer: a dog") == (
        "Question: Describe the image. Answer:", " a dog")
