"""Round-5 pilot driver: one (seed, variant) run of benchmarks/learn_generalise.py in this process, with an
optional start for the image tokens (env PILOT_INIT): "gist" gives the adapter's output projection a bias
initialised to the embedding of the LM's gist token (learn_generalise.GIST), so that image tokens begin as
the memory tokens a gist-pretrained LM reads boxes from; unset: learn_generalise as is.

    PILOT_INIT=gist python benchmarks/results/pilots/round5/pilot.py <learn_generalise flags> --task 1:visual_expert
"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import learn_generalise as lg  # noqa: E402
from model import cogvlm  # noqa: E402

mode = os.environ.get("PILOT_INIT", "")
orig = cogvlm.VisualExpertForCausalLM._init_adapter


@torch.no_grad()
def patched(self):
    orig(self)
    if "gist" in mode:
        old = self.adapter.down_proj
        new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        new.weight.copy_(old.weight)
        new.bias.copy_(self.model.embed_tokens.weight[self.tokenizer.convert_tokens_to_ids(lg.GIST)])
        self.adapter.down_proj = new


cogvlm.VisualExpertForCausalLM._init_adapter = patched
argv = sys.argv[1:]
args = lg.build_parser().parse_args(argv)
args.argv = argv
seed, variant = args.task.split(":")
r = lg.run_one(int(seed), variant, args)
print(json.dumps({k: v for k, v in r.items() if k in ("dev", "test", "dev_one_object")}))
