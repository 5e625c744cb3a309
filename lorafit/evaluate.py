"""Validation: token-weighted loss, perplexity and bits, overall and per source, with throughput."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorafit import distributed as dist
from lorafit.config import build_config, load_yaml
from lorafit.console import log, progress_bar
from lorafit.data.packing import Layout, default_micro_tokens, micro_batches, shape_multiple
from lorafit.data.tokenize import TokenizedSplit
from lorafit.forward import PLAIN, FastPaths, Forward
from lorafit.lora import unwrapped
from lorafit.measure import device_name
from lorafit.metrics import NllTotals
from lorafit.modeling import Precision
from lorafit.rundir import CONFIG_FILE, SUMMARY_FILE


@dataclass(frozen=True)
class Scoring:
    """How a model's examples are scored: by which forward (its device, precision and fast paths, checked on
    that model), and how many tokens a forward pass."""

    forward: Forward
    batch_tokens: int
    pad_id: int

    @property
    def device(self) -> torch.device:
        return self.forward.device

    @property
    def fast(self) -> FastPaths:
        return self.forward.fast


def scoring_for(cfg, forward: Forward, tokenizer) -> Scoring:
    """The Scoring of a RunConfig (eval.batch_tokens) with `forward`, the model's one forward."""
    batch_tokens = cfg.eval.batch_tokens or 4 * default_micro_tokens(forward.device)
    return Scoring(forward, batch_tokens, tokenizer.pad_token_id)


@torch.inference_mode()
def example_nll(model, split: TokenizedSplit, scoring: Scoring, progress: str | None = None):
    """Summed NLL of every example (float64, on CPU), in the layout and head loss `scoring.fast` allows. Data
    parallel: each rank scores its token-balanced share and the sums are reduced (exact: disjoint shares).
    `progress`: the label of a progress bar over the batches (where one can draw)."""
    device, fast, forward = scoring.device, scoring.fast, scoring.forward
    totals = torch.zeros(len(split), dtype=torch.float64, device=device)
    mine = dist.my_share(np.arange(len(split)), split.lengths() - 1)
    batches = micro_batches(split, mine, fast.layout, scoring.batch_tokens, scoring.pad_id, shape_multiple(device))
    if dist.sharded():  # every forward is a collective: as many on every rank, the extra ones not counted
        idle = micro_batches(split, np.arange(1), fast.layout, scoring.batch_tokens, scoring.pad_id, shape_multiple(device))
        batches += [None] * (dist.common_count(len(batches)) - len(batches))
    bar = progress_bar(len(batches), progress, "batch", progress is not None)
    for batch in batches:
        if bar is not None:
            bar.update(1)
        counted = batch is not None
        batch = (batch if counted else idle[0]).to(device)
        nll, example = forward.token_nll(batch)
        if counted:
            totals.index_add_(0, example, nll.double())
    if bar is not None:
        bar.close()
    return dist.all_reduce_sum(totals).cpu().numpy()


def evaluate_run(model, split: TokenizedSplit, source_names: list[str], scoring: Scoring,
                 progress: str | None = None) -> dict:
    """Token-weighted validation metrics of `model` on `split`, overall and per source, with throughput:
    what training, `lorafit eval`, the forgetting comparison and the bench all report. `progress`: a bar's label
    (the commands that otherwise say nothing while scoring)."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll = example_nll(model, split, scoring, progress)
    seconds = time.perf_counter() - start
    model.train(was_training)

    targets = split.targets_per_example()  # scored targets only: a prompt's tokens are context
    overall, by_source = totals_by_source(nll, targets, split.n_bytes, split.sources, source_names)
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


def totals_by_source(nll, targets, n_bytes, sources, source_names: list[str]) -> tuple[NllTotals, dict]:
    """(overall totals, each source's metrics with its tokens and examples) from per-example NLL sums, scored
    targets, bytes and source indices: the one token-weighted reduction every evaluation reports."""
    by_source, overall = {}, NllTotals()
    for s, name in enumerate(source_names):
        sel = sources == s
        t = NllTotals(float(nll[sel].sum()), int(targets[sel].sum()), int(n_bytes[sel].sum()), int(sel.sum()))
        overall = overall + t
        by_source[name] = {**t.metrics(), "tokens": t.tokens, "examples": t.examples}
    return overall, by_source


def saved_scoring(run, cfg, model, tokenizer, precision: Precision, *, base: str | None = None) -> Scoring:
    """The Scoring of a trained run's adapter, with no probe: the fast paths training checked on this
    model (summary.json's `fast_paths`) where the model is loaded and scored as it was trained, else
    PLAIN, exact by construction. Either way no fast path goes unchecked on the model that uses it.
    `precision`: the one the model was loaded with (resolved once, by the caller)."""
    fast, why_not = recorded_fast_paths(run, cfg, model, base)
    if fast is None:
        log(f"scoring one example a row with the model's own logits: {why_not}")
    device = next(model.parameters()).device
    return scoring_for(cfg, Forward(model, fast or PLAIN, precision.autocast, device=device), tokenizer)


def recorded_fast_paths(run, cfg, model, base: str | None) -> tuple[FastPaths | None, str]:
    """(the fast paths of the finished run in `run`, or None and why they do not apply to `model` now)."""
    run = Path(run)
    try:
        summary = json.loads((run / SUMMARY_FILE).read_text(encoding="utf-8"))
        recorded = summary["fast_paths"]
        trained = build_config(load_yaml((run / CONFIG_FILE).read_text(encoding="utf-8"), str(run / CONFIG_FILE)) or {})
        fast = FastPaths(Layout(recorded["packing"], recorded["row_len"]), bool(recorded["fused_head"]),
                         dict(recorded["why_not"]))
    except Exception:  # noqa: BLE001 - no finished lorafit run here (a bare adapter), or its files are not ours
        return None, f"no fast paths recorded by a finished run in {run}"
    device = next(model.parameters()).device
    loaded_attention = getattr(unwrapped(model).config, "_attn_implementation", None)
    trained_attention = summary.get("attn_implementation")
    differences = [
        (base is not None and base != trained.model.name, f"another base (--base {base})"),
        (device_name(device) != summary.get("device"), f"another device ({device_name(device)}, trained on "
                                                        f"{summary.get('device')})"),
        (loaded_attention != trained_attention, f"attention {loaded_attention}, trained with {trained_attention}"),
        (cfg.model != trained.model, "model settings differ from the run's"),
        ((cfg.data.seq_len, cfg.data.packing, cfg.data.pack_len) != (trained.data.seq_len, trained.data.packing,
                                                                       trained.data.pack_len),
         "data.seq_len, data.packing or data.pack_len differ from the run's"),
    ]
    why = [reason for differs, reason in differences if differs]
    return (None, "; ".join(why) + " (the run's checked fast paths do not apply)") if why else (fast, "")
