"""The shipped `sentiment-dpo-offline` recipe as its README runs it (SFT, then DPO continuing that adapter), on a
tiny model: DPO from the SFT run prefers the positive review of held-out pairs clearly more often than chance
(issue #23 item 7), and the DPO adapter is just another adapter to `generate --compare-base` and to `serve`
(item 8). One run serves all three tests."""

from __future__ import annotations

import collections
import csv
import json
import math
import re

import pytest
import torch

from conftest import greedy_continuation, one_torch_thread, shared_path

from lorafit.cli import main

PROMPT = "Review:\nThe food was"
WORDS = 1000  # the tokenizer's vocabulary: the file's most frequent words and punctuation
P_MAX = 1e-3  # "clearly above chance": a one-sided binomial test against 0.5 on the held-out pairs


@pytest.fixture(scope="module")
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """A random one-layer GPT-2 (width 128) with a word-level tokenizer of the reviews' WORDS most frequent words
    (labels unused): sentiment words are single tokens, so a small adapter can learn to prefer them, which a
    byte-level tokenizer did not allow cheaply (accuracy 0.50-0.54 in 76-115 s)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = shared_path("data", "mixture-samples", "yelp_review_full", "yelp_test.csv")
    with open(path, encoding="utf-8", newline="") as f:
        texts = [row["sentence"].lower() for row in csv.DictReader(f)]
    counts = collections.Counter(w for text in texts for w in re.findall(r"\w+|[^\w\s]", text))
    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for word, _ in counts.most_common(WORDS - len(vocab)):
        vocab[word] = len(vocab)
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.normalizer = normalizers.Lowercase()
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|endoftext|>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("word-model")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_layer=1, n_head=2, n_embd=128, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return path, out


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, word_model, one_thread):
    """A short SFT on the recipe's chosen reviews (the adapter DPO starts from and its reference), then DPO from
    that run (model.adapter) for two epochs; a quarter of the 617 pairs held out (155) so that the binomial test
    has power. The test's choices beside the recipe's: the model, the first 32 tokens of each example, LoRA on
    every linear layer (the recipe's c_attn alone shifts the output too little), a larger lr, batch and beta
    (held-out accuracy over init seeds 0-2: 0.645/0.606/passing at beta 0.1, 0.703/0.613/0.658 at 0.3; 3 epochs
    overfit)."""
    csv_path, model = word_model
    root = tmp_path_factory.mktemp("sentiment")
    common = ["sentiment-dpo-offline", f"model.name={model}", f"data.sources.yelp.path={csv_path}",
              "data.val_fraction=0.25", "data.seq_len=32", "lora.targets=all-linear", "train.batch_size=16",
              "train.grad_accum=1", "eval.sample_prompt=null", "model.precision=fp32",
              f"data.cache_dir={root / 'cache'}"]
    sft = ["train.objective=sft", "train.max_steps=2", "eval.before_training=false", f"output_dir={root / 'sft'}"]
    assert main(["train", *common, *sft]) == 0
    dpo = [f"model.adapter={root / 'sft'}", "train.lr=5e-3", "train.epochs=2", "preference.beta=0.3",
           f"output_dir={root / 'dpo'}"]
    assert main(["train", *common, *dpo]) == 0
    return root / "dpo"


def chance_of_at_least(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): k of n pairs right by chance."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


def test_dpo_from_sft_prefers_the_positive_review_of_held_out_pairs_clearly_above_chance(dpo_run):
    summary = json.loads((dpo_run / "summary.json").read_text())
    before, after = summary["val_before_training"], summary["val_preference"]
    n = after["pairs"]
    assert n == before["pairs"] == 155
    # Step 0: the policy is its reference, so every reward is 0 (accuracy 0: ties count as wrong), loss ln 2.
    assert before["margin"] == 0 and before["accuracy"] == 0 and before["loss"] == pytest.approx(math.log(2))
    k = round(after["accuracy"] * n)
    p = chance_of_at_least(k, n)
    needed = next(j for j in range(n + 1) if chance_of_at_least(j, n) < P_MAX)
    assert p < P_MAX, f"{k}/{n} held-out pairs preferred (p = {p:.2g}); {needed}/{n} needed for p < {P_MAX:g}"
    assert after["margin"] > 0 and after["loss"] < before["loss"]


@pytest.fixture(scope="module")
def greedy(dpo_run, word_model):
    """Plain transformers' greedy continuations of PROMPT: the base's, and base + the DPO adapter's."""
    from transformers import AutoModelForCausalLM

    from lorafit.generate import load_for_inference

    model, tok, _ = load_for_inference(dpo_run, precision="fp32", device=torch.device("cpu"))
    ids = tok(PROMPT)["input_ids"]
    tuned = greedy_continuation(model, tok, ids, 8)
    base = greedy_continuation(AutoModelForCausalLM.from_pretrained(str(word_model[1])), tok, ids, 8)
    assert base != tuned, (base, tuned)  # the adapter changes the greedy text, so each side is told apart
    return base, tuned


def test_generate_compare_base_on_a_dpo_run_gives_the_base_and_the_tuned_greedy_texts(dpo_run, greedy, capsys):
    capsys.readouterr()
    flags = ["--compare-base", "--temperature", "0", "--max-new-tokens", "8"]
    assert main(["generate", str(dpo_run), PROMPT, *flags, "--json"]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (record["base_completion"], record["completion"]) == greedy
    assert main(["generate", str(dpo_run), PROMPT, *flags]) == 0
    out = capsys.readouterr()
    assert out.out == PROMPT + greedy[0] + "\n" + PROMPT + greedy[1] + "\n" and "--- base" in out.err


def test_serve_answers_with_the_dpo_adapter_and_the_base(dpo_run, greedy, monkeypatch):
    pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
    import uvicorn
    from fastapi.testclient import TestClient

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(app))  # the app, without a socket
    monkeypatch.delenv("LORAFIT_API_KEY", raising=False)
    assert main(["serve", f"dpo={dpo_run}"]) == 0
    [app] = calls
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert "dpo" in models
        texts = []
        for model in (models[0], "dpo"):  # the base first, then the adapter
            r = c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
    assert tuple(texts) == greedy
