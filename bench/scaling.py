"""Data-parallel scaling: the same lorafit run in 1 and in N processes (torchrun through `--nproc`),
side by side, on whatever devices are here (N GPUs, or N CPU processes sharing this machine's cores).

    python bench/scaling.py [--nproc 2] [--steps 12] [--shared ../shared]

Writes bench/results/<date>-scaling-<device>.json (a new name if that exists) with each side's training
tokens/s (from its summary.json) and the ratio. Takes ~4 minutes on a 2-core CPU at the defaults.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lorafit(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "lorafit", *args], check=True, cwd=REPO, env={**os.environ, **(env or {})})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps a side (32 examples each)")
    p.add_argument("--shared", default=str(REPO.parent / "shared"))
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads a process (default 1: the same per-process compute on both sides; a loaded "
                        "machine makes several threads a process spin, which would distort the 1-process side)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    shared = Path(args.shared)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{os.cpu_count()}cores"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "gpt2-random"
        lorafit("init-model", "--config", "gpt2", "--tokenizer", str(shared / "assets" / "gpt2-tokenizer"), str(model))
        common = ["train", "quotes", f"model.name={model}",
                  f"data.sources.quotes.path={shared / 'data' / 'english_quotes' / 'quotes.jsonl'}",
                  f"train.max_steps={args.steps}", "train.batch_size=8", "train.grad_accum=4", "eval.before_training=false",
                  "eval.max_examples=8", "eval.sample_prompt=null", f"data.cache_dir={tmp / 'cache'}", "--no-progress"]
        sides = {}
        for n in (1, args.nproc):
            out = tmp / f"run-{n}"
            threads = args.threads
            load_before = os.getloadavg()[0]  # other work on the machine, recorded beside the figures
            lorafit(*common, f"output_dir={out}", "--nproc", str(n), env={"OMP_NUM_THREADS": str(threads)})
            summary = json.loads((out / "summary.json").read_text())
            sides[n] = {"processes": n, "threads_per_process": threads, "train_tokens": summary["train_tokens"],
                        "train_seconds": summary["train_seconds"], "tokens_per_second": summary["train_tokens_per_second"],
                        "val_loss": summary["val_loss"], "load_average_before": load_before}
    result = {
        "date": datetime.date.today().isoformat(), "device": device, "model": "gpt2 (random init, 124M)",
        "recipe": "quotes, 32 examples a step", "steps": args.steps, "sides": list(sides.values()),
        "speedup": sides[args.nproc]["tokens_per_second"] / sides[1]["tokens_per_second"],
    }
    name = args.json or str(REPO / "bench" / "results" / f"{result['date']}-scaling-{device.replace(' ', '-')}.json")
    path = Path(name)
    while path.exists():  # never write over a committed result
        path = path.with_name(path.stem + "-2" + path.suffix)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
