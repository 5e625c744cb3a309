"""Data preparation at scale: lorafit's tokenisation against a plain batched `datasets.map` tokenisation of
the same texts, in documents/s and peak memory, at 100k and 1M short examples.

    python bench/data_scale.py [--sizes 100000 1000000] [--shared ../shared] [--note "..."]

Each (side, size) runs in a fresh process: the process builds the texts (short quote-like lines, seeded),
resets its peak RSS (VmHWM, by writing 5 to /proc/self/clear_refs) and notes its RSS, tokenises with GPT-2's
tokenizer (../shared/assets/gpt2-tokenizer), and reports the time, the peak RSS (VmHWM), the peak's rise over
the RSS before tokenising, and the token ids' own size (int32). The reset keeps a transient peak from before
the clock started (loading the tokenizer, building the texts) out of the rise; where it is refused, the
lifetime peak (ru_maxrss) is reported and `peak_since` says so. lorafit: `tokenize_texts` (EOS appended,
length policy truncate at 1024, scored bytes counted); baseline: `Dataset.from_dict({"text": texts}).map(
tokenizer, batched=True)` with the same batch size, ids only (no EOS, no policy). `--repeats R` alternates
the two sides R times a size. Writes bench/results/<date>-data-scale-cpu.json (a new name if that exists).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over love life mind heart truth world").split()


def texts(n: int, seed: int = 0) -> list[str]:
    """n quote-like lines of 4 to 40 words (english_quotes' quotes average ~30 words)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 40))).capitalize() + "." for _ in range(n)]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> str:
    """Start the process's peak RSS afresh: 'reset', or 'process start' where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "reset"
    except OSError:
        return "process start"


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one_case(side: str, n: int, shared: Path) -> dict:
    """Runs in its own process: one side at one size."""
    from transformers import GPT2Tokenizer

    from lorafit.data.tokenize import TOKENIZE_BATCH, tokenize_texts

    d = shared / "assets" / "gpt2-tokenizer"
    tokenizer = GPT2Tokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    docs = texts(n)
    tokenizer(docs[:10])  # warm: the first call builds caches neither side should be charged for
    if side != "lorafit":
        import datasets  # imported before the clock starts, as lorafit's modules are

        datasets.disable_progress_bars()
    since = reset_peak_rss()
    before = rss_mb()
    start = time.perf_counter()
    if side == "lorafit":
        split = tokenize_texts(docs, [0] * n, tokenizer, 1024, "truncate")
        n_tokens = len(split.ids)
    else:
        ds = datasets.Dataset.from_dict({"text": docs}).map(
            lambda b: tokenizer(b["text"], add_special_tokens=False, return_attention_mask=False),
            batched=True, batch_size=TOKENIZE_BATCH, remove_columns=["text"])
        import pyarrow.compute as pc

        n_tokens = int(pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py())
    seconds = time.perf_counter() - start
    ids_mb = 4 * n_tokens / 2**20
    peak = peak_rss_mb()
    return {"side": side, "examples": n, "seconds": round(seconds, 2), "docs_per_s": round(n / seconds),
            "tokens": n_tokens, "token_ids_mb": round(ids_mb, 1), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(peak, 1), "peak_rise_mb": round(peak - before, 1),
            "peak_rise_over_ids": round((peak - before) / ids_mb, 2), "peak_since": since}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--shared", default=str(REPO.parent / "shared"))
    p.add_argument("--note", default="", help="conditions of the run (e.g. a machine shared with other jobs)")
    p.add_argument("--json", default=None)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each side per size, alternated; the ratios take the median rate, the largest rise")
    p.add_argument("--case", nargs=2, metavar=("SIDE", "N"), help=argparse.SUPPRESS)  # a child process's one case
    args = p.parse_args()
    if args.case:
        print(json.dumps(one_case(args.case[0], int(args.case[1]), Path(args.shared))))
        return 0
    from lorafit.bench.run import results_path, write_new

    # Settled before minutes of work: an existing --json is refused now, the default gets a free name.
    out = results_path(args.json, REPO / "bench" / "results" / f"{datetime.date.today().isoformat()}-data-scale-cpu.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    results = []
    for n in args.sizes:
        for _ in range(args.repeats):  # alternated, so both sides see the same drift in the machine's load
            for side in ("baseline", "lorafit"):
                stdout = subprocess.run([sys.executable, __file__, "--case", side, str(n), "--shared", args.shared],
                                        check=True, capture_output=True, text=True, env=env).stdout
                results.append(json.loads(stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    ratios = {}
    for n in args.sizes:
        rate = {s: statistics.median(r["docs_per_s"] for r in results if r["side"] == s and r["examples"] == n)
                for s in ("baseline", "lorafit")}
        ratios[str(n)] = {"docs_per_s_vs_baseline": round(rate["lorafit"] / rate["baseline"], 2),
                          "lorafit_peak_rise_over_ids": max(r["peak_rise_over_ids"] for r in results
                                                            if r["side"] == "lorafit" and r["examples"] == n)}
    record = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "note": args.note,
              "load_average_at_end": os.getloadavg(), "cases": results, "lorafit_vs_baseline": ratios}
    out = write_new(out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
