"""`lorafit bench`: lorafit against the original quotes pipeline, back to back, same machine/model/data.

Both sides train on the same first N training examples of the quotes split for whole optimizer
steps of 8 examples, the first steps untimed (warm-up). Both are then evaluated with the same
token-weighted metric on the same validation quotes, so "equal or lower validation loss" compares
like with like. Evaluation and generation throughput are measured too, and `--peers trl` trains the
same examples with TRL's SFTTrainer (lorafit/bench/peers.py), evaluated by the same evaluator.
"""

from __future__ import annotations

import datetime as dt
import gc
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lorafit.bench.baseline import (
    EXAMPLES_PER_STEP,
    SideResult,
    baseline_eval_samples_per_second,
    generation_rates,
    run_baseline,
)
from lorafit.bench import preference
from lorafit.bench.peers import INSTALL, parse_peers, run_trl, trl_min_examples
from lorafit.config import load_config
from lorafit.data.prepare import Data
from lorafit.data.sources import load_corpus
from lorafit.data.tokenize import TokenizedSplit, default_cache_dir, tokenize_texts
from lorafit.errors import LorafitError
from lorafit.evaluate import evaluate_run, scoring_for
from lorafit.fastpath import fast_paths_for
from lorafit.forward import Forward
from lorafit.generate import merged_copy
from lorafit.init_model import init_model, is_raw_gpt2_bpe, tokenizer_from_dir
from lorafit.measure import peak_memory_bytes, reset_peak_memory, sync
from lorafit.modeling import load_base_model, load_tokenizer, resolve_precision
from lorafit.train import assemble, prepare_model

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
DEFAULT_TOKENIZER = SHARED / "assets" / "gpt2-tokenizer"
DEFAULT_DATA = SHARED / "data" / "english_quotes" / "quotes.jsonl"
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12}
GEN_PROMPTS = ["The secret to happiness is", "Life is", "Love is", "The best way to predict the future is"]
# Generation is timed per call and reported as the median with its min/max: single shots varied 15x.
# Three calls on CPU keep it cheap (a batch-16 call of 70 tokens is ~9 s there); five on a GPU.
GEN_REPETITIONS = {"cpu": 3, "cuda": 5}


# ---------------------------------------------------------------- set-up


def ensure_model(model: str | None, tokenizer_dir: Path) -> str:
    if model:
        return model

    path = default_cache_dir() / "models" / "gpt2-random"
    if not (path / "config.json").is_file():
        print(f"making a random full-size gpt2 in {path} (once)", file=sys.stderr)
        init_model("gpt2", str(tokenizer_dir), path, seed=0)
    return str(path)


def quotes_split(data: str) -> tuple[list[str], list[str]]:
    cfg = load_config("quotes", [f"data.sources.quotes.path={data}"])
    corpus = load_corpus(cfg.data)
    return corpus.train_texts, corpus.val_texts


def matmul_ceiling(device: torch.device) -> tuple[float, str]:
    """FLOP/s ceiling for MFU: measured fp32 matmul rate on CPU; the GPU's dense bf16 peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        if peak:
            return peak, f"{name} dense bf16 peak"
    n = 1024 if device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = 2 * n**3 * reps / (time.perf_counter() - start)
    return rate, f"measured {str(dtype).replace('torch.', '')} {n}x{n} matmul rate"


def flops_per_token(model) -> float:
    """Training FLOPs per token for LoRA: forward (2P) + backward through activations (2P); the
    frozen weights need no weight gradients. P counts matmul weights (LM head included)."""
    cfg = model.config
    d, layers, vocab = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    per_layer = d * 3 * d + d * d + 2 * d * 4 * d
    return 4.0 * (layers * per_layer + vocab * d)


# ---------------------------------------------------------------- the lorafit side


def build_trainer(model_dir: str, tokenizer_dir: str, texts_or_split, overrides: list[str], *, device: torch.device,
                  seed: int = 42, total_steps: int | None = None):
    """A lorafit Trainer, assembled as `lorafit train` does, on given texts (tokenised with the recipe's
    policy) or a ready TokenizedSplit, for `total_steps` (default: whole steps over the data once)."""
    cfg = load_config("quotes", [f"model.name={model_dir}", f"train.seed={seed}", *overrides])
    precision = resolve_precision(cfg.model.precision, device)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_base_model(cfg.model, precision, device)
    split = texts_or_split
    if not isinstance(split, TokenizedSplit):
        split = tokenize_texts(list(split), [0] * len(split), tokenizer, cfg.data.seq_len, cfg.data.long_examples)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    total = total_steps or len(split) // per_step
    # Enough epochs for `total` steps, which max_steps then caps exactly.
    cfg.train.epochs, cfg.train.max_steps = total / math.ceil(len(split) / per_step) + 1, total
    model, targets, fast = prepare_model(cfg, model, device, precision)
    trainer = assemble(cfg, model, tokenizer, Data(split, split, ["data"]), fast, targets, device, precision, run=None)
    trainer.model.train()
    return trainer


def time_steps(trainer, warmup_steps: int) -> tuple[float, int, int]:
    """Run the plan's steps; (seconds, target tokens, examples) of those after the warm-up."""
    start, tokens_before, examples = None, 0, 0
    for step in range(trainer.plan.total_steps):
        if step == warmup_steps:
            sync(trainer.device)
            start, tokens_before = time.perf_counter(), trainer.progress.train_tokens
        if step >= warmup_steps:
            examples += len(trainer.plan.examples(step))
        trainer.train_step()
        trainer.progress.step += 1
    sync(trainer.device)
    return time.perf_counter() - start, trainer.progress.train_tokens - tokens_before, examples


def run_lorafit(model_dir: str, tokenizer_dir: str, texts: list[str], *, warmup_steps: int, device: torch.device,
                seed: int = 42, compile: bool = False):
    """lorafit's quotes recipe on the same texts: (SideResult, trainer)."""
    reset_peak_memory(device)
    trainer = build_trainer(model_dir, tokenizer_dir, texts, [f"train.compile={str(compile).lower()}"], device=device,
                            seed=seed)
    wall, real, examples = time_steps(trainer, warmup_steps)
    timed = range(warmup_steps, trainer.plan.total_steps)
    # Positions computed, padding included (none in the segment layout), counted after the timing.
    slots = sum(b.n_slots for step in timed for b in trainer.step_batches(step))
    result = SideResult("lorafit", examples, len(timed), wall, examples / wall, real / wall, slots / wall,
                        peak_memory_bytes(device), str(device))
    return result, trainer


def quotes_evaluator(tokenizer, val_texts: list[str], device: torch.device, compiled: bool = False):
    """lorafit's token-weighted evaluation, set up as the quotes recipe runs it (length policy, layout,
    batching, precision): a function of any PEFT model, so both sides are measured the same way."""
    cfg = load_config("quotes", [f"train.compile={str(compiled).lower()}"])
    val = tokenize_texts(val_texts, [0] * len(val_texts), tokenizer, cfg.data.seq_len, cfg.data.long_examples)
    autocast = resolve_precision(cfg.model.precision, device).autocast

    def run(model) -> dict:  # the fast paths are checked on each model: the peer's is not lorafit's
        forward = Forward(model, fast_paths_for(model, cfg, device, autocast), autocast, device=device)
        return evaluate_run(model, val, ["quotes"], scoring_for(cfg, forward, tokenizer))

    return run


def lorafit_generation_rates(model, tokenizer, prompts: list[str], batch_size: int) -> list[float]:
    """lorafit's inference path: LoRA merged into a copy of the base, then the same generate calls."""
    fast = merged_copy(model)
    return generation_rates(fast, tokenizer, prompts, batch_size)


def generation_report(rates_of, tokenizer, device: torch.device) -> dict:
    """Tokens/s at batch 1 and 16: the median of several timed calls, with min, max and their count."""
    reps = GEN_REPETITIONS.get(device.type, 5)
    out = {}
    for bs in (1, 16):
        prompts = [GEN_PROMPTS[i % len(GEN_PROMPTS)] for i in range(bs * reps)]
        rates = rates_of(tokenizer, prompts, bs)
        out[f"generation_tokens_per_second_batch{bs}"] = statistics.median(rates)
        out[f"generation_tokens_per_second_batch{bs}_spread"] = {"min": min(rates), "max": max(rates),
                                                                 "repetitions": len(rates)}
    return out


# ---------------------------------------------------------------- checks before anything runs


def min_examples(warmup_steps: int) -> int:
    """Both sides train whole steps of 8 examples; at least one must come after the warm-up."""
    return (warmup_steps + 1) * EXAMPLES_PER_STEP


def check_examples(n: int, warmup_steps: int, available: int) -> None:
    if warmup_steps < 0:
        raise LorafitError(f"--warmup-steps {warmup_steps}: must be 0 or more.")
    need = min_examples(warmup_steps)
    if n < need:
        raise LorafitError(f"--examples {n} is too few: with --warmup-steps {warmup_steps} the minimum is {need} "
                           f"({warmup_steps} untimed + 1 timed optimizer step of {EXAMPLES_PER_STEP} examples).")
    if n > available:
        raise LorafitError(f"--examples {n}: the training split has only {available}.")


def free_path(path: Path) -> Path:
    """`path`, or the first of path-2, path-3, ... that does not exist: a result is never overwritten."""
    candidate, n = path, 2
    while candidate.exists():
        candidate, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return candidate


def results_path(requested: str | None, default: Path) -> Path:
    """Where the JSON goes, settled before the run: a --json that exists is refused (before minutes of
    work, not after); the default gets a new name when one from the same day is there."""
    if requested:
        path = Path(requested)
        if path.exists():
            raise LorafitError(f"--json {path} exists; the bench never overwrites a result: pass a new path.")
        return path
    return free_path(default)


def write_new(path: Path, text: str) -> Path:
    """Write `text` to `path`, or to the next free name if `path` appeared meanwhile; returns where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            with open(path, "x", encoding="utf-8") as f:  # exclusive: fails rather than replace a file
                f.write(text)
            return path
        except FileExistsError:
            path = free_path(path)


# ---------------------------------------------------------------- report


def side_dict(r: SideResult, fpt: float, ceiling: float, extra: dict) -> dict:
    d = dict(r.__dict__)
    d["mfu"] = r.real_tokens_per_second * fpt / ceiling
    d.update(extra)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def print_table(results: dict) -> None:
    sides = {"baseline": results["baseline"], "lorafit": results["lorafit"], **results.get("peers", {})}
    rows = [("examples/s", "examples_per_second", ".2f"), ("real tokens/s", "real_tokens_per_second", ",.0f"),
            ("token slots/s", "token_slots_per_second", ",.0f"), ("wall s (timed)", "wall_seconds", ".1f"),
            ("peak memory MB", "peak_memory_bytes", ",.0f"), ("MFU (real tokens)", "mfu", ".1%"),
            ("val loss", "val_loss", ".4f"), ("eval samples/s", "eval_samples_per_second", ".1f"),
            ("gen tok/s batch 1", "generation_tokens_per_second_batch1", ".1f"),
            ("gen tok/s batch 16", "generation_tokens_per_second_batch16", ".1f")]
    table = Table(title=f"lorafit bench on {results['device']} ({results['examples']} examples/side)")
    table.add_column("")
    for s in sides:
        table.add_column(s, justify="right")
    for label, key, fmt in rows:
        cells = []
        for side in sides.values():
            v = side.get(key)
            if key == "peak_memory_bytes" and v is not None:
                v = v / 1e6
            cells.append("-" if v is None else format(v, fmt))
        table.add_row(label, *cells)
    Console(stderr=True).print(table)
    for key in ("speedup", "eval_speedup", "generation_speedup_batch16"):
        if results.get(key) is not None:
            print(f"{key}: {results[key]:.2f}x", file=sys.stderr)
    for name, x in results.get("speedup_vs", {}).items():
        print(f"speedup vs {name}: {x:.2f}x examples/s", file=sys.stderr)


def check_baseline_available() -> None:
    """The re-created original pipeline is transformers' Trainer, which needs accelerate at run time; lorafit itself
    does not (`accelerate launch` is only the user's launcher): it is in the bench extras, checked before any work."""
    if importlib.util.find_spec("accelerate") is None:
        raise LorafitError("lorafit bench re-creates the original pipeline with transformers' Trainer, which needs "
                           f"accelerate, which is not installed: {INSTALL}")


def main(args) -> int:
    check_baseline_available()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peers = parse_peers(getattr(args, "peers", None), device)
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else DEFAULT_TOKENIZER
    data = args.data or str(DEFAULT_DATA)  # --objective dpo: its own default (lorafit/bench/preference.py)
    if not args.tokenizer and not DEFAULT_TOKENIZER.is_dir():
        raise LorafitError(f"No tokenizer at {DEFAULT_TOKENIZER}; pass --tokenizer DIR (and --model, --data).")
    date = dt.date.today().isoformat()
    out = results_path(args.json, REPO / "bench" / "results" / f"{date}-{device.type}.json")
    tok_dir = _tokenizer_dir(tokenizer_dir)
    if getattr(args, "objective", "sft") == "dpo":  # pairs, not quotes: lorafit/bench/preference.py
        results = {"date": date, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                   f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
                   "torch": torch.__version__, "warmup_steps": args.warmup_steps,
                   "model": "random full-size gpt2" if not args.model else args.model,
                   **preference.main(args, ensure_model(args.model, tokenizer_dir), tok_dir, device, peers,
                                     str(SHARED / "data" / "mixture-samples" / "yelp_review_full" / "yelp_test.csv"))}
        print(json.dumps(results, indent=2))
        out = write_new(out, json.dumps(results, indent=2) + "\n")
        print(f"results written to {out}", file=sys.stderr)
        return 0
    train_texts, val_texts = quotes_split(data)
    check_examples(args.examples, args.warmup_steps, len(train_texts))
    texts = train_texts[: args.examples]
    if "trl" in peers and (need := trl_min_examples(texts, tok_dir, args.warmup_steps)):
        raise LorafitError(f"--examples {args.examples} is too few for --peers trl: TRL packs several examples into "
                           f"each row of its 8-row steps, so these make no timed step after --warmup-steps "
                           f"{args.warmup_steps}; the minimum here is about {need}.")
    model_dir = ensure_model(args.model, tokenizer_dir)
    fpt, (ceiling, ceiling_what) = None, matmul_ceiling(device)

    tokenizer = load_tokenizer(tok_dir)
    evaluate_quotes = quotes_evaluator(tokenizer, val_texts, device, compiled=args.compile)

    print(f"baseline: {len(texts)} examples ...", file=sys.stderr)
    base_res, base_model = run_baseline(model_dir, tok_dir, texts, warmup_steps=args.warmup_steps, device=str(device))
    # The same metric for every side: token-weighted NLL of the validation quotes (text + EOS).
    base_extra = {"val_loss": evaluate_quotes(base_model)["val_loss"]}
    if not args.skip_eval:
        base_extra["eval_samples_per_second"] = baseline_eval_samples_per_second(base_model, tokenizer, val_texts, str(device))
    if not args.skip_generation:
        base_extra.update(generation_report(lambda tok, prompts, bs: generation_rates(base_model, tok, prompts, bs),
                                            tokenizer, device))
    del base_model  # measured: lorafit's peak memory should not hold the baseline's model too
    gc.collect()

    print(f"lorafit: {len(texts)} examples ...", file=sys.stderr)
    lf_res, trainer = run_lorafit(model_dir, tok_dir, texts, warmup_steps=args.warmup_steps, device=device,
                                  compile=args.compile)
    fpt = flops_per_token(trainer.model.get_base_model())
    if not args.skip_eval:
        evaluate_quotes(trainer.model)  # warm-up, as the baseline gets one
    lf_eval = evaluate_quotes(trainer.model)
    lf_extra = {"val_loss": lf_eval["val_loss"]}
    if not args.skip_eval:
        lf_extra["eval_samples_per_second"] = lf_eval["eval_samples_per_second"]
    if not args.skip_generation:
        lf_extra.update(generation_report(lambda tok, prompts, bs: lorafit_generation_rates(trainer.model, tok, prompts, bs),
                                          tokenizer, device))
    del trainer  # as above: a peer's peak memory should not hold lorafit's model
    gc.collect()

    peer_results = {}
    for name, options in peers.items():
        print(f"{name}: {len(texts)} examples{' (Liger kernels)' if options['liger'] else ''} ...", file=sys.stderr)
        res, model, settings = run_trl(model_dir, tok_dir, texts, warmup_steps=args.warmup_steps, device=device,
                                       liger=options["liger"])
        # lorafit's own evaluator on the peer's trained PEFT model: the same validation examples and metric.
        peer_results[name] = side_dict(res, fpt, ceiling, {"val_loss": evaluate_quotes(model)["val_loss"],
                                                          "settings": settings})
        del model
        gc.collect()

    results = {
        "date": date,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "examples": len(texts),
        "warmup_steps": args.warmup_steps,
        "model": "random full-size gpt2" if not args.model else args.model,
        "flops_per_token": fpt,
        "flop_ceiling": ceiling,
        "flop_ceiling_source": ceiling_what,
        "baseline": side_dict(base_res, fpt, ceiling, base_extra),
        "lorafit": side_dict(lf_res, fpt, ceiling, lf_extra),
    }
    if peer_results:
        results["peers"] = peer_results
    results["speedup"] = lf_res.examples_per_second / base_res.examples_per_second
    if peer_results:
        results["speedup_vs"] = {name: lf_res.examples_per_second / r["examples_per_second"]
                                 for name, r in peer_results.items()}
    if not args.skip_eval:
        results["eval_speedup"] = lf_extra["eval_samples_per_second"] / base_extra["eval_samples_per_second"]
    if not args.skip_generation:
        results["generation_speedup_batch16"] = (
            lf_extra["generation_tokens_per_second_batch16"] / base_extra["generation_tokens_per_second_batch16"]
        )
    print_table(results)
    out = write_new(out, json.dumps(results, indent=2) + "\n")
    print(f"results written to {out}", file=sys.stderr)
    return 0


def _tokenizer_dir(path: Path) -> str:
    """A tokenizer directory transformers can load; the raw GPT-2 BPE files are converted once."""
    if not is_raw_gpt2_bpe(path):
        return str(path)
    out = default_cache_dir() / "tokenizers" / "gpt2"
    if not (out / "tokenizer_config.json").is_file():
        tokenizer_from_dir(path).save_pretrained(str(out))
    return str(out)
