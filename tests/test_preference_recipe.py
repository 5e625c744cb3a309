"""The shipped `sentiment-dpo-offline` recipe as its README runs it (SFT, then DPO continuing that adapter), on a
tiny model: a DPO adapter is just another adapter to `generate --compare-base` and to `serve`. (Held-out
preference accuracy clearly above chance is not tested yet: a tiny model did not reach it cheaply, issue #23 item 7.)"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import greedy_continuation, shared_path

from lorafit.cli import main

PROMPT = "Review:\nThe food was"


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    """SFT on the recipe's chosen reviews, then DPO from that run (model.adapter), both capped to a few steps on 48
    pairs: what is under test is the wiring, not the learning."""
    csv = shared_path("data", "mixture-samples", "yelp_review_full", "yelp_test.csv")
    root = tmp_path_factory.mktemp("sentiment")
    common = ["sentiment-dpo-offline", f"model.name={tiny_model_dir}", f"data.sources.yelp.path={csv}",
              "data.sources.yelp.max_examples=48", "data.seq_len=32", "train.batch_size=4", "train.grad_accum=1",
              "train.lr=5e-2", "train.max_steps=3", "eval.sample_prompt=null", "eval.before_training=false",
              "model.precision=fp32",
              f"data.cache_dir={root / 'cache'}"]
    assert main(["train", *common, "train.objective=sft", f"output_dir={root / 'sft'}"]) == 0
    assert main(["train", *common, f"model.adapter={root / 'sft'}", f"output_dir={root / 'dpo'}"]) == 0
    summary = json.loads((root / "dpo" / "summary.json").read_text())
    assert summary["val_preference"]["pairs"] > 0 and summary["val_preference"]["margin"] != 0  # DPO ran and moved it
    return root / "dpo"


@pytest.fixture(scope="module")
def greedy(dpo_run, tiny_model_dir):
    """Plain transformers' greedy continuations of PROMPT: the base's, and base + the DPO adapter's."""
    from transformers import AutoModelForCausalLM

    from lorafit.generate import load_for_inference

    model, tok, _ = load_for_inference(dpo_run, precision="fp32", device=torch.device("cpu"))
    ids = tok(PROMPT)["input_ids"]
    tuned = greedy_continuation(model, tok, ids, 8)
    base = greedy_continuation(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), tok, ids, 8)
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
