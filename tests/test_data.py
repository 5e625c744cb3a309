"""Sources, split, caps, tokenisation and its cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_texts, shared_path
from lorafit.config import DataConfig, SourceConfig
from lorafit.data import tokenize as tok_mod
from lorafit.data.sources import cap_texts, load_corpus, split_indices
from lorafit.data.tokenize import tokenize_cached


@pytest.mark.parametrize("n, frac, seed", [(2508, 0.1, 42), (37, 0.15, 3), (10, 0.5, 0)])
def test_split_matches_datasets_train_test_split(n, frac, seed):
    import datasets

    ds = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=frac, seed=seed)
    train, val = split_indices(n, frac, seed)
    assert list(train) == ds["train"]["i"] and list(val) == ds["test"]["i"]


def test_caps_are_seeded_deterministic_and_keep_file_order():
    texts = [f"t{i}" for i in range(100)]
    a, b = cap_texts(texts, 10, seed=1), cap_texts(texts, 10, seed=1)
    assert a == b and len(a) == 10 and a == sorted(a, key=lambda t: int(t[1:]))
    assert cap_texts(texts, 10, seed=2) != a
    assert cap_texts(texts, 1000, seed=1) == texts


def _write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_stratified_split_puts_every_source_in_validation(tmp_path):
    big = _write_jsonl(tmp_path / "big.jsonl", make_texts(200, seed=1))
    small = _write_jsonl(tmp_path / "small.jsonl", make_texts(5, seed=2))
    data = DataConfig(sources={"big": SourceConfig(path=str(big)), "small": SourceConfig(path=str(small))}, val_fraction=0.1)
    corpus = load_corpus(data)
    assert set(corpus.val_sources) == {0, 1}
    assert corpus.val_sources.count(0) == 20 and corpus.val_sources.count(1) == 1
    assert len(corpus.train_texts) == 180 + 4


def test_filters_drop_empty_short_and_duplicate_texts(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ["hello world", "", "   ", "hi", "hello world", "another text"])
    src = SourceConfig(path=str(path), min_chars=3, dedupe=True)
    corpus = load_corpus(DataConfig(sources={"d": src}, val_fraction=0.34))
    assert sorted(corpus.train_texts + corpus.val_texts) == ["another text", "hello world"]


def test_weights_repeat_or_subsample_training_rows_only(tmp_path):
    path = _write_jsonl(tmp_path / "w.jsonl", make_texts(50, seed=3))
    for weight, expected in ((2.0, 90), (0.5, 22)):
        corpus = load_corpus(DataConfig(sources={"w": SourceConfig(path=str(path), weight=weight)}, val_fraction=0.1))
        assert len(corpus.train_texts) == expected and len(corpus.val_texts) == 5


def test_tokenisation_cache_hit_skips_work_and_a_changed_config_misses(tmp_path, tiny_tokenizer, monkeypatch):
    texts = make_texts(30, seed=4)
    calls = []
    real = tok_mod.tokenize_texts
    monkeypatch.setattr(tok_mod, "tokenize_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    first, hit1 = tokenize_cached(texts, [0] * 30, tiny_tokenizer, 32, "truncate", tmp_path)
    second, hit2 = tokenize_cached(texts, [0] * 30, tiny_tokenizer, 32, "truncate", tmp_path)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert np.array_equal(first.ids, second.ids) and np.array_equal(first.n_bytes, second.n_bytes)
    _, hit3 = tokenize_cached(texts, [0] * 30, tiny_tokenizer, 16, "truncate", tmp_path)
    _, hit4 = tokenize_cached(texts[:-1] + ["changed"], [0] * 30, tiny_tokenizer, 32, "truncate", tmp_path)
    assert (hit3, hit4) == (False, False) and len(calls) == 3


def test_a_failed_cache_write_leaves_nothing_behind(tmp_path, tiny_tokenizer, monkeypatch):
    texts = make_texts(10, seed=5)

    def disk_full(self, path):
        path.write_bytes(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tok_mod.TokenizedSplit, "save", disk_full)
    split, hit = tokenize_cached(texts, [0] * 10, tiny_tokenizer, 32, "truncate", tmp_path)
    expected = tok_mod.tokenize_texts(texts, [0] * 10, tiny_tokenizer, 32, "truncate")
    assert not hit and np.array_equal(split.ids, expected.ids)  # the run goes on without its cache
    assert list((tmp_path / "tokens").iterdir()) == []  # no temporary, and no half file a later run would read


def test_every_example_ends_with_eos_and_bytes_count_the_targets(tiny_tokenizer):
    texts = ["héllo wörld", "a"]
    split, _ = tokenize_cached(texts, [0, 0], tiny_tokenizer, 64, "truncate", None)
    eos = tiny_tokenizer.eos_token_id
    for i, text in enumerate(texts):
        ex = split.example(i)
        assert ex[-1] == eos and eos not in ex[:-1]
        first_bytes = len(tiny_tokenizer.decode(ex[:1]).encode())
        assert split.n_bytes[i] == len(text.encode()) - first_bytes


# ---------------------------------------------------------------- the real quotes data (../shared)


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from transformers import GPT2Tokenizer

    d = shared_path("assets", "gpt2-tokenizer")
    tok = GPT2Tokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    tok.pad_token = tok.eos_token
    return tok


def test_real_quotes_split_is_2257_251_as_published(gpt2_tokenizer):
    import datasets

    path = shared_path("data", "english_quotes", "quotes.jsonl")
    from lorafit.config import load_config

    cfg = load_config("quotes", [f"data.sources.quotes.path={path}"])
    corpus = load_corpus(cfg.data)
    assert (len(corpus.train_texts), len(corpus.val_texts)) == (2257, 251)
    ref = datasets.load_dataset("json", data_files=str(path), split="train").train_test_split(test_size=0.1, seed=42)
    assert corpus.train_texts == ref["train"]["quote"] and corpus.val_texts == ref["test"]["quote"]


def test_real_quotes_token_counts(gpt2_tokenizer):
    path = shared_path("data", "english_quotes", "quotes.jsonl")
    texts = [json.loads(line)["quote"] for line in path.read_text(encoding="utf-8").splitlines()]
    full, _ = tokenize_cached(texts, [0] * len(texts), gpt2_tokenizer, 10_000, "truncate", None)
    assert len(full.ids) == 110_834  # one EOS each, as shared/data/README.md states
    cut, _ = tokenize_cached(texts, [0] * len(texts), gpt2_tokenizer, 64, "truncate", None)
    assert int(cut.truncated.sum()) == 338 and cut.lengths().max() == 64


def test_tokenising_holds_the_token_ids_about_once(tiny_tokenizer):
    """Data preparation at scale: every batch becomes flat arrays at once (no per-example Python lists kept to
    the end, no second copy when joining), so what tokenising allocates at its peak stays under twice the
    token ids' own size; and the ids are those of one plain tokenizer call per text, with its EOS."""
    import tracemalloc

    texts = make_texts(20_000, seed=11, max_words=30)
    tracemalloc.start()
    try:
        split = tok_mod.tokenize_texts(texts, [0] * len(texts), tiny_tokenizer, 64, "truncate")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * split.ids.nbytes, (peak, split.ids.nbytes)
    for i in range(0, len(texts), 997):
        expected = (tiny_tokenizer(texts[i], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id])[:64]
        assert split.example(i).tolist() == expected


class _RecordingTokenizer:
    """Forwards to a tokenizer and records the texts of each call (to check how tokenising splits its calls)."""

    def __init__(self, tokenizer):
        self._tokenizer, self.calls = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.calls.append(list(texts) if isinstance(texts, list) else [texts])
        return self._tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("policy,seq_len", [("truncate", 64), ("chunk", 16)])
def test_capped_tokenizer_calls_give_the_plain_per_text_result(tiny_tokenizer, monkeypatch, policy, seq_len):
    """Each tokenizer call takes TOKENIZE_CHARS characters at most (a longer text alone), byte lengths are summed
    BYTES_CHUNK tokens at a time; ids, offsets, bytes and truncation are still those of one plain call per text."""
    monkeypatch.setattr(tok_mod, "TOKENIZE_CHARS", 200)
    monkeypatch.setattr(tok_mod, "BYTES_CHUNK", 37)
    long = " ".join(["the word"] * 60)  # 539 characters: more than a call's cap, so a call of its own
    texts = make_texts(150, seed=3) + [long] + make_texts(150, seed=4) + [long + " end", "a"]
    tok = _RecordingTokenizer(tiny_tokenizer)
    split = tok_mod.tokenize_texts(texts, [0] * len(texts), tok, seq_len, policy)
    assert len(tok.calls) > 10 and all(sum(map(len, c)) <= 200 or len(c) == 1 for c in tok.calls)
    assert [long] in tok.calls
    eos = tiny_tokenizer.eos_token_id
    pieces, truncated = [], []
    for text in texts:
        got, lost = tok_mod.apply_length_policy(tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [eos],
                                                seq_len, policy)
        pieces += [p for p in got if len(p) >= 2]
        truncated += [lost] * len([p for p in got if len(p) >= 2])
    assert len(split) == len(pieces) and (len(pieces) > len(texts)) == (policy == "chunk")  # chunk made windows
    assert split.ids.tolist() == [t for p in pieces for t in p]
    assert split.lengths().tolist() == [len(p) for p in pieces]
    assert split.truncated.tolist() == truncated and any(truncated) == (policy == "truncate")
    expected_bytes = [len(tiny_tokenizer.decode(p[1:], skip_special_tokens=True).encode()) for p in pieces]
    assert split.n_bytes.tolist() == expected_bytes


def test_the_accumulator_grows_to_the_projected_size_not_by_a_quarter():
    """ndarray.resize zero-fills the new capacity, so spare capacity is resident memory: once part of the texts is
    done the ids buffer grows to what the rest projects (2% spare), in a few resizes."""
    batches = tok_mod._Batches(masked=False)
    no_bytes = lambda ids, offsets, scored: np.zeros(len(offsets) - 1, np.int64)  # noqa: E731
    capacity = 0
    for i in range(100):
        batches.done = (i + 1) / 100
        ids = np.full(1000 + (i % 7), i, np.int32)  # batches of slightly different sizes
        lengths = np.array([len(ids) - 10, 10], np.int64)
        batches.add(ids, lengths, np.zeros(2, np.int32), np.zeros(2, bool), None, no_bytes)
        capacity = max(capacity, len(batches.buffers["ids"]))
    split = batches.split({})
    assert capacity <= 1.05 * len(split.ids) + 1024, (capacity, len(split.ids))
    assert batches.resizes <= 20
    assert split.ids.tolist() == [i for i in range(100) for _ in range(1000 + (i % 7))]
    assert split.offsets[-1] == len(split.ids) and len(split) == 200
