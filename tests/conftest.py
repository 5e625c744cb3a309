"""Shared fixtures: a tiny tokenizer and model made here (no network, no ../shared needed)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these her long "
    "make thing see him two has look more day could go come did number sound no most people my over"
).split()


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared not available ({path} is missing): test needs the real shared data")
    return path


def make_texts(n: int, seed: int = 0, max_words: int = 30) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))).capitalize() + "." for _ in range(n)]


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one thread inside, the old count restored after. For the tests' tiny models: their ops are too
    small to split, and two threads on a shared 2-core machine wait on each other (measured: a fit of 100 steps
    0.6-0.8 s on one thread, 10-32 s on two under load; a one-layer forward 26 ms against 360 ms)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def greedy_continuation(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """The reference for `lorafit generate --temperature 0`: plain transformers' greedy decoding of the prompt
    tokens `ids`, stopping at EOS, decoded without special tokens. Refuses an empty continuation, so a test
    comparing against it cannot pass on zero generated tokens."""
    import torch

    x = torch.tensor([ids])
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    with torch.no_grad():
        out = model.eval().generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=pad)
    text = tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)
    assert text, "the reference generated no token: choose another prompt"
    return text


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (as in the original encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with 256 byte tokens, a few merges and <|endoftext|>."""
    from transformers import GPT2Tokenizer

    out = tmp_path_factory.mktemp("tiny-tokenizer")
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "e r", "Ġ o", "Ġ w", "o u", "Ġ s"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = GPT2Tokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from lorafit.modeling import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from lorafit.init_model import init_model

    return init_model("tiny", str(tiny_tokenizer_dir), tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def texts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(make_texts(120, seed=1)):
            f.write(json.dumps({"quote": t, "author": f"author {i}"}) + "\n")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
