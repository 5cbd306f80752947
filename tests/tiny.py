"""Tiny models and data the tests build on the spot."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM


def tiny_bert_classifier(folder: Path, tokenizer_dir: Path, num_labels: int, dropout: float = 0.1) -> Path:
    """A randomly initialised 1-layer BERT classifier (width 32) saved with ``tokenizer_dir``'s tokenizer.

    ``dropout`` 0: batches split differently (processes, accumulation) then train alike.
    """
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, num_labels=num_labels, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def tiny_llama_lm(folder: Path, tokenizer_dir: Path) -> Path:
    """A randomly initialised 1-layer Llama (width 32) over ``tokenizer_dir``'s whole vocabulary, saved with it."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def reviews_csv(path: Path) -> Path:
    """40 labelled texts (``text``, ``label`` pos / neg, alternating) as CSV."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(40):
            writer.writerow([("great fun" if i % 2 else "dull and slow") + f" {i}", "pos" if i % 2 else "neg"])
    return path


class Tokens(torch.utils.data.Dataset):
    """A fixed, learnable language: each sequence counts up from a random start (mod vocab)."""

    def __init__(self, n: int = 32, length: int = 12, vocab: int = 96) -> None:
        starts = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
