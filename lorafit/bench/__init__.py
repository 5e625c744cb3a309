"""Benchmarks: the original pipeline re-created, and `lorafit bench`."""


def add_arguments(p) -> None:
    p.add_argument("--examples", type=int, default=160, help="training examples per side (default 160 = 20 steps)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--model", help="model dir or hub id (default: a random full-size gpt2, made once)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: ../shared/assets/gpt2-tokenizer)")
    p.add_argument("--data", default=None, help="quotes jsonl file or hub id (default: ../shared quotes)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None, help="where to write results (default: bench/results/<date>-<device>.json)")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--compile", action="store_true", help="lorafit side with torch.compile")
