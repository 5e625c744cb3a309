"""The whole GPU benchmark in one command (bench/gpu.sh runs it): the quotes comparison with the
original pipeline, the mixture8 shape, and a full 5-epoch quotes run; one JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorafit.bench import run as bench
from lorafit.bench.shapes import mixture_shape_throughput
from lorafit.config import load_config
from lorafit.train import train


# The recipe as published (GPT-2's own dropout kept), then the opt-in fast paths.
MIXTURE_VARIANTS = [[], ["model.dropout=0"], ["train.compile=true"], ["train.compile=true", "model.dropout=0"]]
QUOTES_VARIANTS = [[], ["train.compile=true"]]


def full_quotes_run(model_dir: str, data: str, out: Path, extra: list[str]) -> dict:
    cfg = load_config("quotes", [f"model.name={model_dir}", f"data.sources.quotes.path={data}", f"output_dir={out}",
                                 "eval.sample_prompt=null", *extra])
    start = time.perf_counter()
    summary = train(cfg, overwrite=True, progress=False)
    keys = ("optimizer_steps", "train_examples", "train_tokens", "train_seconds", "train_tokens_per_second",
            "final_train_loss", "val_loss", "eval_samples_per_second", "peak_memory_bytes")
    return {"overrides": extra, "wall_seconds_total": time.perf_counter() - start, **{k: summary[k] for k in keys}}


def auto_peers(device: torch.device) -> str | None:
    """TRL when installed, with Liger's kernels on CUDA when those are installed too."""
    if importlib.util.find_spec("trl") is None:
        return None
    liger = device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    return "trl,liger" if liger else "trl"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shared", default=str(bench.SHARED), help="the shared/ folder with assets/ and data/")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--json", default=None)
    p.add_argument("--skip-compare", action="store_true")
    p.add_argument("--peers", default="auto", help="peers in the comparison (default: trl, +liger on CUDA, when installed; none)")
    args = p.parse_args(argv)
    shared = Path(args.shared)
    tokenizer = shared / "assets" / "gpt2-tokenizer"
    data = shared / "data" / "english_quotes" / "quotes.jsonl"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = bench.results_path(args.json, bench.REPO / "bench" / "results" / f"{dt.date.today()}-{name.replace(' ', '-')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    peers = auto_peers(device) if args.peers == "auto" else (None if args.peers == "none" else args.peers)
    results = {"date": dt.date.today().isoformat(), "device": name, "torch": torch.__version__}

    def save():
        out.write_text(json.dumps(results, indent=2) + "\n")

    if not args.skip_compare:
        compare_json = bench.free_path(out.with_name(out.stem + "-compare.json"))
        ns = argparse.Namespace(examples=args.examples, warmup_steps=10, model=None, tokenizer=str(tokenizer),
                                data=str(data), device=str(device), json=str(compare_json), skip_generation=False,
                                skip_eval=False, compile=False, peers=peers)
        bench.main(ns)
        results["quotes_compare"] = json.loads(compare_json.read_text())
        compare_json.unlink()
        save()
    tok_dir = bench._tokenizer_dir(tokenizer)
    model_dir = bench.ensure_model(None, tokenizer)
    ceiling, what = bench.matmul_ceiling(device)
    results["flop_ceiling"], results["flop_ceiling_source"] = ceiling, what
    results["mixture8_shape"] = []
    for extra in MIXTURE_VARIANTS:
        results["mixture8_shape"].append(mixture_shape_throughput(model_dir, tok_dir, device, extra=extra, ceiling=ceiling))
        save()
    print(json.dumps(results["mixture8_shape"], indent=1), file=sys.stderr)
    save()
    with tempfile.TemporaryDirectory() as tmp:
        results["quotes_full_run"] = []
        for extra in QUOTES_VARIANTS:
            results["quotes_full_run"].append(full_quotes_run(model_dir, str(data), Path(tmp) / "run", extra))
            save()
    print(json.dumps(results["quotes_full_run"], indent=1), file=sys.stderr)
    save()
    print(f"results written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
