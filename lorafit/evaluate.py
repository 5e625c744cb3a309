"""Validation: token-weighted loss, perplexity and bits, overall and per source, with throughput."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from lorafit import distributed as dist
from lorafit.data.packing import micro_batches, shape_multiple
from lorafit.data.tokenize import TokenizedSplit
from lorafit.fastpath import FastPaths
from lorafit.loss import token_nll
from lorafit.metrics import NllTotals


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def example_nll(model, split: TokenizedSplit, *, device, autocast_dtype, fast: FastPaths, batch_tokens: int, pad_id: int):
    """Summed NLL of every example (float64, on CPU), in the layout and head loss `fast` allows. Data
    parallel: each rank scores its token-balanced share and the sums are reduced (exact: disjoint shares)."""
    totals = torch.zeros(len(split), dtype=torch.float64, device=device)
    mine = dist.my_share(np.arange(len(split)), split.lengths() - 1)
    for batch in micro_batches(split, mine, fast.layout, batch_tokens, pad_id, shape_multiple(device)):
        batch = batch.to(device)
        with autocast_context(device, autocast_dtype):
            nll, example = token_nll(model, batch, fused=fast.fused_head)
        totals.index_add_(0, example, nll.double())
    return dist.all_reduce_sum(totals).cpu().numpy()


def evaluate(
    model,
    split: TokenizedSplit,
    source_names: list[str],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    fast: FastPaths,
    batch_tokens: int,
    pad_id: int,
) -> dict:
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll = example_nll(
        model, split, device=device, autocast_dtype=autocast_dtype, fast=fast, batch_tokens=batch_tokens, pad_id=pad_id
    )
    seconds = time.perf_counter() - start
    model.train(was_training)

    targets = split.lengths() - 1
    by_source = {}
    overall = NllTotals()
    for s, name in enumerate(source_names):
        sel = split.sources == s
        t = NllTotals(float(nll[sel].sum()), int(targets[sel].sum()), int(split.n_bytes[sel].sum()), int(sel.sum()))
        overall = overall + t
        by_source[name] = {**t.metrics(), "tokens": t.tokens, "examples": t.examples}
    return {
        **overall.metrics(),
        "val_examples": overall.examples,
        "val_tokens": overall.tokens,
        "val_bytes": overall.bytes,
        "eval_seconds": seconds,
        "eval_samples_per_second": overall.examples / seconds if seconds > 0 else float("nan"),
        "eval_tokens_per_second": overall.tokens / seconds if seconds > 0 else float("nan"),
        "val_by_source": by_source,
    }
