"""Round-4 pilot driver: one (seed, variant) run of benchmarks/learn_generalise.py in this process, with
an optional change to how the visual experts start (env PILOT_INIT: "zv" zeroes the experts' value
projections, "zk" their key projections, "zo" their output projections; unset: learn_generalise as is).

    PILOT_INIT=zv python benchmarks/results/pilots/round4/pilot.py <learn_generalise flags> --task 1:visual_expert
"""
import os, sys, json
from pathlib import Path
ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(ROOT))
import torch
from model import cogvlm
import learn_generalise as lg
mode = os.environ.get("PILOT_INIT", "")
orig = cogvlm.VisualExpertForCausalLM.load_lm_state_dict
@torch.no_grad()
def patched(self, sd):
    orig(self, sd)
    if self.config.shallow:
        return
    for layer in self.model.layers:
        a = layer.self_attn
        H, Hkv, hd = a.num_heads, a.num_kv_heads, a.head_dim
        w = a.vision_expert_query_key_value.weight
        if "zv" in mode:
            w[(H + Hkv) * hd:].zero_()
        if "zk" in mode:
            w[H * hd:(H + Hkv) * hd].zero_()
        if "zo" in mode:
            a.vision_expert_dense.weight.zero_()
cogvlm.VisualExpertForCausalLM.load_lm_state_dict = patched
argv = sys.argv[1:]
args = lg.build_parser().parse_args(argv); args.argv = argv
seed, variant = args.task.split(":")
r = lg.run_one(int(seed), variant, args)
print(json.dumps({k: v for k, v in r.items() if k in ("dev", "test", "dev_one_object")}))
