"""Text rows from the configured sources: load, filter, cap, split into train/validation.

The split reproduces `datasets.Dataset.train_test_split(test_size=f, seed=s)` for each source:
a PCG64 permutation seeded with `s`, the first ceil(f * n) rows held out. With `stratify` (the
default) every source is split on its own, so every source is in validation; otherwise the
pooled rows are split at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafit.config import DataConfig, SourceConfig
from lorafit.data import label_pairs
from lorafit.data.filters import filter_texts, is_usable
from lorafit.data.formats import read_local_texts
from lorafit.data.hub import read_hub_texts
from lorafit.data.paths import is_local, resolve_path
from lorafit.data.tokenize import default_cache_dir
from lorafit.errors import DataError, LorafitError

@dataclass
class Corpus:
    """Examples of every source after filtering, capping and splitting: texts, or for prompt_completion
    and chat sources the dicts of lorafit/data/examples.py (rendered with the tokenizer, later)."""

    source_names: list[str]
    train_texts: list[str] = field(default_factory=list)
    train_sources: list[int] = field(default_factory=list)
    val_texts: list[str] = field(default_factory=list)
    val_sources: list[int] = field(default_factory=list)


def read_source(name: str, src: SourceConfig, root: str | None, seed: int, cache_dir: Path | None = None) -> list[str]:
    """All usable texts of one source: read, filtered, deduplicated and capped (seeded).
    A capped hub source is streamed once and then read from `cache_dir` (see hub.py)."""
    if src.pair_by_label is not None:  # labelled texts, paired after reading (lorafit/data/label_pairs.py)
        labelled = read_source(name, label_pairs.as_labelled(src, is_local(src, root)), root, seed, cache_dir)
        return cap_texts(filter_texts(label_pairs.pairs(labelled, src, seed), src, name), src.max_examples, seed)
    if is_local(src, root):
        texts = read_local_texts(resolve_path(src.path, root), src, name)
        texts = filter_texts(texts, src, name)
        where = str(resolve_path(src.path, root))
    else:
        texts = read_hub_texts(name, src, seed, cache_dir)  # already filtered; capped while streaming
        where = f"hub dataset {src.path}"
    if not texts:
        raise DataError(
            f"Source '{name}' ({where}) has no examples left after filtering (empty texts and texts "
            f"shorter than min_chars={src.min_chars} are dropped). Check data.sources.{name}.text_field "
            "and the filters."
        )
    return cap_texts(texts, src.max_examples, seed)


def cap_texts(texts: list[str], cap: int | None, seed: int) -> list[str]:
    """A seeded random subset of `cap` texts, kept in their original order."""
    if cap is None or len(texts) <= cap:
        return texts
    chosen = np.sort(np.random.default_rng(seed).choice(len(texts), size=cap, replace=False))
    return [texts[i] for i in chosen]


def split_indices(n: int, val_fraction: float, seed: int, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices exactly as datasets' train_test_split(test_size, seed) returns them."""
    n_val = math.ceil(val_fraction * n)
    if n_val >= n:
        raise DataError(
            f"Cannot hold out {val_fraction:.0%} of {n} example(s){what} and keep any for training; "
            "add data or lower data.val_fraction."
        )
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val:], perm[:n_val]


def weighted_indices(n: int, weight: float, seed: int) -> np.ndarray:
    """Training rows for a source with sampling weight w: w * n rows, whole copies plus a seeded sample."""
    if weight == 1.0:
        return np.arange(n)
    target = max(1, round(weight * n))
    copies, rest = divmod(target, n)
    extra = np.sort(np.random.default_rng(seed).choice(n, size=rest, replace=False))
    return np.concatenate([np.tile(np.arange(n), copies), extra])


def load_corpus(data: DataConfig) -> Corpus:
    names = list(data.sources)
    corpus = Corpus(source_names=names)
    cache = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
    per_source = [read_source(name, data.sources[name], data.root, data.split_seed, cache) for name in names]
    weights = [data.sources[name].weight for name in names]
    if data.stratify:
        for i, texts in enumerate(per_source):
            train, val = split_indices(len(texts), data.val_fraction, data.split_seed, f" of source '{names[i]}'")
            _add(corpus, i, texts, train, val, weights[i], data.split_seed)
        return corpus
    pooled = [(i, t) for i, texts in enumerate(per_source) for t in texts]
    train, val = split_indices(len(pooled), data.val_fraction, data.split_seed)
    if any(w != 1.0 for w in weights):  # weights apply to each source's training rows, as when stratified
        owner = np.array([pooled[idx][0] for idx in train], dtype=np.int64)
        train = np.concatenate(
            [train[owner == i][weighted_indices(int((owner == i).sum()), w, data.split_seed)] for i, w in enumerate(weights)
             if (owner == i).any()]
        )
    for idx in train:
        corpus.train_sources.append(pooled[idx][0])
        corpus.train_texts.append(pooled[idx][1])
    for idx in val:
        corpus.val_sources.append(pooled[idx][0])
        corpus.val_texts.append(pooled[idx][1])
    return corpus


def _add(corpus: Corpus, source: int, texts: list[str], train, val, weight: float, seed: int) -> None:
    train = train[weighted_indices(len(train), weight, seed)]
    corpus.train_texts += [texts[i] for i in train]
    corpus.train_sources += [source] * len(train)
    corpus.val_texts += [texts[i] for i in val]
    corpus.val_sources += [source] * len(val)


def hub_sources(data: DataConfig) -> list[str]:
    return [name for name, src in data.sources.items() if not is_local(src, data.root)]


def offline_hint(data: DataConfig, model_name: str | None = None) -> str:
    """The overrides that point a run at local files instead of the Hub."""
    parts = []
    if model_name is not None:
        parts.append("model.name=LOCAL_MODEL_DIR   (a saved model, or one made by `lorafit init-model`)")
    parts += [f"data.sources.{n}.path=LOCAL_FILE   (.jsonl, .json, .csv, .txt or .parquet)" for n in hub_sources(data)]
    return "".join(f"\n  {p}" for p in parts)


__all__ = ["Corpus", "load_corpus", "split_indices", "filter_texts", "is_usable", "cap_texts", "LorafitError"]
