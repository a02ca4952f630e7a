"""learn_pseudo: the pseudo arm repeats the truth arm's exact config, and the tax is computed per seed."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import learn_generalise  # noqa: E402
import learn_pseudo  # noqa: E402


def test_pseudo_arm_repeats_the_truth_config_changing_only_the_stage_two_shards():
    truth = learn_generalise.build_parser().parse_args(
        ["--seeds", "0", "2", "--freeze-lm", "false", "--pretrain-steps", "0", "--lr", "1e-3", "--stage2-steps", "77",
         "--pretrain-lookup", "0.5"])
    config = {k: v for k, v in vars(truth).items()}
    argv = learn_pseudo.pseudo_argv(config, "/x/s{seed}/shards", "/tmp/arm.json")
    arm = learn_generalise.build_parser().parse_args(argv)
    for key in learn_pseudo.SHARED:
        assert getattr(arm, key) == getattr(truth, key), key
    assert arm.variants == ["visual_expert"] and arm.train_shards == "/x/s{seed}/shards"
    assert learn_generalise.overrides(arm, 2) == {"train_multi": "/x/s2/shards"}


def test_tax_is_pseudo_over_truth_on_the_seeds_both_arms_ran():
    def result(accs):
        return {"runs": [{"seed": s, "variant": "visual_expert", "dev": {"acc@0.5": a}, "test": {"acc@0.5": a}}
                         for s, a in accs.items()]}
    out = learn_pseudo.tax(result({0: 0.5, 1: 0.4, 2: 0.3}), result({0: 0.45, 1: 0.2}))
    assert out["test"]["seeds"] == [0, 1]
    assert out["test"]["pseudo_over_truth"] == round(0.65 / 0.9, 4)
    assert out["test"]["per_seed_ratio"] == {"0": 0.9, "1": 0.5}
    assert out["target"]["pseudo_over_truth_test_ge_0.9"] is False
