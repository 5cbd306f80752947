"""hf_tbn.demos.train's data for a language model: texts as whole blocks, labels that keep EOS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainingArguments

from hf_tbn.demos.train import group_texts, make_trainer, tokenize


def rows(*ids: list[int]) -> Dataset:
    return Dataset.from_dict({"input_ids": list(ids), "attention_mask": [[1] * len(r) for r in ids]})


def test_texts_end_with_eos_and_are_cut_into_whole_blocks() -> None:
    data = rows([5, 6, 7], [8, 2], [9])  # EOS = 2; the second text ends with it already
    blocks = group_texts(data, 3, eos_token_id=2)  # the stream 5 6 7 2 8 2 9 2: its tail 9 2 is dropped
    assert blocks["input_ids"] == [[5, 6, 7], [2, 8, 2]]
    assert blocks["labels"] == blocks["input_ids"]
    assert blocks["attention_mask"] == [[1, 1, 1], [1, 1, 1]]
    assert group_texts(data, 4, eos_token_id=None)["input_ids"] == [[5, 6, 7, 8]]  # no EOS: the texts as they are


def test_too_little_text_or_too_short_a_block_is_refused() -> None:
    with pytest.raises(ValueError, match="8 tokens make no whole block of block_size 9"):
        group_texts(rows([5, 6, 7], [8, 2], [9]), 9, eos_token_id=2)
    with pytest.raises(ValueError, match="block_size 1"):
        group_texts(rows([5, 6, 7]), 1, eos_token_id=2)


def test_language_model_labels_are_the_ids_with_only_padding_masked(smollm2_dir: Path, tmp_path: Path) -> None:
    """The pad token is EOS (as for SmolLM2): an EOS the text ends with stays a label, padding does not."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = tokenize(Dataset.from_dict({"text": ["one fortune", "a longer fortune than that"]}), tokenizer, None,
                     "text")
    assert texts["labels"] == texts["input_ids"]
    eos = tokenizer.eos_token_id
    ended = [{k: [*v, eos] for k, v in row.items()} for row in texts]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    trainer = make_trainer(model, TrainingArguments(tmp_path, report_to=[], use_cpu=True), "causal-lm", tokenizer,
                           texts)
    assert tokenizer.pad_token_id == eos
    batch = trainer.data_collator(ended)
    short, long = (len(r["input_ids"]) for r in ended)
    assert batch["labels"][0, :short].tolist() == ended[0]["input_ids"]  # its EOS included
    assert torch.all(batch["labels"][0, short:] == -100) and short < long
    assert batch["labels"][1].tolist() == ended[1]["input_ids"]
