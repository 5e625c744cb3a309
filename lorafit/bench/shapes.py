"""Training throughput at the mixture8 shape: 32 examples of 512 tokens an optimizer step.

Long documents chunked to seq_len 512 fill their rows, so this is the shape most of a mixture8
epoch runs at. Tokens are random ids: the arithmetic is the same as for real text.
"""

from __future__ import annotations

import numpy as np
import torch

from lorafit.bench.run import build_trainer, flops_per_token, time_steps
from lorafit.data.tokenize import TokenizedSplit
from lorafit.measure import peak_memory_bytes, reset_peak_memory

MIXTURE8 = ["data.seq_len=512", "data.pack_len=512", "lora.targets=[c_attn, c_proj]", "lora.dropout=0.1",
            "train.batch_size=4", "train.grad_accum=8", "train.lr=3e-4", "train.weight_decay=0.01"]


def random_split(n: int, length: int, vocab: int, seed: int = 0) -> TokenizedSplit:
    ids = np.random.default_rng(seed).integers(0, vocab - 1, size=n * length).astype(np.int32)
    return TokenizedSplit(
        ids=ids, offsets=np.arange(0, n * length + 1, length, dtype=np.int64), sources=np.zeros(n, np.int32),
        n_bytes=np.zeros(n, np.int64), truncated=np.zeros(n, bool),
    )


def mixture_shape_throughput(model_dir: str, tokenizer_dir: str, device: torch.device, *, steps: int = 30,
                             warmup_steps: int = 5, extra: list[str] = (), ceiling: float | None = None) -> dict:
    reset_peak_memory(device)
    split = random_split(32 * steps, 512, vocab=50257)
    trainer = build_trainer(model_dir, tokenizer_dir, split, [*MIXTURE8, *extra], device=device, total_steps=steps)
    wall, tokens, examples = time_steps(trainer, warmup_steps)
    fpt = flops_per_token(trainer.model.get_base_model())
    result = {
        "shape": "32 x 512 tokens per optimizer step, LoRA on c_attn + c_proj",
        "overrides": list(extra),
        "timed_steps": steps - warmup_steps,
        "real_tokens_per_second": tokens / wall,
        "examples_per_second": examples / wall,
        "peak_memory_bytes": peak_memory_bytes(device),
        "flops_per_token": fpt,
    }
    if ceiling:
        result["mfu"] = tokens / wall * fpt / ceiling
    return result
