"""The oracle-perception probe (benchmarks/probe_oracle_perception.py): its image tokens carry exactly the
objects of the picture (box, colour, shape; nothing in the box-only arm), they reach the frozen LM's answer
through the visual experts, and a run writes every arm with the frozen LM's text logits untouched."""
import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import learnlib  # noqa: E402
import probe_oracle_perception as pop  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Seed 0's splits, pretrained LM and tower, built the way the README's command builds them
    (learn_generalise.py --prepare-only), at toy sizes."""
    import learn_generalise as lg

    root = tmp_path_factory.mktemp("oracle")
    sizes = ["--train-images", "24", "--dev-images", "6", "--test-images", "6"]
    built = lg.main(["--prepare-only", "--seeds", "0", "--work", str(root), *sizes, "--pretrain-steps", "3",
                     "--pretrain-lookup", "0.5", "--lm-hidden", "32", "--vision-hidden", "32", "--vision-layers", "1"])
    lm, vit = built[0]
    assert (Path(lm) / "pretrain.json").exists() and json.loads((Path(lm) / "pretrain.json").read_text())["steps"] == 3
    data = learnlib.proof_data(root, 0, {"train": 24, "dev": 6, "test": 6})   # the folders it built
    return root, data, lm, vit


def test_objects_are_read_from_the_truth_shards(setup):
    _, data, _, _ = setup
    objs = pop.world_objects(data["train_multi"])
    assert len(objs) == 24 and all(2 <= len(v) <= 4 for v in objs.values())
    box, colour, shape = next(iter(objs.values()))[0]
    assert all(0 <= v <= 1 for v in box) and box[0] < box[2] and box[1] < box[3]


def test_features_hold_each_object_once_and_attributes_only_when_asked():
    objs = [((0.1, 0.2, 0.3, 0.4), "red", "ball"), ((0.5, 0.5, 0.9, 0.8), "blue", "kite")]
    feats, present = pop.featurize(objs, True, random.Random(0))
    assert present == [True, True, False, False]
    rows = {tuple(f[:4]): f[4:] for f in feats[:2]}
    assert rows[(0.1, 0.2, 0.3, 0.4)] == [1, 0, 0, 0, 0, 0, 1, 0, 0, 0]   # red, ball
    assert rows[(0.5, 0.5, 0.9, 0.8)] == [0, 0, 1, 0, 0, 0, 0, 0, 1, 0]   # blue, kite
    bare, _ = pop.featurize(objs, False, random.Random(0))
    assert {len(f) for f in bare} == {4}                                    # no colour, no shape
    fourier, _ = pop.featurize(objs, False, random.Random(0), fourier=True)
    assert {len(f) for f in fourier} == {4 + 4 * 2 * len(pop.FREQS)}


def test_oracle_tokens_reach_the_frozen_lms_answer(setup):
    """Another box for the same question changes the logits at the answer: the oracle's tokens are read
    (a cut path would leave them equal)."""
    from model.cogvlm import VisualExpertConfig, VisualExpertForCausalLM

    _, _, lm, vit = setup
    model = VisualExpertForCausalLM.from_config(VisualExpertConfig(lm=lm, vision=vit, freeze_lm=True,
                                                                   freeze_vision=True)).eval()
    oracle = pop.OracleTower(14, model.lm_head.weight.shape[1], tokens_per_object=2)
    ids, mask = model.tokenize_prompts(["Question: Where is the red ball? Answer:"])

    def logits(box):
        f, p = pop.featurize([(box, "red", "ball")], True, random.Random(0))
        emb = oracle(torch.tensor([f]), torch.tensor([p]))
        assert emb.shape == (1, pop.MAX_OBJECTS * 2, model.lm_head.weight.shape[1])
        with torch.no_grad():
            return model(ids, mask, image_embeds=emb).logits[0, -1]

    assert (logits((0.1, 0.1, 0.4, 0.4)) - logits((0.6, 0.5, 0.9, 0.9))).abs().max() > 1e-4


def test_a_run_writes_every_arm_and_leaves_the_frozen_lm_untouched(setup, tmp_path):
    root, data, lm, vit = setup
    out = tmp_path / "oracle.json"
    def seeded(path: str) -> str:  # learn_generalise's folder names with the seed as {seed}
        rel = path[len(str(root)):]
        return str(root) + rel.replace("-s0", "-s{seed}").replace("-w100", "-w10{seed}")

    result = pop.main(["--lm", seeded(lm), "--vit", seeded(vit), "--train", seeded(data["train_multi"]),
                       "--dev", seeded(data["dev_multi"]), "--test", seeded(data["test_multi"]),
                       "--train-one", seeded(data["train_one"]), "--dev-one", seeded(data["dev_one"]),
                       "--stage1-steps", "3", "--stage2-steps", "4", "--batch-size", "4", "--seeds", "0",
                       "--variants", "visual_expert", "--features", "box+attributes", "box", "--shuffle",
                       "--lm-trained", "--fourier", "--jobs", "2", "--out", str(out)])
    assert "{seed}" in result["command"] and result["baselines"]["0"]["lm"] == Path(lm).name
    assert json.loads(out.read_text()) == result
    arms = {(r["variant"], r["features"], r["shuffled"], r["lm_frozen"]): r for r in result["runs"]}
    assert set(arms) == {("visual_expert", "box+attributes", False, True), ("visual_expert", "box", False, True),
                         ("visual_expert", "box+attributes", True, True),
                         ("visual_expert", "box+attributes", False, False)}
    for key, r in arms.items():
        assert r["text_only_logits_identical"] is key[3]       # frozen: bit-identical; trained: moved
        assert r["dev"]["n"] > 0 and r["test"]["n"] > 0 and r["stage1"]["dev_one_object"]["n"] == 6
        assert r["stage1"]["steps"] == 3 and r["stage2"]["steps"] == 4
    assert set(result["summary"]) == {"visual_expert/box+attributes", "visual_expert/box",
                                      "visual_expert/box+attributes/shuffled",
                                      "visual_expert/box+attributes/lm_trained"}
    assert result["baselines"]["0"]["test"]["random_object_acc@0.5"] > 0.2
