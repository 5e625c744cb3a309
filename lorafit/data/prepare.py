"""From a RunConfig's data section to tokenised splits: read, split, render, tokenise (cached).

Training prepares both splits on rank 0 and broadcasts them (`share_data`); `lorafit eval` asks
for validation alone, and never tokenises the training set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafit import distributed as dist
from lorafit.config import RunConfig
from lorafit.console import log
from lorafit.data.sources import load_corpus
from lorafit.data.templates import render_examples, render_pairs
from lorafit.data.tokenize import TokenizedSplit, default_cache_dir, policy_summary, tokenize_cached
from lorafit.errors import LorafitError

SPLITS = ("train", "val")
SPLIT_ARRAYS = ("ids", "offsets", "sources", "n_bytes", "truncated", "scored")  # scored: None for plain text


@dataclass
class Data:
    train: TokenizedSplit | None  # None: not asked for (`lorafit eval` scores validation only)
    val: TokenizedSplit
    source_names: list[str]
    val_held_out: int | None = None  # validation examples held out, before eval.max_examples takes its sample


def prepare_data(cfg: RunConfig, tokenizer, splits: tuple[str, ...] = SPLITS, progress: bool = True) -> Data:
    """The tokenised `splits` (train, val or both). Every source is still read whole: which texts are
    validation is decided by the seeded split of all of them."""
    d = cfg.data
    corpus = load_corpus(d)
    cache = Path(d.cache_dir) if d.cache_dir else default_cache_dir()
    texts = {"train": (corpus.train_texts, corpus.train_sources), "val": (corpus.val_texts, corpus.val_sources)}
    out, hits = {}, []
    pairs = cfg.train.objective != "sft"  # a preference objective: each pair is two sequences, 2i and 2i + 1
    for name in splits:
        items, sources = texts[name]
        # prompt-completion and chat examples become text segments, scored or not (texts stay as they are)
        if pairs:
            rendered, sources = render_pairs(items, sources, d, tokenizer)
        else:
            rendered = render_examples(items, sources, d, tokenizer)
        out[name], hit = tokenize_cached(rendered, sources, tokenizer, d.seq_len, d.long_examples, cache, progress=progress,
                                         pairs=pairs)
        hits.append(hit)
    val = out.get("val")
    held_out = len(val) if val is not None else None
    if val is not None and cfg.eval.max_examples is not None and len(val) > cfg.eval.max_examples * (1 + pairs):
        # every source keeps its share of validation; pairs: the first max_examples pairs (already in random order)
        out["val"] = val = (val.subset(np.arange(2 * cfg.eval.max_examples)) if pairs
                            else val.head_per_source(cfg.eval.max_examples))
    if any(len(split) == 0 for split in out.values()):
        empty = " and ".join(name for name, split in out.items() if len(split) == 0)
        raise LorafitError(f"No {empty} examples are left after tokenisation; check the data and data.seq_len.")
    train = out.get("train")
    counts = [f"{len(train):,} train" if train is not None else "", f"{len(val):,} val" if val is not None else ""]
    log(
        f"data: {' / '.join(c for c in counts if c)} examples"
        + (f", {train.n_targets:,} train target tokens" if train is not None else "")
        + (" (tokenised data from cache)" if all(hits) else "")
        + (f"; {int(train.truncated.sum()):,} truncated" if train is not None else "")
    )
    if train is not None:
        policy = policy_summary(train.policy_counts, corpus.source_names, d.long_examples, masked_sources(d))
        if any(v for c in policy.values() for k, v in c.items() if k != "truncated"):
            log(f"length policy ({d.long_examples}) on training examples: {policy}")
    return Data(train, val, corpus.source_names, held_out)


def masked_sources(d) -> list[bool]:
    """Per source (in order): whether its examples have unscored tokens (prompt_completion, chat)."""
    return [src.kind != "text" for src in d.sources.values()]


def share_data(data: Data | None) -> Data:
    """Rank 0's data on every rank (the identity on one process): the others never read or tokenise.
    (The length-policy counts stay on rank 0, which alone writes summary.json.)"""
    if not dist.world().parallel:
        return data
    arrays = None if data is None else {f"{part}.{name}": getattr(getattr(data, part), name)
                                        for part in SPLITS for name in SPLIT_ARRAYS
                                        if getattr(getattr(data, part), name) is not None}
    arrays, names = dist.broadcast_arrays(arrays, None if data is None else data.source_names)
    split = lambda part: TokenizedSplit(**{name: arrays.get(f"{part}.{name}") for name in SPLIT_ARRAYS})  # noqa: E731
    return Data(split("train"), split("val"), names)
