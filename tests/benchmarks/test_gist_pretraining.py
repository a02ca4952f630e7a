"""Gist pretraining texts (benchmarks/learn_generalise.py --pretrain-gist): the text reads each listed box
only through its one gist token, and in the image layout it sits where an image-text sample's text sits."""
import random
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import learn_generalise as lg  # noqa: E402
from model.testing import write_llama, write_tokenizer  # noqa: E402

GROUP = [("Question: Where is the red ball?", "Answer: [[100,200,300,400]]"),
         ("Question: Where is the blue box?", "Answer: [[500,600,700,800]]")]


def _lm(tmp_path):
    write_tokenizer(tmp_path)
    write_llama(tmp_path, hidden_size=32, num_layers=2)
    return AutoTokenizer.from_pretrained(str(tmp_path)), LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()


def test_image_layout_positions_match_an_image_text_sample(tmp_path):
    tok, _ = _lm(tmp_path)
    ids, labels, pos, seg = lg.gist_row(GROUP, random.Random(0), tok, 128, layout="image")
    gists = [i for i, s in enumerate(seg) if s < 0]
    text = [i for i, s in enumerate(seg) if s == lg.QA_SEGMENT]
    assert len(gists) == 2 and all(ids[i] == tok.convert_tokens_to_ids(lg.GIST) for i in gists)
    assert {pos[i] for i in gists} == {1}                       # one position id, the image tokens' one
    assert [pos[i] for i in text] == list(range(2, 2 + len(text)))  # text from 2 on, as after an image
    assert all(labels[i] == -100 for i in range(len(ids)) if seg[i] != lg.QA_SEGMENT)  # only answers supervised
    assert tok.decode([ids[i] for i in text if labels[i] != -100]).count("[[") == 2


def test_text_reads_an_entry_only_through_its_gist(tmp_path):
    """Changing a digit of a listed box moves the answer logits; with the text->gist attention cut it
    moves nothing: there is no path from the listed boxes to the text except the gist tokens."""
    tok, lm = _lm(tmp_path)
    ids, _, pos, seg = lg.gist_row(GROUP, random.Random(0), tok, 128, layout="image")
    changed = list(ids)
    changed[ids.index(tok.convert_tokens_to_ids("1"))] = tok.convert_tokens_to_ids("9")  # inside an entry
    mask = lg.gist_mask(torch.tensor([seg]))
    text = torch.tensor([i for i, s in enumerate(seg) if s == lg.QA_SEGMENT])
    gists = torch.tensor([i for i, s in enumerate(seg) if s < 0])
    cut = mask.clone()
    cut[0, 0, text[:, None], gists[None]] = torch.finfo(torch.float32).min

    def text_logits(row, m):
        with torch.no_grad():
            return lm(input_ids=torch.tensor([row]), attention_mask=m, position_ids=torch.tensor([pos])).logits[0, text]

    assert (text_logits(ids, mask) - text_logits(changed, mask)).abs().max() > 1e-4
    assert torch.equal(text_logits(ids, cut), text_logits(changed, cut))
