"""`lorafit serve`: batching equals each request alone, the OpenAI shapes (and the official client),
adapter loading at run time, safety limits, and the playground in a real headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")

from lorafit.serve.batcher import Batcher, Row, positions_of  # noqa: E402

PROMPTS = ["The way", "He said that the", "A"]
CHROMIUM = "/usr/bin/chromium"


def make_adapter(base_dir: Path, tokenizer_dir: Path, out: Path, seed: int, targets=("c_attn",)) -> Path:
    """A tiny adapter with random (non-zero) weights, saved the way a lorafit run saves it."""
    from lorafit.config import LoraConfig
    from lorafit.lora import apply_lora
    from lorafit.modeling import load_tokenizer
    from lorafit.train import save_adapter
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(str(base_dir)), LoraConfig(r=4, dropout=0.0, targets=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    save_adapter(model, load_tokenizer(str(tokenizer_dir)), out, str(base_dir))
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters-root")
    return {name: make_adapter(tiny_model_dir, tiny_tokenizer_dir, root / name, seed=i + 1)
            for i, name in enumerate(["alpha", "beta", "gamma"])}


@pytest.fixture(scope="module")
def host(adapters):
    from lorafit.serve.models import ModelHost

    return ModelHost([("alpha", str(adapters["alpha"])), ("beta", str(adapters["beta"]))], precision="fp32",
                     device=torch.device("cpu"))


def run_rows(host, rows: list[Row], max_batch: int = 64, stagger: float = 0.0) -> dict[int, tuple[str, str]]:
    """Run rows through a batcher; {row index: (text, finish_reason)}."""
    out: dict[int, list] = {i: ["", None] for i in range(len(rows))}
    done = threading.Event()

    def emit(row, text, finish, error=None):
        assert error is None, error
        i = rows.index(row)
        out[i][0] += text
        if finish:
            out[i][1] = finish
            if all(v[1] for v in out.values()):
                done.set()

    batcher = Batcher(host, max_batch=max_batch)
    batcher.start()
    try:
        for r in rows:
            r.emit = emit
            batcher.submit(r)
            if stagger:
                time.sleep(stagger)
        assert done.wait(60)
    finally:
        batcher.stop()
    return {i: tuple(v) for i, v in out.items()}, batcher


def alone(adapter_dir: Path, prompt: str, max_tokens: int) -> str:
    from lorafit.generate import SamplingConfig, load_for_inference, sample

    model, tok, _ = load_for_inference(adapter_dir, precision="fp32", device=torch.device("cpu"))
    return sample(model, tok, prompt, SamplingConfig(max_new_tokens=max_tokens, temperature=0.0))[0]


# ---------------------------------------------------------------- batching


def test_left_padded_row_computes_what_it_would_alone(host):
    """GPT-2 needs position ids that skip the padding; with them a padded row's logits are its own."""
    tok, model = host.tokenizer, host.model
    short, long = tok("A")["input_ids"], tok("He said that the way")["input_ids"]
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([short]), adapter_names=["alpha"]).logits[0, -1]
        ids = torch.tensor([[host.pad_id] * (len(long) - len(short)) + short, long])
        mask = torch.tensor([[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)])
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask),
                       adapter_names=["alpha", "beta"]).logits[0, -1]
        wrong = model(input_ids=ids, attention_mask=mask, adapter_names=["alpha", "beta"]).logits[0, -1]
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)
    assert (wrong - ref).abs().max() > 1e-3  # without the position ids the padding would shift it


def test_concurrent_greedy_rows_for_three_adapters_equal_each_alone(host, adapters):
    """Rows for two adapters and the base, joining a running batch at different steps, give the
    tokens lorafit.generate.sample gives each alone (greedy); a third adapter is loaded at run time."""
    host.add("gamma", adapters["gamma"])
    try:
        jobs = [("alpha", PROMPTS[0]), ("beta", PROMPTS[1]), ("gamma", PROMPTS[2]), ("__base__", PROMPTS[1]),
                ("gamma", PROMPTS[0])]
        rows = [Row(host.tokenizer(p)["input_ids"], a, max_tokens=12, temperature=0.0) for a, p in jobs]
        got, batcher = run_rows(host, rows, stagger=0.01)
        assert batcher.rows_in_step_max >= 2  # they did share forward passes
        for i, (a, p) in enumerate(jobs):
            if a == "__base__":
                from lorafit.generate import SamplingConfig, load_for_inference, sample_base

                model, tok, _ = load_for_inference(adapters["alpha"], precision="fp32", device=torch.device("cpu"))
                want = sample_base(model, tok, p, SamplingConfig(max_new_tokens=12, temperature=0.0))[0]
            else:
                want = alone(adapters[a], p, 12)
            assert got[i][0] == want, (a, p)
            assert got[i][1] == "length"
    finally:
        host.remove("gamma")


def test_rows_finish_independently_and_stop_strings_cut(host):
    ids = host.tokenizer(PROMPTS[1])["input_ids"]
    long = Row(ids, "alpha", max_tokens=20, temperature=0.0)
    short = Row(ids, "alpha", max_tokens=3, temperature=0.0)
    got, _ = run_rows(host, [long, short])
    assert got[1][1] == "length" and got[1][0] == got[0][0][: len(got[1][0])]
    assert len(short.tokens) == 3 and short.tokens == long.tokens[:3]
    stop = got[0][0][4:6]  # a string the greedy completion contains
    cut, _ = run_rows(host, [Row(ids, "alpha", max_tokens=20, temperature=0.0, stop=(stop,))])
    assert cut[0] == (got[0][0][: got[0][0].find(stop)], "stop")


def test_sampling_is_per_row_and_seeded(host):
    ids = host.tokenizer(PROMPTS[0])["input_ids"]
    rows = [Row(ids, "beta", 10, temperature=1.0, top_p=0.9, seed=s) for s in (7, 7, 8)]
    got, _ = run_rows(host, rows)
    again, _ = run_rows(host, [Row(ids, "beta", 10, temperature=1.0, top_p=0.9, seed=7)])
    assert got[0][0] == got[1][0] == again[0][0]  # a seed is a row's own: the batch around it changes nothing
    assert got[2][0] != got[0][0]
