"""`lorafit serve`: batching equals each request alone, the OpenAI shapes (and the official client),
adapter loading at run time, safety limits, and the playground in a real headless Chromium."""

from __future__ import annotations

import contextlib
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


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    from lorafit.init_model import random_adapter

    root = tmp_path_factory.mktemp("adapters-root")
    return {name: random_adapter(tiny_model_dir, root / name, seed=i + 1)
            for i, name in enumerate(["alpha", "beta", "gamma"])}


@pytest.fixture(scope="module")
def host(adapters):
    from lorafit.serve.models import ModelHost

    return ModelHost([("alpha", str(adapters["alpha"])), ("beta", str(adapters["beta"]))], precision="fp32",
                     device=torch.device("cpu"))


def run_rows(host, rows: list[Row], max_batch: int = 64, stagger: float = 0.0, errors: dict | None = None,
             while_running=None) -> dict[int, tuple[str, str]]:
    """Run rows through a batcher; {row index: (text, finish_reason)}. Errors fail the test unless
    `errors` is given to collect them ({row index: exception})."""
    out: dict[int, list] = {i: ["", None] for i in range(len(rows))}
    done = threading.Event()

    def emit(row, text, finish, error=None):
        i = rows.index(row)
        if error is not None:
            assert errors is not None, error
            errors[i] = error
        out[i][0] += text or ""
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
        if while_running is not None:
            while_running()
        assert done.wait(60)
    finally:
        batcher.stop()
    return {i: tuple(v) for i, v in out.items()}, batcher


_REFERENCES: dict[Path, tuple] = {}


def reference(adapter_dir: Path):
    """Base + one adapter loaded alone, the way `lorafit generate` loads it."""
    from lorafit.generate import load_for_inference

    if adapter_dir not in _REFERENCES:
        _REFERENCES[adapter_dir] = load_for_inference(adapter_dir, precision="fp32", device=torch.device("cpu"))[:2]
    return _REFERENCES[adapter_dir]


def alone(adapter_dir: Path, prompt: str, max_tokens: int, base: bool = False) -> str:
    """Greedy completion of one request alone through lorafit.generate (the adapter's, or its base's)."""
    from lorafit.generate import SamplingConfig, sample, sample_base

    model, tok = reference(adapter_dir)
    return (sample_base if base else sample)(model, tok, prompt, SamplingConfig(max_new_tokens=max_tokens, temperature=0.0))[0]


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
            want = alone(adapters["alpha"], p, 12, base=True) if a == "__base__" else alone(adapters[a], p, 12)
            assert got[i][0] == want, (a, p)
            assert got[i][1] == "length"
    finally:
        host.remove("gamma")


def test_a_row_joining_a_running_batch_gets_its_own_tokens(host, adapters):
    """A row that arrives while another is mid-generation joins it (caches left-padded to one length)."""
    slow = host.model.register_forward_pre_hook(lambda *a: time.sleep(0.01))
    try:
        first = Row(host.tokenizer(PROMPTS[0])["input_ids"], "__base__", max_tokens=30, temperature=0.0)
        late = Row(host.tokenizer(PROMPTS[1])["input_ids"], "beta", max_tokens=12, temperature=0.0)
        got, batcher = run_rows(host, [first, late], stagger=0.08)
    finally:
        slow.remove()
    assert batcher.rows_in_step_max == 2 and batcher.steps < 30 + 12  # they shared decode steps
    assert got[1][0] == alone(adapters["beta"], PROMPTS[1], 12)


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


def test_a_row_in_hand_and_in_the_batch_counts_once():
    # right after prefill a row is in both lists until the worker's step ends (a CI run saw 2 for 1)
    batcher = Batcher(host=None)
    row, waiting = Row(prompt_ids=[1], adapter="a", max_tokens=1), Row(prompt_ids=[2], adapter="b", max_tokens=1)
    batcher._in_hand, batcher.active = [row], [row]
    batcher.intake.put(waiting)
    assert batcher.busy_rows() == 2 and batcher.busy_rows("a") == 1
    row.cancel()
    assert batcher.busy_rows() == 1


def test_nucleus_sampling_draws_only_from_the_nucleus_in_proportion():
    from lorafit.serve.batcher import next_token

    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    draws = [next_token(logits, 1.0, 0.7, gen) for _ in range(2000)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reach 0.7
    assert abs(draws.count(0) / len(draws) - 0.5 / 0.8) < 0.04
    free = [next_token(logits, 1.0, 1.0, gen) for _ in range(2000)]
    for token, p in enumerate([0.5, 0.3, 0.15, 0.05]):
        assert abs(free.count(token) / len(free) - p) < 0.04
    flat = torch.zeros(1000)  # the nucleus is beyond the top 256: the full sort decides
    wide = {next_token(flat + torch.linspace(0, 1e-3, 1000), 1.0, 0.5, gen) for _ in range(1000)}
    assert wide <= set(range(499, 1000)) and len(wide) > 300


def test_a_temperature_below_the_logits_dtype_s_range_is_greedy():
    """5e-324 is 0 in fp32 (1e-8 in fp16): it once divided the top logit 0 by 0, a 500 for the request."""
    from lorafit.serve.batcher import next_token

    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    for dtype, tiny in [(torch.float32, 5e-324), (torch.float16, 1e-8), (torch.float32, 1e-40)]:
        for top_p in (1.0, 0.5):
            assert next_token(logits.to(dtype), tiny, top_p, gen) == 1, (dtype, tiny, top_p)


# ---------------------------------------------------------------- the HTTP API


@pytest.fixture(scope="module")
def root(adapters, tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """--adapters-root: holds alpha..gamma, an adapter for another base, and a link that leads outside."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = adapters["alpha"].parent
    other_base = tmp_path_factory.mktemp("other-base")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(str(other_base))
    from lorafit.init_model import random_adapter

    for f in tiny_tokenizer_dir.iterdir():  # the same tokenizer: what differs is the model's sizes
        shutil.copy(f, other_base)
    random_adapter(other_base, root / "other", seed=9)
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(adapters["beta"], outside / "beta-copy")
    os.symlink(outside / "beta-copy", root / "sneaky")
    return root


def make_app(host, **kw):
    from lorafit.serve.app import create_app

    return create_app(host, **kw)


@pytest.fixture(scope="module")
def client(host, root):
    from fastapi.testclient import TestClient

    with TestClient(make_app(host, adapters_root=root, allow_admin=True)) as c:
        yield c


def complete(client, **body):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r, status: int, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err["message"]


def sse_events(text: str) -> list:
    lines = [ln for ln in text.split("\n\n") if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]


def test_models_lists_base_and_adapters(client, host):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    ids = {m["id"]: m["parent"] for m in data["data"]}
    assert ids == {host.base_id: None, "alpha": host.base_id, "beta": host.base_id}


def test_completion_shape_and_greedy_text(client, adapters):
    body = complete(client, model="alpha", prompt=PROMPTS[0], max_tokens=9, temperature=0)
    assert body["object"] == "text_completion" and body["model"] == "alpha" and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    [c] = body["choices"]
    assert c == {"text": alone(adapters["alpha"], PROMPTS[0], 9), "index": 0, "logprobs": None, "finish_reason": "length"}
    assert body["usage"]["completion_tokens"] == 9
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 9
    many = complete(client, model="beta", prompt=PROMPTS[:2], n=2, max_tokens=5, temperature=0.9, seed=3)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["usage"]["completion_tokens"] == 20


def test_streaming_sends_openai_chunks_ending_with_done(client):
    ref = complete(client, model="beta", prompt=PROMPTS[1], max_tokens=10, temperature=0)["choices"][0]["text"]
    r = client.post("/v1/completions", json=dict(model="beta", prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    chunks, last = events[:-1], events[-1]
    assert all(e["object"] == "text_completion" and e["model"] == "beta" for e in events)
    assert len(chunks) > 2 and "".join(c["choices"][0]["text"] for c in chunks) == ref
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    # several completions in one stream, and a stop string that may arrive split over chunks
    stop = ref[3:5]
    body = dict(model="beta", prompt=[PROMPTS[1], PROMPTS[0]], n=2, max_tokens=10, temperature=0, stop=stop)
    whole = complete(client, **body)["choices"]
    events = sse_events(client.post("/v1/completions", json={**body, "stream": True}).text)
    joined = {i: "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) for i in range(4)}
    assert joined == {c["index"]: c["text"] for c in whole}
    assert whole[0]["text"] == ref[: ref.find(stop)] and whole[0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "alpha", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"model": "alpha", "prompt": "x", "top_p": -0.1}, 400, "top_p"),
    ({"model": "alpha", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "max_tokens": "9"}, 400, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "n": 1000}, 400, "n"),
    ({"model": "alpha", "prompt": [1, 2, 3]}, 400, "prompt"),
    ({"model": "alpha", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "alpha", "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": "alpha", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "alpha", "prompt": "x", "temprature": 0.5}, 400, "temprature"),
    ({"model": "alpha", "prompt": "word " * 300, "max_tokens": 16}, 400, "prompt"),  # context is 256
    ({"model": "alpha", "prompt": "x", "max_tokens": 256}, 400, "prompt"),
])
def test_bad_requests_are_openai_shaped_4xx(client, body, status, param):
    assert_error(client.post("/v1/completions", json=body), status, param=param)


def test_bad_json_big_bodies_and_unknown_routes(client):
    assert_error(client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(client.post("/v1/completions", json=["a list"]), 400)
    assert_error(client.post("/v1/completions", json={"model": "alpha", "prompt": "x" * (2 << 20)}), 413)

    def chunks():  # no content-length: the cap holds while reading
        for _ in range(20):
            yield b"x" * (100 << 10)

    assert_error(client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_api_key_needed_on_every_api_request(host):
    from fastapi.testclient import TestClient

    with TestClient(make_app(host, api_key="s3cret")) as c:
        body = {"model": "alpha", "prompt": "x", "max_tokens": 2}
        assert_error(c.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(c.post("/v1/completions", json=body), 401)
        assert_error(c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.post("/v1/adapters", json={}, headers={"Authorization": "s3cret"}), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/completions", json=body, headers=ok).status_code == 200
        assert c.get("/").status_code == 200  # the page holds nothing; what it fetches needs the key


def test_adapters_load_and_unload_at_run_time(client, host, root, adapters):
    want = alone(adapters["gamma"], PROMPTS[2], 6)
    loaded = client.post("/v1/adapters", json={"name": "g", "path": "gamma"})
    assert loaded.status_code == 200, loaded.text
    assert "g" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert complete(client, model="g", prompt=PROMPTS[2], max_tokens=6, temperature=0)["choices"][0]["text"] == want
    assert_error(client.post("/v1/adapters", json={"name": "g", "path": str(root / "beta")}), 409, code="adapter_exists")
    assert client.delete("/v1/adapters/g").status_code == 200
    assert "g" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert_error(client.post("/v1/completions", json={"model": "g", "prompt": "x"}), 404)
    assert_error(client.delete("/v1/adapters/g"), 404)


def test_runtime_loading_is_confined_and_checked(client, host, root, tmp_path, adapters):
    from fastapi.testclient import TestClient

    message = assert_error(client.post("/v1/adapters", json={"name": "o", "path": "other"}), 400)
    assert "was trained on base" in message and "hidden_size 32 vs 64" in message  # lorafit's base check
    assert_error(client.post("/v1/adapters", json={"name": "s", "path": "sneaky"}), 403, code="path_not_allowed")
    assert_error(client.post("/v1/adapters", json={"name": "s", "path": "../" + tmp_path.name}), 403)
    assert_error(client.post("/v1/adapters", json={"name": "s", "path": str(tmp_path)}), 403)
    assert_error(client.post("/v1/adapters", json={"name": "../x", "path": "beta"}), 400)
    assert_error(client.post("/v1/adapters", json={"name": host.base_id, "path": "beta"}), 409)
    assert_error(client.post("/v1/adapters", json={"name": "m", "path": "missing"}), 400)
    assert_error(client.post("/v1/adapters", json={"name": "m"}), 400)
    assert set(host.adapters) == {"alpha", "beta"}  # nothing half-loaded
    with TestClient(make_app(host)) as no_root:  # no --adapters-root: no loading at all
        assert_error(no_root.post("/v1/adapters", json={"name": "g", "path": str(adapters["gamma"])}), 403)


# ---------------------------------------------------------------- a real server on loopback


@contextlib.contextmanager
def serving(app, header_timeout_s: float = 10):
    """The app under uvicorn, with `lorafit serve`'s settings, on 127.0.0.1 and a free port (bound
    here, so no race for it)."""
    import uvicorn

    from lorafit.serve.app import server_settings

    settings = server_settings("127.0.0.1", 0, header_timeout_s=header_timeout_s)
    del settings["host"], settings["port"]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def live(host, root):
    app = make_app(host, api_key="k-test", adapters_root=root, bound_host="127.0.0.1")
    with serving(app) as url:
        yield url, app


def test_official_openai_client_works_unchanged(live, adapters):
    from openai import OpenAI

    url, _ = live
    client = OpenAI(base_url=url + "/v1", api_key="k-test", max_retries=0, timeout=30)
    assert {m.id for m in client.models.list()} >= {"alpha", "beta"}
    want = alone(adapters["alpha"], PROMPTS[1], 10)
    resp = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    assert resp.choices[0].text == want and resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 10
    parts = [c.choices[0].text for c in client.completions.create(
        model="alpha", prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True) if c.choices]
    assert len(parts) > 1 and "".join(parts) == want
    from openai import AuthenticationError, NotFoundError

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).completions.create(model="alpha", prompt="x")
    with pytest.raises(NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")


def test_client_leaving_mid_stream_frees_its_slot(live, host):
    import httpx2 as httpx

    url, app = live
    batcher = app.state.batcher
    quiet = time.time()
    while batcher.busy_rows() or batcher.active:  # an earlier test's row may still be finishing on a loaded machine
        assert time.time() - quiet < 30, "the server never became idle"
        time.sleep(0.05)
    slow = host.model.register_forward_pre_hook(lambda *a: time.sleep(0.02))  # 220 tokens would take > 4 s
    try:
        # greedy: beta's continuation of "A" has no EOS in 220 tokens, so only the hang-up can end it early
        body = {"model": "beta", "prompt": "A", "max_tokens": 220, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": "Bearer k-test"},
                          timeout=10) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    running = batcher.busy_rows()  # (leaving the loop may already close the connection)
                    break  # one chunk arrived; now hang up
        assert running == 1  # the row was still generating
        left = time.time()
        while batcher.busy_rows() or batcher.active:
            assert time.time() - left < 1.5, "the abandoned row kept generating"
            time.sleep(0.02)
    finally:
        slow.remove()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)")
def test_playground_in_headless_chromium(live, adapters, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _ = live
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 560})
            page.goto(url + "/")
            page.fill("#api_key", "k-test")
            page.dispatch_event("#api_key", "change")
            page.wait_for_function("document.querySelectorAll('#adapter option').length >= 2", timeout=10000)
            assert "2 adapter(s)" in page.text_content("#served")
            page.select_option("#adapter", "beta")
            page.fill("#prompt", PROMPTS[1])
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            page.click("#go")
            page.wait_for_selector("#base_out[data-done] >> nth=0", state="attached", timeout=20000)
            page.wait_for_selector("#adapter_out[data-done]", state="attached", timeout=20000)
            base_text = page.eval_on_selector("#base_out", "e => e.textContent")
            tuned_text = page.eval_on_selector("#adapter_out", "e => e.textContent")
            titles = [page.text_content("#base_title"), page.text_content("#adapter_title")]
            page.screenshot(path=str(tmp_path / "playground.png"))
        finally:
            browser.close()
    assert base_text == PROMPTS[1] + alone(adapters["beta"], PROMPTS[1], 12, base=True)
    assert tuned_text == PROMPTS[1] + alone(adapters["beta"], PROMPTS[1], 12)
    assert base_text != tuned_text
    assert titles == ["base: tiny", "adapter: beta"]
    assert (tmp_path / "playground.png").stat().st_size > 1000


def test_a_refused_first_adapter_leaves_the_base_as_it_was(tiny_model_dir, root, adapters, tmp_path):
    """A base served alone: an adapter that fails the key/shape check (no lorafit signature to stop it
    earlier) must not leave LoRA layers behind; a good one then loads and answers as it would alone."""
    from lorafit.errors import LorafitError
    from lorafit.serve.models import ModelHost

    unsigned = tmp_path / "unsigned"
    shutil.copytree(root / "other", unsigned)
    (unsigned / "lorafit_base.json").unlink()
    lone = ModelHost([], base=str(tiny_model_dir), precision="fp32", device=torch.device("cpu"))
    with pytest.raises(LorafitError, match="shape"):
        lone.add("u", unsigned)
    assert not lone.has_adapters and not any("lora" in type(m).__name__.lower() for m in lone.model.modules())
    lone.add("alpha", adapters["alpha"])
    got, _ = run_rows(lone, [Row(lone.tokenizer(PROMPTS[0])["input_ids"], "alpha", 8, temperature=0.0)])
    assert got[0][0] == alone(adapters["alpha"], PROMPTS[0], 8)
    lone.remove("alpha")  # the last adapter: back to the plain base
    assert not lone.has_adapters
    got, _ = run_rows(lone, [Row(lone.tokenizer(PROMPTS[0])["input_ids"], "__base__", 8, temperature=0.0)])
    assert got[0][0] == alone(adapters["alpha"], PROMPTS[0], 8, base=True)


# ---------------------------------------------------------------- the command


def test_serve_command_refuses_bad_setups_cleanly(tiny_model_dir, adapters, tmp_path, capsys):
    from lorafit.cli import main

    assert main(["serve"]) == 2
    assert "Nothing to serve" in capsys.readouterr().err
    assert main(["serve", f"x={adapters['alpha']}", f"x={adapters['beta']}"]) == 2
    assert "share a name" in capsys.readouterr().err
    assert main(["serve", "--base", str(tiny_model_dir), "--adapters-root", str(tmp_path / "none")]) == 2
    assert "--adapters-root" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_without_the_extra_names_it(monkeypatch, tiny_model_dir, capsys):
    import sys

    from lorafit.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve", "--base", str(tiny_model_dir)]) == 2
    assert 'pip install -e ".[serve]"' in capsys.readouterr().err


def test_serve_command_wires_the_server(adapters, monkeypatch, capsys):
    """`lorafit serve NAME=RUN_DIR RUN_DIR`: the app it hands uvicorn serves both adapters, binds
    127.0.0.1 unless told otherwise, and takes the key from $LORAFIT_API_KEY (uvicorn itself is
    exercised by the live-server tests above)."""
    import uvicorn
    from fastapi.testclient import TestClient

    from lorafit.cli import main

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setenv("LORAFIT_API_KEY", "env-key")
    assert main(["serve", f"first={adapters['alpha']}", str(adapters["beta"]), "--port", "8123"]) == 0
    [(app, kw)] = calls
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8123
    err = capsys.readouterr().err
    assert "serving tiny (base), first, beta on http://127.0.0.1:8123/" in err
    assert "adapter loading and unloading (POST/DELETE /v1/adapters): on, with the API key" in err
    with TestClient(app, base_url="http://127.0.0.1:8123") as c:
        assert_error(c.get("/v1/models"), 401)
        models = c.get("/v1/models", headers={"Authorization": "Bearer env-key"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny", "first", "beta"]
    assert kw["limit_concurrency"] and kw["timeout_keep_alive"]  # a cap on connections, idle ones closed


def test_serve_help_shows_the_default_port(capsys):
    from lorafit.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 8000)" in out and "--allow-admin" in out and "--log-prompts" in out


def test_keyless_administration_is_off_unless_allowed(host, root, adapters, monkeypatch, capsys):
    """Without --api-key, POST /v1/adapters and DELETE are refused (a DELETE could only be undone by a
    restart); --allow-admin turns them on, and the startup line says which."""
    import uvicorn
    from fastapi.testclient import TestClient

    from lorafit.cli import main

    with TestClient(make_app(host, adapters_root=root)) as c:
        assert_error(c.post("/v1/adapters", json={"name": "g", "path": "gamma"}), 403, code="admin_disabled")
        assert_error(c.delete("/v1/adapters/alpha"), 403, code="admin_disabled")
        assert set(host.adapters) == {"alpha", "beta"}
        assert c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 1}).status_code == 200
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.delenv("LORAFIT_API_KEY", raising=False)
    assert main(["serve", str(adapters["alpha"])]) == 0
    assert "(POST/DELETE /v1/adapters): off (no --api-key; --allow-admin turns it on)" in capsys.readouterr().err
    assert main(["serve", str(adapters["alpha"]), "--allow-admin"]) == 0
    assert "on for anyone, without a key (--allow-admin)" in capsys.readouterr().err


# ---------------------------------------------------------------- one client never breaks another (issue 21)


def test_a_row_that_cannot_sample_or_whose_adapter_left_fails_alone(host, adapters):
    """temperature 1e-40 with top_p 0.5 once raised an IndexError that failed every row in flight; an
    adapter unloaded under its rows failed the base rows beside them. Now each is the row's own."""
    ids = host.tokenizer(PROMPTS[1])["input_ids"]
    greedy = Row(ids, "__base__", 10, temperature=0.0)
    tiny = Row(ids, "__base__", 10, temperature=1e-40, top_p=0.5, seed=1)
    got, _ = run_rows(host, [greedy, tiny])
    assert got[0] == got[1] == (alone(adapters["alpha"], PROMPTS[1], 10, base=True), "length")  # the limit: greedy

    host.add("gamma", adapters["gamma"])
    slow = host.model.register_forward_pre_hook(lambda *a: time.sleep(0.01))
    base = Row(ids, "__base__", 40, temperature=0.0)
    doomed = Row(ids, "gamma", 40, temperature=0.0)

    def unload_midway():
        deadline = time.time() + 20
        while len(doomed.tokens) < 3:
            assert time.time() < deadline
            time.sleep(0.005)
        host.remove("gamma")  # under the host lock, between two forward passes

    errors: dict = {}
    try:
        got, _ = run_rows(host, [base, doomed], errors=errors, while_running=unload_midway)
    finally:
        slow.remove()
        if "gamma" in host.adapters:
            host.remove("gamma")
    from lorafit.serve.batcher import AdapterGone

    assert set(errors) == {1} and isinstance(errors[1], AdapterGone) and got[1][1] == "error"
    assert got[0] == (alone(adapters["alpha"], PROMPTS[1], 40, base=True), "length")


def test_kv_cache_surgery_gives_each_row_its_own_tokens(host, adapters):
    """Pins kvcache.py to the installed transformers: rows prefilled apart and joined (left-padded),
    then one dropped mid-way (and the all-padding columns cut), still decode exactly each row's own
    greedy tokens."""
    from lorafit.serve import kvcache
    from lorafit.serve.batcher import Batcher

    tok = host.tokenizer
    jobs = [("alpha", PROMPTS[1]), ("beta", PROMPTS[2]), ("__base__", PROMPTS[0])]
    want = [alone(adapters["alpha"], PROMPTS[1], 8), alone(adapters["beta"], PROMPTS[2], 8),
            alone(adapters["alpha"], PROMPTS[0], 8, base=True)]
    b = Batcher(host)
    with torch.inference_mode():
        def prefill(job):
            ids = torch.tensor([tok(job[1])["input_ids"]])
            mask = torch.ones_like(ids)
            logits, cache = b._forward(ids, mask, positions_of(mask), None, [job[0]])
            return int(logits.argmax()), cache, mask

        firsts, caches, masks = zip(*(prefill(j) for j in jobs))
        cache, mask = caches[0], masks[0]
        for c, m in zip(caches[1:], masks[1:]):
            mask = kvcache.join(cache, mask, c, m)
        assert mask.shape[1] == max(m.shape[1] for m in masks) and kvcache.can_join(cache)
        tokens = [[t] for t in firsts]
        rows = [0, 1, 2]
        for step in range(7):
            if step == 3:  # the longest prompt's row leaves: its padding columns go with it
                rows = [1, 2]  # PROMPTS[1] (row 0) is the longest
                width = mask.shape[1]
                mask = kvcache.keep_rows(cache, mask, [1, 2])
                assert mask.shape[1] < width and mask[:, 0].any()
            last = torch.tensor([[tokens[r][-1]] for r in rows])
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], 1)
            logits, cache = b._forward(last, mask, positions_of(mask)[:, -1:], cache, [jobs[r][0] for r in rows])
            for i, r in enumerate(rows):
                tokens[r].append(int(logits[i].argmax()))
    for r in (1, 2):
        assert tok.decode(tokens[r]) == want[r]
    assert want[0].startswith(tok.decode(tokens[0][:4]).rstrip("\ufffd"))  # the row that left, before it left


def test_peft_generate_takes_per_row_adapters_but_only_for_one_fixed_batch(host, adapters):
    """Why the batcher keeps its own loop: PEFT's `generate(adapter_names=...)` does mixed-adapter
    batches, and the batcher's rows match it token for token, but it runs one fixed batch with one
    sampling setting (no row joins or leaves, no per-row temperature or seed)."""
    tok = host.tokenizer
    jobs = [("alpha", PROMPTS[1]), ("beta", PROMPTS[2]), ("__base__", PROMPTS[0])]
    enc = [tok(p)["input_ids"] for _, p in jobs]
    width = max(map(len, enc))
    ids = torch.tensor([[host.pad_id] * (width - len(e)) + e for e in enc])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(e) for e in enc])[:, None]).long()
    with torch.inference_mode():
        out = host.model.generate(input_ids=ids, attention_mask=mask, adapter_names=[a for a, _ in jobs],
                                  max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=host.pad_id)
    rows = [Row(e, a, 8, temperature=0.0) for e, (a, _) in zip(enc, jobs)]
    got, _ = run_rows(host, rows, stagger=0.02)
    for i in range(3):
        assert got[i][0] == tok.decode(out[i, width:].tolist(), skip_special_tokens=True)


RAW = {"content-type": "application/json"}


@pytest.mark.parametrize("raw,param", [
    (b"[" * 5000 + b"]" * 5000, None),
    (b"[" * 100_000 + b"]" * 100_000, None),
    (b'{"model": "alpha", "prompt": "x", "seed": ' + b"7" * 5000 + b"}", None),
    (b'{"model": "alpha", "prompt": "x", "seed": ' + b"7" * 4000 + b"}", "seed"),
    (b'{"model": "\\ud800", "prompt": "x"}', "model"),
    (b'{"model": "alpha", "prompt": "x", "\\udfff": 1}', None),
    (b'{"model": "alpha", "prompt": "a\\ud800b"}', "prompt"),
    (b'{"model": "alpha", "prompt": ["ok", "\\udc00"]}', "prompt"),
    (b'{"model": "alpha", "prompt": "x", "stop": ["' + b"s" * 1000 + b'"]}', "stop"),
], ids=["nested-5000", "nested-100000", "seed-5000-digits", "seed-4000-digits", "surrogate-model",
        "surrogate-name", "surrogate-prompt", "surrogate-in-list", "long-stop"])
def test_hostile_bodies_get_openai_shaped_4xx(client, raw, param):
    """Each of these was a 500 (or, for the long stop strings, a 10x slowdown of every co-batched row)."""
    r = client.post("/v1/completions", content=raw, headers=RAW)
    assert_error(r, 400, param=param)
    assert r.content.isascii()  # rendered with escapes: a surrogate in the message cannot break it


def test_hostile_adapter_paths_get_4xx(client, host):
    for path in ["beta\0x", "a" * 5000, "b/" * 2500]:
        assert_error(client.post("/v1/adapters", json={"name": "h", "path": path}), 400, param="path")
    r = client.post("/v1/adapters", content=b'{"name": "\\ud800", "path": "beta"}', headers=RAW)
    assert_error(r, 400)
    assert set(host.adapters) == {"alpha", "beta"}


def test_bodies_that_are_not_json_are_refused(client, host):
    """A browser's cross-origin text/plain POST once loaded an adapter."""
    body = json.dumps({"name": "g", "path": "gamma"})
    for kind in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]:
        headers = {"content-type": kind} if kind else {}
        assert_error(client.post("/v1/adapters", content=body, headers=headers), 415, code="unsupported_media_type")
    assert_error(client.post("/v1/completions", content=b'{"model": "alpha"}', headers={"content-type": "text/plain"}),
                 415)
    assert "g" not in host.adapters
    ok = client.post("/v1/completions", content=b'{"model": "alpha", "max_tokens": 1}',
                     headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_host_header_must_name_the_bound_address(host):
    """DNS rebinding: a page on evil.example, its name re-pointed at 127.0.0.1, sends Host: evil.example."""
    from fastapi.testclient import TestClient

    with TestClient(make_app(host, bound_host="127.0.0.1"), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/v1/models").status_code == 200
        for good in ["localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"]:
            assert c.get("/v1/models", headers={"host": good}).status_code == 200, good
        for bad in ["evil.example:8000", "evil.example", "127.0.0.1.evil.example", "", "10.0.0.1:8000"]:
            assert_error(c.get("/v1/models", headers={"host": bad}), 421, code="invalid_host")
            assert_error(c.get("/", headers={"host": bad}), 421)
    with TestClient(make_app(host, bound_host="0.0.0.0"), base_url="http://10.1.2.3:8000") as c:
        assert c.get("/v1/models").status_code == 200  # any address of this machine; still no names
        assert_error(c.get("/v1/models", headers={"host": "evil.example"}), 421)


def test_one_log_line_a_request_without_prompts_unless_asked(host, caplog):
    from fastapi.testclient import TestClient

    secret = "my secret prompt"
    for log_prompts in (False, True):
        caplog.clear()
        with caplog.at_level("INFO", logger="lorafit.serve.requests"):
            with TestClient(make_app(host, log_prompts=log_prompts)) as c:
                complete(c, model="alpha", prompt=secret, max_tokens=3, temperature=0)
                assert_error(c.post("/v1/completions", json={"model": "nope", "prompt": secret}), 404)
        lines = [r.getMessage() for r in caplog.records if r.name == "lorafit.serve.requests"]
        assert len(lines) == 2
        ok, missing = lines
        assert " POST /v1/completions 200 " in ok and 'model="alpha"' in ok and "completion_tokens=3" in ok
        assert "latency_ms=" in ok and ok[:4].isdigit() and "Z " in ok  # an ISO time in UTC first
        assert " 404 " in missing and 'model="nope"' in missing
        assert (secret in ok) is log_prompts and (secret in missing) is log_prompts


def test_slow_clients_and_huge_bodies_on_a_live_server(host):
    """A silent connection is closed after the header deadline; a stalled body gets a 408; a 20 MB
    body gets its 413 (once the connection dropped, so the client saw a network error)."""
    import urllib.error
    import urllib.request

    from lorafit.serve.protocol import Limits

    app = make_app(host, limits=Limits(body_timeout_s=0.5), bound_host="127.0.0.1")
    with serving(app, header_timeout_s=0.4) as url:
        port = int(url.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)
        start = time.time()
        assert silent.recv(100) == b"" and time.time() - start < 3  # closed by the server
        silent.close()
        dribble = socket.create_connection(("127.0.0.1", port), timeout=5)
        start, closed = time.time(), False
        for byte in b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"x" * 60:
            try:
                dribble.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.05)  # headers that never end, a byte at a time: over 4 s in all
        if not closed:
            dribble.settimeout(1)
            try:
                closed = dribble.recv(100) == b""
            except ConnectionResetError:
                closed = True
            except TimeoutError:  # still open: the test fails below
                pass
        dribble.close()
        assert closed and time.time() - start < 4
        stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"model\"")
        reply = b""
        while chunk := stalled.recv(4096):
            reply += chunk
        stalled.close()
        assert reply.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in reply
        # urllib sends the whole body before it reads: the server must read it too, or the client gets a reset
        req = urllib.request.Request(url + "/v1/completions", data=b"x" * (20 << 20), headers=RAW)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code == 413 and json.loads(refused.value.read())["error"]["code"] == "body_too_large"


def test_an_adapter_unloaded_under_requests_fails_only_them(client, host, adapters):
    """Over HTTP: its plain request gets a 404, its stream a finish_reason "error" and [DONE]; a base
    request batched with them gets its own text (once all three got 500s)."""
    from concurrent.futures import ThreadPoolExecutor

    host.add("gamma", adapters["gamma"])
    slow = host.model.register_forward_pre_hook(lambda *a: time.sleep(0.01))
    body = {"prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0}
    try:
        with ThreadPoolExecutor(3) as pool:
            plain = pool.submit(client.post, "/v1/completions", json={**body, "model": "gamma"})
            stream = pool.submit(client.post, "/v1/completions", json={**body, "model": "gamma", "stream": True})
            base = pool.submit(client.post, "/v1/completions", json={**body, "model": host.base_id})
            batcher = client.app.state.batcher
            deadline = time.time() + 20
            while sum(len(r.tokens) >= 3 for r in batcher.active) < 3:
                assert time.time() < deadline
                time.sleep(0.005)
            host.remove("gamma")
            plain, stream, base = plain.result(60), stream.result(60), base.result(60)
    finally:
        slow.remove()
        if "gamma" in host.adapters:
            host.remove("gamma")
    assert_error(plain, 404, param="model", code="model_not_found")
    assert stream.status_code == 200 and sse_events(stream.text)[-1]["choices"][0]["finish_reason"] == "error"
    assert base.status_code == 200
    assert base.json()["choices"][0]["text"] == alone(adapters["alpha"], PROMPTS[1], 40, base=True)


def test_runtime_loading_refuses_an_adapter_of_other_weights_with_a_4xx(client, host, root, tmp_path, tiny_tokenizer_dir):
    """Issue 21: an adapter trained on a base of the same shapes but other weights is refused by lorafit's
    shared loader (the base fingerprint), and the server says so as a 400, loading nothing."""
    from lorafit.init_model import init_model, random_adapter

    twin = init_model("tiny", str(tiny_tokenizer_dir), tmp_path / "twin", seed=1)  # tiny_model_dir's shapes
    random_adapter(twin, root / "twin-adapter", seed=3)
    message = assert_error(client.post("/v1/adapters", json={"name": "t", "path": "twin-adapter"}), 400,
                           param="path", code="adapter_not_loadable")
    assert "weights (sha256" in message and "--force-base" in message
    assert set(host.adapters) == {"alpha", "beta"}
