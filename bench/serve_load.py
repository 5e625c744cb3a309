"""Loopback load test of `lorafit serve`, against sequential `lorafit generate`-style serving.

C clients each send R completion requests one after another (all clients at once), spread over
three adapters, every other request streamed. The server runs in its own process (`lorafit serve`
on 127.0.0.1); the same requests are then served one at a time through lorafit.generate (what a
server without batching does: `model.generate` per request, the adapter switched per request),
under the same closed loop: C clients, each sending its next request when the last is answered.

    python bench/serve_load.py                         # 64 clients x 8 requests, tiny random model
    python bench/serve_load.py --out bench/results/serve-load-cpu.json

Needs the serve extra and ../shared/assets/gpt2-tokenizer (or --tokenizer DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The secret to happiness is",
    "Life is what happens when",
    "In the middle of difficulty lies",
    "Be yourself; everyone else is",
    "The only way to do great work is",
    "It always seems impossible until",
    "Love is",
    "What we think, we become. The mind",
]
ADAPTERS = ["quotes-a", "quotes-b", "quotes-c"]


def requests_for(clients: int, per_client: int, max_tokens: int) -> list[list[dict]]:
    """Each client's requests, in order: adapters round-robin, every other one streamed, three in four
    sampled (seeded) and one greedy. No top_p: a random model's next-token distribution is near uniform,
    so a nucleus is most of the vocabulary and a full sort a token (on both sides) would be measured."""
    plan = []
    for c in range(clients):
        mine = []
        for j in range(per_client):
            k = c * per_client + j
            mine.append({"model": ADAPTERS[k % len(ADAPTERS)], "prompt": PROMPTS[k % len(PROMPTS)],
                         "max_tokens": max_tokens, "temperature": 0.8 if k % 4 else 0.0, "seed": k,
                         "stream": (c + j) % 2 == 0})
        plan.append(mine)
    return plan


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def summary(latencies: list[float], tokens: int, wall: float, errors: int, requests: int) -> dict:
    return {
        "requests": requests, "errors": errors, "completion_tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(requests / wall, 2),
        "latency_p50_s": round(statistics.median(latencies), 4), "latency_p99_s": round(percentile(latencies, 99), 4),
    }


# ---------------------------------------------------------------- the server under load


async def one_request(client, body: dict) -> tuple[int, float | None, str]:
    """(completion tokens, time to first text chunk or None, text); raises on any error."""
    start = time.perf_counter()
    if not body["stream"]:
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        out = r.json()
        assert len(out["choices"]) == 1 and out["choices"][0]["finish_reason"] in ("stop", "length")
        return out["usage"]["completion_tokens"], None, out["choices"][0]["text"]
    first, tokens, done, text = None, None, False, ""
    async with client.stream("POST", "/v1/completions", json={**body, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            else:
                text += chunk["choices"][0]["text"]
                if first is None and text:
                    first = time.perf_counter() - start
    assert done and tokens is not None, "stream ended early"
    return tokens, first, text


async def load(url: str, plan: list[list[dict]]) -> dict:
    import httpx2 as httpx

    latencies, ttfts, tokens, errors, texts = [], [], 0, [], {}

    async def client_loop(client, mine):
        nonlocal tokens
        for body in mine:
            start = time.perf_counter()
            try:
                n, first, texts[body["seed"]] = await one_request(client, body)
            except Exception as exc:  # counted, and the first few reported
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - start)
            tokens += n
            if first is not None:
                ttfts.append(first)

    limits = httpx.Limits(max_connections=len(plan) + 8, max_keepalive_connections=len(plan) + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, mine) for mine in plan))
        wall = time.perf_counter() - start
    out = summary(latencies, tokens, wall, len(errors), sum(map(len, plan)))
    out["streamed_first_text_p50_s"] = round(statistics.median(ttfts), 4) if ttfts else None
    out["error_examples"] = errors[:5]
    return out, texts


def start_server(adapter_dirs: dict[str, Path], port: int, threads: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "lorafit", "serve", *(f"{n}={d}" for n, d in adapter_dirs.items()),
            "--port", str(port), "--precision", "fp32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    env.pop("LORAFIT_API_KEY", None)
    # to a file, not a pipe: the server logs a line a request, and an unread pipe would fill and block it
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(args, env=env, stderr=log, text=True)
    import urllib.request

    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log.seek(0)
                raise SystemExit(f"the server did not start:\n{log.read()}")
            time.sleep(0.2)


# ---------------------------------------------------------------- sequential generate-style serving


def sequential(adapter_dirs: dict[str, Path], plan: list[list[dict]]) -> dict:
    """One request at a time through lorafit.generate, the same closed loop of clients (FIFO)."""
    from collections import deque

    import torch

    from lorafit.generate import SamplingConfig, load_for_inference, sample_ids
    from lorafit.lora import load_adapter

    names = list(adapter_dirs)
    model, tok, base_name = load_for_inference(adapter_dirs[names[0]], precision="fp32", device=torch.device("cpu"))
    for name in names[1:]:
        model = load_adapter(model, adapter_dirs[name], base_name, adapter_name=name)
    alias = {names[0]: "default", **{n: n for n in names[1:]}}
    queue = deque((c, 0) for c in range(len(plan)))  # every client's first request arrives at t = 0
    submitted = {(c, 0): 0.0 for c in range(len(plan))}
    latencies, tokens, texts = [], 0, {}
    start = time.perf_counter()
    while queue:
        c, j = queue.popleft()
        body = plan[c][j]
        model.set_adapter(alias[body["model"]])
        cfg = SamplingConfig(max_new_tokens=body["max_tokens"], temperature=body["temperature"], seed=body["seed"])
        ids = sample_ids(model, tok, body["prompt"], cfg)[0].tolist()
        tokens += ids.index(tok.eos_token_id) if tok.eos_token_id in ids else len(ids)  # as the server counts
        texts[body["seed"]] = tok.decode(ids, skip_special_tokens=True)
        now = time.perf_counter() - start
        latencies.append(now - submitted[(c, j)])
        if j + 1 < len(plan[c]):
            submitted[(c, j + 1)] = now
            queue.append((c, j + 1))
    return summary(latencies, tokens, time.perf_counter() - start, 0, sum(map(len, plan))), texts


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=8, help="requests a client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "assets" / "gpt2-tokenizer"))
    p.add_argument("--size", default="tiny", choices=["tiny", "gpt2"], help="random base model (lorafit init-model)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, both sides (1: on a small shared machine a second thread mostly waits)")
    p.add_argument("--skip-sequential", action="store_true")
    p.add_argument("--out", help="write the results JSON here")
    args = p.parse_args()
    if not Path(args.tokenizer).is_dir():
        raise SystemExit(f"tokenizer '{args.tokenizer}' not found; pass --tokenizer DIR (a GPT-2 tokenizer)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch

    from lorafit.init_model import init_model, random_adapter

    torch.set_num_threads(args.threads)

    plan = requests_for(args.clients, args.requests, args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        base = init_model(args.size, args.tokenizer, Path(tmp) / "base", seed=0)
        dirs = {name: random_adapter(base, Path(tmp) / name, seed=i + 1) for i, name in enumerate(ADAPTERS)}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = start_server(dirs, port, args.threads)
        try:
            served, served_texts = asyncio.run(load(f"http://127.0.0.1:{port}", plan))
        finally:
            server.terminate()
            server.wait(30)
        print("lorafit serve:", json.dumps(served), file=sys.stderr)
        seq = None
        if not args.skip_sequential:
            seq, seq_texts = sequential(dirs, plan)
            # greedy requests must come out of the batched server exactly as they do alone
            greedy = [b["seed"] for mine in plan for b in mine if b["temperature"] == 0]
            seq["greedy_requests"] = len(greedy)
            seq["greedy_texts_differing_from_serve"] = sum(served_texts.get(k) != seq_texts[k] for k in greedy)
            print("sequential:   ", json.dumps(seq), file=sys.stderr)
    result = {
        "what": "loopback load test of lorafit serve vs sequential generate-style serving (bench/serve_load.py)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "device": "cpu (fp32)", "torch_threads": args.threads},
        "setup": {"model": f"random {args.size} GPT-2 (lorafit init-model), GPT-2 tokenizer", "adapters": ADAPTERS,
                  "lora": "r=4 on c_attn, random weights", "clients": args.clients, "requests_per_client": args.requests,
                  "max_tokens": args.max_tokens, "sampling": "3 in 4 temperature 0.8 (seeded), 1 in 4 greedy",
                  "streaming": "every other request"},
        "serve": served,
        "sequential": seq,
    }
    if seq:
        result["speedup_tokens_per_s"] = round(served["tokens_per_s"] / seq["tokens_per_s"], 2)
        result["latency_p50_ratio"] = round(seq["latency_p50_s"] / served["latency_p50_s"], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 1 if served["errors"] or (seq and seq["greedy_texts_differing_from_serve"]) else 0


if __name__ == "__main__":
    sys.exit(main())
