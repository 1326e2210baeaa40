"""Tiny offline fixtures: a word-level BERT tokenizer, a random tiny BERT teacher, a GLUE-style folder.

SST-2-like rows carry a learnable signal (positive and negative words) so a few steps move the metric.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor", "sad"]
FILLER = ["the", "a", "movie", "film", "is", "was", "plot", "very", "and", "it", "story", "acting"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer() -> BertTokenizer:
    words = SPECIAL + POSITIVE + NEGATIVE + FILLER
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def write_tiny_teacher(folder: Path, *, layers: int = 4, hidden: int = 32, heads: int = 4,
                       num_labels: int = 2, with_head: bool = False, seed: int = 0) -> Path:
    """A random tiny BERT saved as a model folder with tokenizer (BertModel: no task head unless asked)."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=hidden * 2, max_position_embeddings=64, num_labels=num_labels)
    model = BertForSequenceClassification(cfg) if with_head else BertModel(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def sentence(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if positive else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def write_sst2(glue_dir: Path, n_train: int = 96, n_dev: int = 32, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder = Path(glue_dir) / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [(sentence(rng, i % 2 == 0), i % 2) for i in range(n)]
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return Path(glue_dir)


def write_corpus(path: Path, n: int = 200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    Path(path).write_text("\n".join(sentence(rng, rng.random() < 0.5) for _ in range(n)) + "\n")
    return Path(path)
