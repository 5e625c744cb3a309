"""Mixtures of sources: caps, stratified validation, chunking, per-source metrics, the Hub at scale,
the tokenisation cache, and the mixture8 / mixture8-offline recipes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import make_texts, shared_path
from lorafit.config import DataConfig, SourceConfig, load_config
from lorafit.data import hub as hub_mod
from lorafit.data import tokenize as tok_mod
from lorafit.data.sources import load_corpus, read_source
from lorafit.data.tokenize import _quotas, token_byte_lengths, tokenize_cached, tokenize_texts
from lorafit.errors import DataError, LorafitError

SOURCES = ["wikitext", "tinystories", "ag_news", "yelp_review_full", "cnn_dailymail", "xsum", "squad", "imdb"]


# ---------------------------------------------------------------- three small sources in three formats


def write_sources(root: Path, n: int = 60) -> dict[str, SourceConfig]:
    """A jsonl, a header-less csv (two fields joined) and a txt split on a separator, with junk rows."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for t in make_texts(n, seed=10, max_words=60):
            f.write(json.dumps({"body": t, "id": 1}) + "\n")
        f.write(json.dumps({"body": "   ", "id": 2}) + "\n")  # whitespace only: dropped
    with open(root / "b.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        for i, t in enumerate(make_texts(n, seed=11)):
            w.writerow([i % 4 + 1, f"Title {i}", t])
    pieces = make_texts(n, seed=12, max_words=80)
    (root / "c.txt").write_text("<|sep|>".join(pieces) + "<|sep|>cut tail", encoding="utf-8")
    return {
        "alpha": SourceConfig(path="a.jsonl", text_field="body", max_examples=40),
        "beta": SourceConfig(path="b.csv", csv_header=False, text_field=[1, 2], max_examples=40),
        "gamma": SourceConfig(path="c.txt", separator="<|sep|>", drop_unterminated=True, max_examples=40),
    }


def test_capped_mixture_is_seeded_deterministic_and_stratified(tmp_path):
    sources = write_sources(tmp_path)
    data = DataConfig(sources=sources, root=str(tmp_path), val_fraction=0.15, split_seed=7)
    a, b = load_corpus(data), load_corpus(data)
    assert (a.train_texts, a.val_texts, a.train_sources) == (b.train_texts, b.val_texts, b.train_sources)
    for i in range(3):  # every source capped at 40: ceil(0.15 * 40) = 6 held out, 34 trained on
        assert a.val_sources.count(i) == 6 and a.train_sources.count(i) == 34
    assert "cut tail" not in a.train_texts + a.val_texts and all(t.strip() for t in a.train_texts + a.val_texts)
    assert all(t.startswith("Title ") and "\n" in t for t, s in zip(a.train_texts, a.train_sources) if s == 1)
    other = load_corpus(DataConfig(sources=sources, root=str(tmp_path), val_fraction=0.15, split_seed=8))
    assert sorted(other.train_texts) != sorted(a.train_texts)  # another seed samples other rows
    capped = read_source("alpha", sources["alpha"], str(tmp_path), seed=7)
    full = read_source("alpha", SourceConfig(path="a.jsonl", text_field="body"), str(tmp_path), seed=7)
    assert len(full) == 60 and len(capped) == 40 and set(capped) <= set(full)
    assert capped == [t for t in full if t in set(capped)]  # file order kept


def test_weights_apply_to_training_rows_also_without_stratification(tmp_path):
    sources = write_sources(tmp_path)
    sources["alpha"].weight = 2.0
    for stratify in (True, False):
        corpus = load_corpus(DataConfig(sources=sources, root=str(tmp_path), val_fraction=0.15, stratify=stratify))
        counts = [corpus.train_sources.count(i) for i in range(3)]
        val = [corpus.val_sources.count(i) for i in range(3)]
        assert counts[0] == 2 * (40 - val[0]) and counts[1:] == [40 - v for v in val[1:]], (stratify, counts, val)


def test_a_source_too_small_to_split_is_named(tmp_path):
    (tmp_path / "one.jsonl").write_text('{"text": "only one"}\n', encoding="utf-8")
    data = DataConfig(sources={"tiny": SourceConfig(path=str(tmp_path / "one.jsonl"))}, val_fraction=0.15)
    with pytest.raises(DataError, match="source 'tiny'"):
        load_corpus(data)


# ---------------------------------------------------------------- the validation subset keeps every source


def test_quotas_give_every_source_a_share():
    assert _quotas(np.array([10, 1, 5]), 4).tolist() == [2, 1, 1]
    assert _quotas(np.array([10, 1, 5]), 2).tolist() == [1, 0, 1]  # fewer slots than sources: the largest
    assert _quotas(np.array([10, 1, 5]), 99).tolist() == [10, 1, 5]
    q = _quotas(np.array([36, 15, 15, 22, 19, 16, 15, 15]), 24)
    assert q.sum() == 24 and (q >= 1).all() and q[0] == q.max()


def test_head_per_source_keeps_every_source_in_order(tiny_tokenizer):
    sources = [0] * 30 + [1] * 3 + [2] * 12
    split = tokenize_texts(make_texts(45, seed=5), sources, tiny_tokenizer, 64, "truncate")
    sub = split.head_per_source(9)
    assert len(sub) == 9 and set(sub.sources.tolist()) == {0, 1, 2}
    assert sub.sources.tolist() == sorted(sub.sources.tolist())  # original order kept
    assert np.array_equal(sub.example(0), split.example(0))
    assert split.head_per_source(100) is split


# ---------------------------------------------------------------- length policy on real tokenised text


def _check_chunks(tokenizer, texts: list[str], seq_len: int) -> None:
    whole = tokenize_texts(texts, list(range(len(texts))), tokenizer, 10**9, "truncate")
    chunked = tokenize_texts(texts, list(range(len(texts))), tokenizer, seq_len, "chunk")
    assert not chunked.truncated.any() and chunked.lengths().max() <= seq_len and chunked.lengths().min() >= 2
    assert len(chunked) > len(texts)  # some documents really were split
    for d in range(len(texts)):
        pieces = [chunked.example(i) for i in np.flatnonzero(chunked.sources == d)]
        doc = whole.example(d)
        # Every target token of the document is scored exactly once, EOS included ...
        assert np.array_equal(np.concatenate([p[1:] for p in pieces]), doc[1:])
        for prev, nxt in zip(pieces, pieces[1:]):  # ... and each window starts where the last one ended
            assert prev[-1] == nxt[0]
        # ... and the scored bytes add up to the document's, however the windows cut it.
        assert chunked.n_bytes[chunked.sources == d].sum() == whole.n_bytes[d]
    assert chunked.n_targets == whole.n_targets


def test_chunking_scores_every_token_once_on_tokenised_text(tiny_tokenizer):
    texts = [" ".join(make_texts(12, seed=s)) + " héllo wörld — ünïcode ✓" for s in range(6)]
    _check_chunks(tiny_tokenizer, texts, 40)


def test_chunking_real_articles_with_the_gpt2_tokenizer():
    from transformers import GPT2Tokenizer

    d = shared_path("assets", "gpt2-tokenizer")
    tok = GPT2Tokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    path = shared_path("data", "mixture-samples", "cnn_dailymail", "test.source")
    articles = path.read_text(encoding="utf-8").splitlines()[:8]
    _check_chunks(tok, articles, 512)


def test_scored_bytes_table_matches_decoding(tiny_tokenizer):
    split = tokenize_texts(make_texts(40, seed=8) + ["naïve café ☕ 東京"], [0] * 41, tiny_tokenizer, 64, "truncate")
    assert token_byte_lengths(tiny_tokenizer) is not None
    decoded = [tiny_tokenizer.decode(split.example(i)[1:].tolist(), skip_special_tokens=True) for i in range(len(split))]
    assert split.n_bytes.tolist() == [len(t.encode("utf-8")) for t in decoded]


def test_progress_bar_for_large_inputs(tiny_tokenizer, monkeypatch, capsys):
    import os
    import sys

    # a bar draws only on a terminal with a width (lorafit/console.py): stderr as one, 100 columns wide
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "fileno", lambda: 2, raising=False)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((100, 24)))
    monkeypatch.setattr(tok_mod, "PROGRESS_MIN_TEXTS", 10)
    monkeypatch.setattr(tok_mod, "TOKENIZE_BATCH", 8)
    tokenize_texts(make_texts(30, seed=9), [0] * 30, tiny_tokenizer, 64, "truncate", progress=True)
    assert "tokenising" in capsys.readouterr().err


# ---------------------------------------------------------------- the tokenisation cache


def test_cache_misses_when_policy_tokenizer_or_sources_change(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, monkeypatch):
    from transformers import GPT2Tokenizer

    texts = make_texts(20, seed=4, max_words=60)
    calls = []
    real = tok_mod.tokenize_texts
    monkeypatch.setattr(tok_mod, "tokenize_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert tokenize_cached(texts, [0] * 20, tiny_tokenizer, 32, "truncate", tmp_path)[1] is False
    assert tokenize_cached(texts, [0] * 20, tiny_tokenizer, 32, "truncate", tmp_path)[1] is True
    assert tokenize_cached(texts, [0] * 20, tiny_tokenizer, 32, "chunk", tmp_path)[1] is False
    assert tokenize_cached(texts, [1] * 20, tiny_tokenizer, 32, "truncate", tmp_path)[1] is False
    merges = (tiny_tokenizer_dir / "merges.txt").read_text().splitlines()
    (tmp_path / "merges.txt").write_text("\n".join(merges[:-1]) + "\n")  # same vocabulary, one merge fewer
    other = GPT2Tokenizer(vocab=str(tiny_tokenizer_dir / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    assert tokenize_cached(texts, [0] * 20, other, 32, "truncate", tmp_path)[1] is False
    assert len(calls) == 4


# ---------------------------------------------------------------- the Hub, streamed, without a network


class FakeHub:
    """Stands in for datasets.load_dataset: a large streamed dataset that counts the rows read."""

    def __init__(self, rows: int = 100_000):
        self.rows = rows
        self.read = 0
        self.calls: list[dict] = []

    def row(self, i: int) -> dict:
        if i % 10 == 3:
            return {"title": f"T{i}", "text": "  " if i % 20 == 3 else "", "label": 0}  # empty / whitespace only
        if i % 10 == 5:
            return {"title": f"T{i}", "text": "short", "label": 1}  # under min_chars
        if i % 10 == 7:
            return {"title": "T", "text": "the same text again", "label": 2}  # exact duplicates
        return {"title": f"T{i}", "text": f"document number {i} with some words", "label": 3}

    def __call__(self, path, name=None, split=None, revision=None, streaming=False):
        import datasets

        self.calls.append({"path": path, "name": name, "split": split, "streaming": streaming})
        if not streaming:
            rows = [self.row(i) for i in range(2000)]
            return datasets.Dataset.from_list(rows)

        def generate(n):
            for i in range(n):
                self.read += 1
                yield self.row(i)

        return datasets.IterableDataset.from_generator(generate, gen_kwargs={"n": self.rows})


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    hub = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", hub)
    return hub


def test_capped_hub_source_streams_far_fewer_rows_than_it_has(fake_hub):
    src = SourceConfig(path="someone/big", config="v1", max_examples=100, min_chars=10, dedupe=True)
    texts = read_source("big", src, None, seed=42)
    assert fake_hub.calls[-1] == {"path": "someone/big", "name": "v1", "split": "train", "streaming": True}
    assert len(texts) == 100
    assert fake_hub.read <= hub_mod.SHUFFLE_BUFFER + 400 < fake_hub.rows // 5  # a buffer and the cap, not 100k rows
    assert all(len(t.strip()) >= 10 for t in texts) and len(set(texts)) == 100
    assert texts.count("the same text again") == 1  # dedupe kept one copy
    assert read_source("big", src, None, seed=42) == texts  # deterministic
    assert read_source("big", src, None, seed=1) != texts  # and seeded


def test_uncapped_hub_source_is_not_streamed_and_joins_fields(fake_hub):
    src = SourceConfig(path="someone/small", text_field=["title", "text"], join=": ")
    texts = read_source("small", src, None, seed=42)
    assert fake_hub.calls[-1]["streaming"] is False
    assert texts[0] == "T0: document number 0 with some words"
    assert texts[3] == "T3:   "  # filters judge the joined text: an empty field still leaves the title


def test_hub_missing_field_lists_the_fields(fake_hub):
    for cap in (10, None):
        src = SourceConfig(path="someone/big", text_field="body", max_examples=cap)
        with pytest.raises(DataError, match="no field 'body'.*title, text, label"):
            read_source("big", src, None, seed=0)


def test_hub_stream_failing_midway_names_the_source(monkeypatch):
    import datasets

    def broken(n):
        for i in range(n):
            if i == 50:
                raise ConnectionError("connection reset by peer")
            yield {"text": f"row {i} of the stream"}

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.IterableDataset.from_generator(broken, gen_kwargs={"n": 1000}))
    with pytest.raises(LorafitError, match="(?s)Could not stream source .big.*ConnectionError.*data.sources.big.path"):
        read_source("big", SourceConfig(path="someone/big", max_examples=10), None, seed=0)


def test_hub_and_local_sources_mix_in_one_corpus_and_the_sample_is_cached(fake_hub, tmp_path):
    sources = write_sources(tmp_path)
    sources["hub"] = SourceConfig(path="someone/big", max_examples=50, min_chars=10)
    data = DataConfig(sources=sources, root=str(tmp_path), val_fraction=0.15, cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(data)
    assert corpus.source_names[-1] == "hub" and corpus.val_sources.count(3) == 8 and corpus.train_sources.count(3) == 42
    # A second run reads the streamed sample from the cache: no rows, no network.
    read = fake_hub.read
    again = load_corpus(data)
    assert fake_hub.read == read and len(fake_hub.calls) == 1
    assert (again.train_texts, again.val_texts) == (corpus.train_texts, corpus.val_texts)
    data.sources["hub"].max_examples = 60  # another sample: streamed again
    assert load_corpus(data).train_sources.count(3) == 51 and len(fake_hub.calls) == 2


# ---------------------------------------------------------------- the recipes


def test_mixture8_recipe_has_the_published_settings():
    from importlib import resources

    from lorafit.config import list_recipes
    from lorafit.progress import StepPlan

    cfg = load_config("mixture8")
    expected = {
        "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1", "text"),
        "tinystories": ("roneneldan/TinyStories", None, "text"),
        "ag_news": ("fancyzhx/ag_news", None, "text"),
        "yelp_review_full": ("Yelp/yelp_review_full", None, "text"),
        "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "article"),
        "xsum": ("EdinburghNLP/xsum", None, "document"),
        "squad": ("rajpurkar/squad", None, "context"),
        "imdb": ("stanfordnlp/imdb", None, "text"),
    }
    assert {n: (s.path, s.config, s.text_field) for n, s in cfg.data.sources.items()} == expected
    assert all(s.max_examples == 10_000 and s.split == "train" and s.min_chars >= 1 for s in cfg.data.sources.values())
    d, lo, t = cfg.data, cfg.lora, cfg.train
    assert (d.val_fraction, d.stratify, d.seq_len, d.long_examples) == (0.15, True, 512, "chunk")
    assert (lo.r, lo.alpha, lo.dropout, lo.targets, lo.bias) == (8, 16, 0.1, ["c_attn", "c_proj"], "none")
    assert (t.epochs, t.lr, t.batch_size, t.grad_accum, t.weight_decay, t.warmup_steps) == (3, 3e-4, 4, 8, 0.01, 100)
    n_train = 8 * (10_000 - math.ceil(0.15 * 10_000))
    assert n_train == 68_000 and StepPlan(n_train, 32, t.epochs, None, 0).total_steps == 6_375
    text = resources.files("lorafit.recipes").joinpath("mixture8.yaml").read_text()
    assert text.startswith("# lorafit train mixture8\n") and "data.long_examples=truncate" in text
    assert {"mixture8", "mixture8-offline"} <= set(list_recipes())


@pytest.mark.parametrize("recipe", ["mixture8", "mixture8-offline"])
def test_mixture_recipes_train_811008_parameters(recipe):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorafit.lora import apply_lora

    with torch.device("meta"):  # the real gpt2 shapes without allocating them
        model = apply_lora(GPT2LMHeadModel(GPT2Config()), load_config(recipe).lora)
    assert model.get_nb_trainable_parameters()[0] == 811_008


def test_offline_recipe_matches_mixture8_except_its_sources():
    hub, off = load_config("mixture8"), load_config("mixture8-offline")
    assert off.model == hub.model and off.lora == hub.lora and off.train.lr == hub.train.lr
    same = ("epochs", "lr", "batch_size", "grad_accum", "weight_decay", "warmup_steps", "schedule", "seed")
    assert all(getattr(off.train, k) == getattr(hub.train, k) for k in same)
    for key in ("val_fraction", "split_seed", "stratify", "seq_len", "long_examples"):
        assert getattr(off.data, key) == getattr(hub.data, key)
    assert list(off.data.sources) == SOURCES == list(hub.data.sources)
    assert all(s.max_examples == 100 and not Path(s.path).is_absolute() for s in off.data.sources.values())
    assert off.eval.before_training and off.eval.max_examples is not None


README_COUNTS = {"wikitext": 2891, "tinystories": 2316, "ag_news": 7600, "yelp_review_full": 2000,
                 "cnn_dailymail": 100, "xsum": 1000, "squad": 913, "imdb": 499}


def test_offline_recipe_sources_load_from_the_shared_samples():
    root = shared_path("data", "mixture-samples")
    cfg = load_config("mixture8-offline", [f"data.root={root}"])
    for name, src in cfg.data.sources.items():
        capped = read_source(name, src, cfg.data.root, cfg.data.split_seed)
        assert len(capped) == 100, name
        src.max_examples = None
        assert len(read_source(name, src, cfg.data.root, cfg.data.split_seed)) == README_COUNTS[name], name
    corpus = load_corpus(load_config("mixture8-offline", [f"data.root={root}"]).data)
    assert [corpus.val_sources.count(i) for i in range(8)] == [15] * 8 and len(corpus.train_texts) == 8 * 85


# ---------------------------------------------------------------- end to end: a three-source run


def test_three_source_run_reports_every_source(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import yaml

    from lorafit.cli import main

    sources = write_sources(tmp_path / "data")
    recipe = {
        "model": {"name": str(tiny_model_dir)},
        "data": {
            "root": str(tmp_path / "data"),
            "sources": {n: {k: v for k, v in vars(s).items() if v != getattr(SourceConfig(), k)} for n, s in sources.items()},
            "val_fraction": 0.15, "seq_len": 48, "long_examples": "chunk",
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["c_attn", "c_proj"]},
        "train": {"max_steps": 3, "batch_size": 4, "grad_accum": 2, "lr": 1e-3, "log_every": 1},
        "eval": {"sample_prompt": None, "max_examples": 9},  # a stratified 9: every source still in
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "mix3.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    calls = []
    real = tok_mod.tokenize_texts
    monkeypatch.setattr(tok_mod, "tokenize_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["train", str(path), "--no-progress"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    by = summary["val_by_source"]
    assert list(by) == ["alpha", "beta", "gamma"] and summary["val_examples"] == 9
    for m in by.values():
        assert m["tokens"] > 0 and all(m[k] is not None for k in ("val_loss", "val_ppl", "val_bits_per_token", "val_bits_per_byte"))
    tokens = sum(m["tokens"] for m in by.values())
    assert tokens == summary["val_tokens"]
    assert math.isclose(sum(m["val_loss"] * m["tokens"] for m in by.values()) / tokens, summary["val_loss"], rel_tol=1e-9)
    # bits per byte: total NLL over total bytes, so the per-source bytes add up to the overall bytes
    source_bytes = [m["val_loss"] * m["tokens"] / (math.log(2) * m["val_bits_per_byte"]) for m in by.values()]
    assert math.isclose(sum(source_bytes), summary["val_bytes"], rel_tol=1e-6)
    assert summary["eval_samples_per_second"] > 0 and summary["eval_tokens_per_second"] > 0
    assert (run / "eval_by_source.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| gamma |" in (run / "README.md").read_text()
    assert len(calls) == 2  # train and validation tokenised once each

    # `lorafit eval` reuses the cached tokens and reproduces the per-source numbers.
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(calls) == 2
    for name, m in by.items():
        assert math.isclose(result["val_by_source"][name]["val_loss"], m["val_loss"], rel_tol=1e-6)
        assert result["val_by_source"][name]["tokens"] == m["tokens"]
