"""Test and demo fixtures of the grounding side: a tiny random-init GroundingDINO (~0.5 M parameters)
with an offline BERT tokenizer whose vocabulary keeps the bert-base-uncased ids GroundingDINO hard-codes.
Nothing comes from the model hub; nothing here is used by a real run.

``BoxDetector(DetectorConfig(model=save_tiny_detector(path)))`` loads what :func:`save_tiny_detector` writes.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_WORDS = (
    # the synthetic world: colours, shapes, backgrounds, caption templates
    "red green blue yellow purple orange ball box kite cone white grey beige black background photo "
    "of stock picture showing table in studio and on a an the "
    # common caption words
    "man woman person people boy girl child dog cat horse bird car bus tree sky grass water street "
    "building shirt hat hand face head with at near next to is are his her their small large big "
    "little old young brown pink gray dark light front top left right side two three one some this that"
).split()


def tiny_vocab() -> list[str]:
    """A WordPiece vocab that keeps bert-base-uncased's ids for [PAD]=0, [UNK]=100, [CLS]=101,
    [SEP]=102, [MASK]=103, '.'=1012, '?'=1029; world and common words are whole tokens, and single
    characters (plus ``##`` pieces) spell out any other ASCII word instead of [UNK]."""
    chars = [chr(c) for c in range(33, 127) if chr(c) not in ".?" and not chr(c).isupper()]
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokens = list(dict.fromkeys(TINY_WORDS + chars + pieces))
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    slots = {1012: ".", 1029: "?"}
    it = iter(tokens)
    while len(vocab) < 1030:
        i = len(vocab)
        vocab.append(slots.get(i) or next(it, None) or f"[unused{i}]")
    vocab.extend(it)
    from grounding.detect import BERT_SPECIAL_IDS
    assert [vocab.index(t) for t in BERT_SPECIAL_IDS] == list(BERT_SPECIAL_IDS.values())
    return vocab


def tiny_detector_config(vocab_size: int, max_text_len: int = 256):
    """~0.5 M parameters: Swin embed 16, depths 1, BERT hidden 32, d_model 32, 20 queries."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    return GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64),
        d_model=32, num_queries=20, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, max_text_len=max_text_len)


def save_bert_tokenizer(path: str):
    """The offline uncased BERT tokenizer over :func:`tiny_vocab`, saved to ``path`` (any transformers)."""
    from transformers import BertTokenizer

    os.makedirs(path, exist_ok=True)
    vocab_file = os.path.join(path, "vocab.txt")
    Path(vocab_file).write_text("\n".join(tiny_vocab()) + "\n")
    tokenizer = BertTokenizer(vocab_file, do_lower_case=True)
    tokenizer.save_pretrained(path)
    return tokenizer


def save_tokenizer_and_processor(path: str, shortest_edge: int = 800, longest_edge: int = 1333):
    """The offline BERT tokenizer and GroundingDINO's PIL image processor, saved to ``path``."""
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil, GroundingDinoProcessor

    tokenizer = save_bert_tokenizer(path)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": shortest_edge, "longest_edge": longest_edge}),
        tokenizer=tokenizer)
    processor.save_pretrained(path)
    return tokenizer


def save_tiny_detector(path: str, seed: int = 0, shortest_edge: int = 224, longest_edge: int = 320,
                       max_text_len: int = 256) -> str:
    """Save a tiny random-init GroundingDINO (+ offline tokenizer, image processor) to ``path``.

    ``BoxDetector(DetectorConfig(model=path))`` loads it; images are resized to
    ``shortest_edge``/``longest_edge`` (small, for speed). Returns ``path``.
    """
    from transformers import GroundingDinoForObjectDetection

    tokenizer = save_tokenizer_and_processor(path, shortest_edge, longest_edge)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(tiny_detector_config(len(tokenizer), max_text_len)).eval()
    model.save_pretrained(path)
    return path


def oriented_jpeg(orientation: int = 6) -> bytes:
    """A phone-style JPEG: 300x200 stored pixels, a red block in the stored top-left corner, EXIF Orientation
    ``orientation`` (6: "rotate 90 degrees clockwise to display": displayed 200x300 with the block top-right)."""
    import io

    from PIL import Image

    im = Image.new("RGB", (300, 200), (128, 128, 128))
    im.paste((220, 20, 20), (0, 0, 60, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation   # the EXIF Orientation tag
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()
