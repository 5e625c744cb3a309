"""Tokenise once: append EOS, apply the length policy, count scored bytes, cache the result.

An example of n tokens (EOS included) is trained as n - 1 next-token predictions: inputs are
tokens[:-1], targets tokens[1:]. So every position that is computed is scored, and the EOS is
always a target unless truncation cut it off.

Length policies for examples longer than `seq_len` tokens:
- truncate: keep the first seq_len tokens (as the published recipes do; the EOS is lost);
- chunk: split into windows of seq_len tokens that overlap by one token, so every target token
  of the document is scored exactly once;
- drop: leave the example out.

Under truncate and drop a text longer than seq_len * CHARS_PER_TOKEN characters is cut before it is
tokenised (a 50 MB line would otherwise take gigabytes to keep 64 tokens, or none). The cut is exact: it falls at a
pre-token boundary well inside the prefix (the BPE model encodes each pre-token on its own, so every
token before the cut is the one full tokenisation gives), and when the cut text gives fewer than
seq_len tokens the whole text is tokenised instead (so a dropped text is one of more than seq_len tokens). Tokenizers with a normaliser, or without a
pre-tokeniser, are never cut.

Speed: the fast (Rust) tokenizer encodes each batch of texts on all cores (unless
TOKENIZERS_PARALLELISM=false); the bytes of the scored text, for bits per byte, come from a
table of each token's byte length for byte-level BPE (exact, also across chunk boundaries that
split a UTF-8 character), and from decoding otherwise.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKENIZE_BATCH = 1000
CHARS_PER_TOKEN = 32  # a bound for cutting before truncation; a token of more characters only costs a full tokenisation
PROGRESS_MIN_TEXTS = 5000  # below this a progress bar is noise
CACHE_VERSION = 2


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

    def head_per_source(self, n: int) -> "TokenizedSplit":
        """At most `n` examples, every source kept in proportion to its share (at least one each
        when n allows): the first examples of each source, in their original order. Validation
        rows are already in seeded random order, so this is a stratified sample of them."""
        if n >= len(self):
            return self
        names, counts = np.unique(self.sources, return_counts=True)
        quota = dict(zip(names.tolist(), _quotas(counts, n).tolist()))
        keep = np.concatenate([np.flatnonzero(self.sources == s)[: quota[s]] for s in quota.keys()])
        return self.subset(np.sort(keep))

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


def _quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """Split n slots over groups of the given sizes: one each first, the rest in proportion."""
    counts = np.asarray(counts, dtype=np.int64)
    if n >= counts.sum():
        return counts.copy()
    quota = np.zeros_like(counts)
    if n < len(counts):  # fewer slots than groups: one each for the largest groups
        quota[np.argsort(-counts, kind="stable")[:n]] = 1
        return quota
    quota[:] = 1
    room = counts - 1
    share = (n - len(counts)) * room / room.sum()
    quota += np.floor(share).astype(np.int64)
    left = n - int(quota.sum())
    quota[np.argsort(-(share - np.floor(share)), kind="stable")[:left]] += 1  # largest remainders
    return quota


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
    bar = None
    if progress and len(texts) >= PROGRESS_MIN_TEXTS:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="tokenising", unit="doc", unit_scale=True, dynamic_ncols=True)
    for start in range(0, len(texts), TOKENIZE_BATCH):
        # One call a batch: the fast tokenizer spreads a batch over all cores.
        chunk = texts[start : start + TOKENIZE_BATCH]
        cut = cut_long_texts(chunk, tokenizer, seq_len) if policy in ("truncate", "drop") else {}
        batch = tokenizer([cut.get(j, t) for j, t in enumerate(chunk)], add_special_tokens=False)["input_ids"]
        for j in [j for j in cut if len(batch[j]) < seq_len]:  # the cut gave too few tokens: use the whole text
            batch[j] = tokenizer(chunk[j], add_special_tokens=False)["input_ids"]
        for j, ids in enumerate(batch):
            parts, lost = apply_length_policy([*ids, eos], seq_len, policy)
            parts = [p for p in parts if len(p) >= 2]  # an example needs at least one target
            pieces += parts
            piece_sources += [sources[start + j]] * len(parts)
            truncated += [lost] * len(parts)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    lens = np.array([len(p) for p in pieces], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ids = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(lens.sum()))
    return TokenizedSplit(
        ids=ids,
        offsets=offsets,
        sources=np.array(piece_sources, dtype=np.int32),
        n_bytes=target_bytes(ids, offsets, tokenizer),
        truncated=np.array(truncated, dtype=bool),
    )


def cut_long_texts(texts: list[str], tokenizer, seq_len: int) -> dict[int, str]:
    """{index: prefix} for the texts long enough to cut before truncation to seq_len tokens (see the module doc)."""
    limit = seq_len * CHARS_PER_TOKEN
    long = [j for j, t in enumerate(texts) if len(t) > limit]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not long or backend is None or backend.normalizer is not None or backend.pre_tokenizer is None:
        return {}
    cut = {}
    for j in long:
        pieces = backend.pre_tokenizer.pre_tokenize_str(texts[j][:limit])
        # The last pre-tokens may end differently in the full text (a word or a run of spaces cut short):
        # cut before the last two, so every pre-token kept is one the full text has.
        if len(pieces) >= 3:
            cut[j] = texts[j][: pieces[-2][1][0]]
    return cut


def target_bytes(ids: np.ndarray, offsets: np.ndarray, tokenizer) -> np.ndarray:
    """UTF-8 bytes of each example's scored text (its tokens after the first; special tokens count 0)."""
    n = len(offsets) - 1
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    table = token_byte_lengths(tokenizer)
    if table is not None and int(ids.max()) < len(table):
        per_token = table[ids]
        firsts = offsets[:-1]
        return np.add.reduceat(per_token, firsts) - per_token[firsts]  # examples have >= 2 tokens
    pieces = [ids[a + 1 : b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        decoded = backend.decode_batch(pieces, skip_special_tokens=True)  # in parallel, no per-token Python
    else:
        decoded = tokenizer.batch_decode(pieces, skip_special_tokens=True)
    return np.array([len(d.encode("utf-8")) for d in decoded], dtype=np.int64)


def token_byte_lengths(tokenizer) -> np.ndarray | None:
    """Bytes each token id decodes to, for byte-level BPE (GPT-2 and kin); None for other tokenizers.

    With a byte-level decoder every vocabulary token stands for a fixed byte string (one byte per
    character of its printable form), so the bytes of any token sequence are the sum of its
    tokens' bytes. Special tokens are skipped when scored text is decoded, so they count 0.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import decoders, pre_tokenizers

    if not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab = backend.get_vocab(with_added_tokens=True)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    table = np.zeros(max(vocab.values(), default=-1) + 1, dtype=np.int64)
    for token, i in vocab.items():
        if i in added:
            table[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        elif not set(token) <= alphabet:
            return None  # not a byte-level vocabulary after all: decode instead
        else:
            table[i] = len(token)
    return table


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever tokenisation could: vocabulary, merges, normaliser, pre-tokeniser, added tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for state in ("truncation", "padding"):  # set per call by transformers; lorafit never uses them
            spec.pop(state, None)
        what = json.dumps(spec, sort_keys=True)
    else:
        what = json.dumps(sorted(tokenizer.get_vocab().items()))
    h = hashlib.sha256(json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id]).encode() + what.encode())
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
