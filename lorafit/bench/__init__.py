"""Benchmarks: the original pipeline re-created, and `lorafit bench`."""


# Measured on the 2-core CPU this project runs on (2026-12-01, random full-size GPT-2, defaults,
# --peers trl): 513 s and 1,019 s, as other work on the machine came and went.
DURATION = ("A run with the defaults and --peers trl took 9-17 minutes on a shared 2-core CPU (TRL's "
            "side is ~1 minute of it); --skip-generation and --skip-eval make it shorter.")


def add_arguments(p) -> None:
    p.description = ("Train the same quotes examples with lorafit and with the original HF Trainer pipeline (and, "
                     "with --peers, TRL's SFTTrainer), back to back, and write the measurements as JSON. " + DURATION)
    p.add_argument("--examples", type=int, default=160, help="training examples per side (default 160 = 20 steps of 8; at least 8 x (warm-up steps + 1))")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--model", help="model dir or hub id (default: a random full-size gpt2, made once)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: ../shared/assets/gpt2-tokenizer)")
    p.add_argument("--data", default=None, help="quotes jsonl file or hub id (default: ../shared quotes)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None, help="where to write results; must not exist (default: bench/results/<date>-<device>.json, "
                                                "or -2, -3, ... after it: never overwritten)")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--compile", action="store_true", help="lorafit side with torch.compile")
    p.add_argument("--objective", default="sft", choices=("sft", "dpo"),
                   help="dpo: DPO on the sentiment-dpo-offline pairs (--examples pairs) against TRL's DPOTrainer with "
                        "--peers trl, the reference precomputed by lorafit (its time counted) and per step by TRL")
    p.add_argument("--peers", default=None, metavar="trl[,liger]",
                   help="also train the same examples with TRL's SFTTrainer (padding-free packing); trl,liger adds "
                        "Liger's kernels (CUDA only). Needs pip install -e \".[bench]\"")
