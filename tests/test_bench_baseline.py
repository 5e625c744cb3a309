"""Smoke tests of the re-created original pipeline, on a tiny random GPT-2 built offline."""

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lorafit.bench.baseline import (
    SideResult,
    baseline_eval_samples_per_second,
    baseline_generation_tokens_per_second,
    build_baseline_dataset,
    run_baseline,
)

# 24 texts of exactly 40 bytes = 40 tokens each, so real tokens / slots must be exactly 40 / 64.
TEXTS = [f"Quote {i:02d}: be yourself; all else is taken" for i in range(24)]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A byte-level GPT-2 tokenizer (256 bytes + eos, no merges) and a 2-layer random GPT-2."""
    root = tmp_path_factory.mktemp("tiny")
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(root / "tok")
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=len(tokenizer), n_positions=128, bos_token_id=eos, eos_token_id=eos
    )
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    return str(root / "model"), str(root / "tok")


def test_dataset_pads_to_64_and_scores_pads(tiny_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[1])
    ds = build_baseline_dataset(tokenizer, ["short", "x" * 500])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    for row in ds:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"]) == 64
        assert row["labels"] == row["input_ids"]  # pads included, never -100
    short = ds[0]
    pads = [i for i, m in enumerate(short["attention_mask"]) if m == 0]
    assert len(pads) == 64 - len("short")  # right padding, one token per byte
    assert all(short["labels"][i] == tokenizer.eos_token_id for i in pads)
    assert sum(ds[1]["attention_mask"]) == 64  # truncated, no padding


def test_run_baseline_and_throughput_helpers(tiny_dirs):
    assert {len(t) for t in TEXTS} == {40}
    result, model = run_baseline(*tiny_dirs, TEXTS, warmup_steps=1, device="cpu")
    assert isinstance(result, SideResult) and result.name == "baseline" and result.device == "cpu"
    assert result.optimizer_steps == 24 // 8 - 1
    assert result.examples == result.optimizer_steps * 8
    assert result.wall_seconds > 0
    assert 0 < result.real_tokens_per_second <= result.token_slots_per_second
    assert result.real_tokens_per_second / result.token_slots_per_second == pytest.approx(40 / 64)
    assert result.peak_memory_bytes > 0
    assert model.peft_config["default"].r == 8

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[1])
    tokenizer.pad_token = tokenizer.eos_token
    assert baseline_eval_samples_per_second(model, tokenizer, TEXTS[:10], "cpu") > 0
    assert baseline_generation_tokens_per_second(model, tokenizer, ["The secret", "Hi"] * 2, 2, max_new_tokens=5) > 0
    assert tokenizer.padding_side == "right"  # restored after left-padded generation
