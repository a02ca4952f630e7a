"""The frozen-LM probe: the linear probe separates what is separable and not what is not, and the
answer-slot states are read where the box is written (a random LM's embeddings there hold no colour)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import probe_frozen_lm  # noqa: E402
from model.testing import write_llama, write_tokenizer  # noqa: E402


def test_linear_probe_reads_a_planted_label_and_not_noise():
    torch.manual_seed(0)
    y = torch.randint(0, 6, (600,))
    noise = torch.randn(600, 32)
    planted = noise.clone()
    planted[:, :6] += 6.0 * torch.nn.functional.one_hot(y, 6)  # the label written into 6 directions
    assert probe_frozen_lm.linear_probe(planted, y, n_fit=450, seed=0) >= 0.95
    assert probe_frozen_lm.linear_probe(noise, y, n_fit=450, seed=0) <= 0.35   # chance is 1/6


def test_answer_slot_embeddings_carry_no_colour(tmp_path):
    """Layer 0 at the answer slots is the digits' own embeddings: the question's colour is not there, so
    a probe that read it would be reading the wrong positions."""
    write_tokenizer(tmp_path)
    write_llama(tmp_path, hidden_size=32, num_layers=1)
    states, y = probe_frozen_lm.answer_slot_states(str(tmp_path), n=200, seed=0)
    assert len(states) == 2 and states[0].shape == (200, 32) and set(y.tolist()) <= set(range(6))
    assert probe_frozen_lm.linear_probe(states[0], y, n_fit=150, seed=0) <= 0.4
