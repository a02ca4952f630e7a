"""Tiny random-init checkpoints saved with save_pretrained into a session tmp dir (nothing from the hub)."""
from __future__ import annotations

import shutil

import pytest

from model import testing as tiny


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_ckpts")


@pytest.fixture(scope="session")
def tokenizer_dir(ckpt_root):
    return tiny.write_tokenizer(ckpt_root / "tokenizer")


def _lm_dir(ckpt_root, tokenizer_dir, name, write, **kw):
    path = ckpt_root / name
    write(path, **kw)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tokenizer_dir}/{f}", path / f)
    return str(path)


@pytest.fixture(scope="session")
def llama_dir(ckpt_root, tokenizer_dir):
    return _lm_dir(ckpt_root, tokenizer_dir, "llama", tiny.write_llama)


@pytest.fixture(scope="session")
def lm_dirs(ckpt_root, tokenizer_dir, llama_dir):
    """Every supported LM family, incl. rope scaling variants (name -> dir)."""
    return {
        "llama": llama_dir,
        "llama-linear-rope": _lm_dir(ckpt_root, tokenizer_dir, "llama_linear", tiny.write_llama,
                                     rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        "llama3-rope-tied": _lm_dir(ckpt_root, tokenizer_dir, "llama3", tiny.write_llama, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64}),
        "llama-yarn-rope": _lm_dir(ckpt_root, tokenizer_dir, "llama_yarn", tiny.write_llama,
                                   rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                    "original_max_position_embeddings": 256}),
        "qwen2": _lm_dir(ckpt_root, tokenizer_dir, "qwen2", tiny.write_qwen2),
        "mistral": _lm_dir(ckpt_root, tokenizer_dir, "mistral", tiny.write_mistral),
    }


@pytest.fixture(scope="session")
def clip_dir(ckpt_root):
    return tiny.write_clip_vision(ckpt_root / "clip")


@pytest.fixture(scope="session")
def siglip_dir(ckpt_root):
    return tiny.write_siglip_vision(ckpt_root / "siglip")
