"""Tokenise once: append EOS, apply the length policy, count scored bytes, cache the result.

An example of n tokens (EOS included) is trained as n - 1 next-token predictions: inputs are
tokens[:-1], targets tokens[1:]. So every position that is computed is scored, and the EOS is
always a target unless truncation cut it off.

Length policies for examples longer than `seq_len` tokens:
- truncate: keep the first seq_len tokens (as the published recipes do; the EOS is lost);
- chunk: split into windows of seq_len tokens that overlap by one token, so every target token
  of the document is scored exactly once;
- drop: leave the example out.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKENIZE_BATCH = 1000
CACHE_VERSION = 1


@dataclass
class TokenizedSplit:
    """Examples as one flat token array plus offsets (cheap to cache and to slice)."""

    ids: np.ndarray  # int32, all examples back to back
    offsets: np.ndarray  # int64, len n + 1
    sources: np.ndarray  # int32, source index per example
    n_bytes: np.ndarray  # int64, UTF-8 bytes of each example's scored (target) text
    truncated: np.ndarray  # bool, the example lost tokens to truncation

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_targets(self) -> int:
        return int((self.lengths() - 1).sum())

    def subset(self, indices: np.ndarray) -> "TokenizedSplit":
        parts = [self.example(i) for i in indices]
        lens = np.array([len(p) for p in parts], dtype=np.int64)
        return TokenizedSplit(
            ids=np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32),
            offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
            sources=self.sources[indices],
            n_bytes=self.n_bytes[indices],
            truncated=self.truncated[indices],
        )


def apply_length_policy(ids: list[int], seq_len: int, policy: str) -> tuple[list[list[int]], bool]:
    """Pieces of one example (tokens incl. EOS) after the policy, and whether tokens were lost."""
    if len(ids) <= seq_len:
        return [ids], False
    if policy == "truncate":
        return [ids[:seq_len]], True
    if policy == "drop":
        return [], True
    stride = seq_len - 1  # consecutive windows share one token: the last input of one is the context of the next
    pieces = [ids[start : start + seq_len] for start in range(0, len(ids) - 1, stride)]
    return [p for p in pieces if len(p) >= 2], False


def tokenize_texts(
    texts: list[str],
    sources: list[int],
    tokenizer,
    seq_len: int,
    policy: str,
    progress: bool = False,
) -> TokenizedSplit:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; lorafit appends one to every example")
    pieces: list[list[int]] = []
    piece_sources: list[int] = []
    truncated: list[bool] = []
    starts = range(0, len(texts), TOKENIZE_BATCH)
    if progress and len(texts) > 5 * TOKENIZE_BATCH:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="tokenising", unit_scale=TOKENIZE_BATCH, unit="ex")
    for start in starts:
        batch = tokenizer(texts[start : start + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
        for j, ids in enumerate(batch):
            parts, lost = apply_length_policy(list(ids) + [eos], seq_len, policy)
            parts = [p for p in parts if len(p) >= 2]  # an example needs at least one target
            pieces += parts
            piece_sources += [sources[start + j]] * len(parts)
            truncated += [lost] * len(parts)
    lens = np.array([len(p) for p in pieces], dtype=np.int64)
    decoded = tokenizer.batch_decode([p[1:] for p in pieces], skip_special_tokens=True)
    return TokenizedSplit(
        ids=np.fromiter((t for p in pieces for t in p), dtype=np.int32, count=int(lens.sum())),
        offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        sources=np.array(piece_sources, dtype=np.int32),
        n_bytes=np.array([len(d.encode("utf-8")) for d in decoded], dtype=np.int64),
        truncated=np.array(truncated, dtype=bool),
    )


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    h = hashlib.sha256(json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id, vocab]).encode())
    return h.hexdigest()[:16]


def cache_key(texts: list[str], sources: list[int], tokenizer_fp: str, seq_len: int, policy: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{tokenizer_fp}|{seq_len}|{policy}|{len(texts)}".encode())
    for text, src in zip(texts, sources):
        h.update(f"{src}|{len(text)}|".encode())
        h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit"))


def tokenize_cached(
    texts: list[str],
    sources: list[int],
    tokenizer,
    seq_len: int,
    policy: str,
    cache_dir: Path | None,
    progress: bool = False,
) -> tuple[TokenizedSplit, bool]:
    """Tokenise, reusing a cached result for identical texts/tokenizer/policy. Returns (split, hit)."""
    if cache_dir is None:
        return tokenize_texts(texts, sources, tokenizer, seq_len, policy, progress), False
    key = cache_key(texts, sources, tokenizer_fingerprint(tokenizer), seq_len, policy)
    path = Path(cache_dir) / "tokens" / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return TokenizedSplit(**{k: z[k] for k in TokenizedSplit.__dataclass_fields__}), True
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is rebuilt below
    split = tokenize_texts(texts, sources, tokenizer, seq_len, policy, progress)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **{k: getattr(split, k) for k in TokenizedSplit.__dataclass_fields__})
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except OSError:
        pass  # caching is an optimisation; an unwritable cache dir must not stop the run
    return split, False
