"""The wiring proof in CI, with a control that can fail, and the frozen-LM guarantee of the paper's recipe.

The data are chosen so that the text alone cannot answer: every image holds the SAME three objects
(red ball, blue box, green kite) at different places, so each question ("Where is the red ball?") has
as many answers as there are images. A model that ignores the image can at best learn one box per
phrase. The same model, trained at the same budget on the same pairs with every image replaced by a
blank grey one, measures exactly that; real images must beat it by a wide margin.
(The earlier 8-image test reached Acc@0.5 0.81 with blank images: 13 of its 17 phrases occurred once.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers_train import one_thread  # noqa: F401  (one torch thread: the tiny matrices only spin on two)

from grounding.world import WorldImage, write_truth_shards
from model.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from learnlib import SAME_KINDS as KINDS, same_objects_world  # noqa: E402  (shared with benchmarks/learn_wiring.py)


@pytest.fixture(scope="module")
def tiny_model_dirs(tmp_path_factory):
    from model import testing as tiny

    root = tmp_path_factory.mktemp("wiring_model")
    lm, vit = root / "lm", root / "vit"
    tiny.write_tokenizer(lm)
    tiny.write_llama(lm, hidden_size=128, num_layers=2)
    tiny.write_clip_vision(vit, image_size=32, patch_size=8, hidden_size=64, num_layers=3)
    return str(lm), str(vit)


def overfit(tmp_path, name: str, world: list[WorldImage], dirs: tuple[str, str], steps: int = 300) -> dict:
    from model.cogvlm import VisualExpertConfig

    shards = tmp_path / f"{name}-shards"
    write_truth_shards(world, shards, rows_per_shard=8)
    mcfg = VisualExpertConfig(lm=dirs[0], vision=dirs[1], freeze_lm=False, freeze_vision=False, lm_lr_mult=1.0)
    cfg = TrainConfig.from_flat(out_dir=str(tmp_path / name), shards=[str(shards)], max_steps=steps, batch_size=8, lr=3e-3,
                      warmup_steps=25, min_lr_ratio=0.05, weight_decay=0.0, max_length=48, save_every=0,
                      eval_shards=[str(shards)], eval_every=steps, eval_limit=100, progress=False, seed=0)
    return train(cfg, model_config=mcfg)["last_eval"]


def test_same_objects_world_answers_depend_on_the_image():
    """The property the test relies on: one phrase, many different boxes; blank images keep boxes and text."""
    world, blank = same_objects_world(8), same_objects_world(8, blank=True)
    for colour, shape in KINDS:
        boxes = {o.box for im in world for o in im.objects if o.phrase == f"{colour} {shape}"}
        assert len(boxes) == 8
    assert [(im.caption, [o.box for o in im.objects]) for im in world] == \
           [(im.caption, [o.box for o in im.objects]) for im in blank]
    assert len(set(blank[0].render().getdata())) == 1 and len(set(world[0].render().getdata())) > 3


def test_wiring_real_images_beat_blank_images(tmp_path, tiny_model_dirs):
    """A from-scratch tiny model (everything trainable) memorises 8 images x 3 phrases = 24 REC pairs;
    with blank images (same text, same boxes, same budget) it can only learn one box per phrase.
    A cut vision path, a wrong label shift, mask, position id, box normalisation or parser fails this.
    Measured (300 steps each, ~15 s CPU each): real 1.0, blank 0.125."""
    real = overfit(tmp_path, "real", same_objects_world(8), tiny_model_dirs)
    blank = overfit(tmp_path, "blank", same_objects_world(8, blank=True), tiny_model_dirs)
    assert real["n"] == blank["n"] == 24
    assert real["acc@0.5"] >= blank["acc@0.5"] + 0.4, (real, blank)
    assert real["acc@0.5"] >= 0.7, real


def test_frozen_lm_text_only_logits_bit_identical_after_training(tmp_path, tiny_model_dirs):
    """CogVLM's promise: with the LM frozen, training the experts and adapter leaves text-only behaviour
    exactly as it was (same logits, bit for bit), while the image path did change."""
    from model.cogvlm import VisualExpertConfig, VisualExpertForCausalLM

    shards = tmp_path / "shards"
    write_truth_shards(same_objects_world(4), shards, rows_per_shard=4)
    mcfg = VisualExpertConfig(lm=tiny_model_dirs[0], vision=tiny_model_dirs[1], freeze_lm=True, freeze_vision=False)
    before_model = VisualExpertForCausalLM.from_config(mcfg).eval()
    texts = ["Question: Where is the red ball? Answer: [[100,200,300,400]]", "A red ball, a blue box and a green kite"]
    ids, mask = before_model.tokenize_prompts(texts, add_eos=True)
    image = before_model.preprocess([same_objects_world(1)[0].render()] * 2)
    with torch.no_grad():
        before_text, before_image = before_model(ids, mask).logits, before_model(ids, mask, pixel_values=image).logits
    cfg = TrainConfig.from_flat(out_dir=str(tmp_path / "run"), shards=[str(shards)], max_steps=5, batch_size=4, lr=1e-2,
                      warmup_steps=0, save_every=0, progress=False)
    model = train(cfg, model_config=mcfg)["model"].eval()
    with torch.no_grad():
        after_text, after_image = model(ids, mask).logits, model(ids, mask, pixel_values=image).logits
    assert torch.equal(before_text, after_text)
    assert not torch.allclose(before_image, after_image, atol=1e-4)
