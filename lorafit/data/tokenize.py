"""Tokenise once: append EOS, apply the length policy, count scored bytes, cache the result.

An example of n tokens (EOS included) is trained as n - 1 next-token predictions: inputs are
tokens[:-1], targets tokens[1:]. A text's every target is scored, and the EOS is always a target
unless truncation cut it off. A prompt-completion or chat example arrives rendered into segments
(lorafit/data/templates.py); each segment is encoded on its own and `scored` marks, token by
token, the targets that count (the completion and the EOS); the others become IGNORE in `pack`.

Length policies for examples longer than `seq_len` tokens:
- truncate: keep the first seq_len tokens (as the published recipes do; the EOS is lost);
- chunk: split into windows of seq_len tokens that overlap by one token, so every target token
  of the document is scored exactly once;
- drop: leave the example out.
An example with unscored tokens (a prompt) keeps its prompt/completion boundary, and nothing
happens to it silently (`policy_counts`, per source, goes into summary.json):
- truncate keeps the start; an example whose scored targets are all cut off is left out
  (`dropped_no_completion`), one that loses some counts as `completion_truncated`;
- chunk lays the windows from the end, so the completion comes with as much of the prompt right
  before it as fits (a long article's end, then its summary); windows with nothing scored (the
  rest of the prompt) are left out (`chunks_without_completion`). Every scored target is still
  scored exactly once.

Under truncate and drop a text longer than seq_len * CHARS_PER_TOKEN characters is cut before it is
tokenised (a 50 MB line would otherwise take gigabytes to keep 64 tokens, or none). The cut is exact: it falls at a
pre-token boundary well inside the prefix (the BPE model encodes each pre-token on its own, so every
token before the cut is the one full tokenisation gives), in a window doubled until it gives seq_len tokens, and
a text that never does is tokenised whole (so a dropped text is one of more than seq_len tokens). A single
pre-token too long to give fewer than seq_len tokens (a 200 MB line of one letter) is cut inside itself, the one
place where the kept tokens may differ from the whole text's (`_prefix`). Tokenizers with a normaliser, or without a
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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import decoders, models, pre_tokenizers

from lorafit.atomic import atomic_path
from lorafit.console import progress_bar
from lorafit.fingerprint import user_cache_dir

TOKENIZE_BATCH = 1000
# Characters a tokenizer call takes at most (a longer text goes alone): the fast tokenizer's Encodings (offsets,
# token strings, masks: ~100 bytes a token) and the Python lists of ids made from them live for one call, so
# they stay a few MB whatever the batch holds.
TOKENIZE_CHARS = 32_768
BYTES_CHUNK = 1 << 20  # tokens whose byte lengths are looked up at once (int64 each): bounded for a huge example
CHARS_PER_TOKEN = 32  # a bound for cutting before truncation; a token of more characters only costs a full tokenisation
PROGRESS_MIN_TEXTS = 5000  # below this a progress bar is noise
CACHE_VERSION = 4  # 3: the per-token `scored` mask and the length-policy counts; 4: preference pairs


@dataclass
class TokenizedSplit:
    """Examples as one flat token array plus offsets (cheap to cache and to slice)."""

    ids: np.ndarray  # int32, all examples back to back
    offsets: np.ndarray  # int64, len n + 1
    sources: np.ndarray  # int32, source index per example
    n_bytes: np.ndarray  # int64, UTF-8 bytes of each example's scored (target) text
    truncated: np.ndarray  # bool, the example lost tokens to truncation
    scored: np.ndarray | None = None  # bool per token of `ids`: the token is a scored target; None: every one
    policy_counts: dict | None = None  # {source index: {what the length policy did: count}}, see the module doc
    # preference objectives with a reference: each sequence's reference log-probability (float64), computed once
    # before training (lorafit/preference.py); never cached on disk, since it depends on the model
    ref_logps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @cached_property
    def _targets(self) -> np.ndarray:
        if self.scored is None or len(self) == 0:
            return self.lengths() - 1
        per_token = self.scored.astype(np.int64)
        per_token[self.offsets[:-1]] = 0  # an example's first token is never a target
        return np.add.reduceat(per_token, self.offsets[:-1])  # examples have >= 2 tokens

    def targets_per_example(self) -> np.ndarray:
        """Scored targets of each example: what token-weighted losses and bits divide by."""
        return self._targets

    @property
    def n_targets(self) -> int:
        return int(self.targets_per_example().sum())

    def example_scored(self, i: int) -> np.ndarray:
        """Which tokens of example i are scored targets (its first token never is)."""
        if self.scored is None:
            out = np.ones(self.offsets[i + 1] - self.offsets[i], dtype=bool)
        else:
            out = self.scored[self.offsets[i] : self.offsets[i + 1]].copy()
        out[:1] = False
        return out

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
            scored=None if self.scored is None else (
                np.concatenate([self.scored[self.offsets[i] : self.offsets[i + 1]] for i in indices]) if len(indices)
                else np.zeros(0, bool)),
            policy_counts=self.policy_counts,
            ref_logps=None if self.ref_logps is None else self.ref_logps[indices],
        )

    def save(self, path: Path) -> None:
        arrays = {k: getattr(self, k) for k in ARRAYS}
        if self.scored is not None:
            arrays["scored"] = self.scored
        np.savez(path, **arrays, policy_counts=np.array(json.dumps(self.policy_counts or {})))

    @classmethod
    def load(cls, path: Path) -> "TokenizedSplit":
        with np.load(path) as z:
            counts = {int(k): v for k, v in json.loads(str(z["policy_counts"])).items()}
            return cls(**{k: z[k] for k in ARRAYS}, scored=z["scored"] if "scored" in z.files else None,
                       policy_counts=counts)


ARRAYS = ("ids", "offsets", "sources", "n_bytes", "truncated")  # always in a cache file; `scored` when not None


# What each length policy can do to an example, for plain texts and for examples with unscored tokens (a prompt).
POLICY_COUNTS = {
    "truncate": (("truncated",), ("truncated", "completion_truncated", "dropped_no_completion")),
    "drop": (("dropped_too_long",), ("dropped_too_long", "dropped_no_completion")),
    "chunk": ((), ("chunks_without_completion", "dropped_no_completion")),
}


def policy_summary(counts: dict | None, source_names: list[str], policy: str, masked: list[bool]) -> dict:
    """What the length policy did, per source name: every count that can apply to the source (`masked`: it has
    unscored tokens, a prompt_completion or chat source) under `policy`, 0 when nothing happened."""
    counts = counts or {}
    out = {}
    for s, name in enumerate(source_names):
        applies = POLICY_COUNTS.get(policy, ((), ()))[bool(masked[s])]
        got = counts.get(s) or {}
        out[name] = {key: int(got.get(key, 0)) for key in applies} | {k: int(v) for k, v in got.items() if v}
    return out


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


def apply_length_policy_scored(ids: list[int], scored: list[bool], seq_len: int, policy: str,
                               counts: dict[str, int]) -> tuple[list[tuple[list[int], list[bool]]], bool]:
    """`apply_length_policy` for an example with a scored mask: (pieces with their masks, tokens lost);
    what it did beyond plain truncation is added to `counts` (see the module doc)."""
    def count(what: str, k: int = 1) -> None:
        counts[what] = counts.get(what, 0) + k

    n = len(ids)
    if all(scored[1:]):  # nothing unscored: the plain policy, windows from the start
        pieces, lost = apply_length_policy(ids, seq_len, policy)
        if lost and policy == "drop":
            count("dropped_too_long")
        return [(p, [True] * len(p)) for p in pieces], lost
    if not any(scored[1:]):
        count("dropped_no_completion")
        return [], True
    if n <= seq_len:
        return [(ids, scored)], False
    if policy == "drop":
        count("dropped_too_long")
        return [], True
    if policy == "truncate":
        if not any(scored[1:seq_len]):
            count("dropped_no_completion")
            return [], True
        if any(scored[seq_len:]):
            count("completion_truncated")
        return [(ids[:seq_len], scored[:seq_len])], True
    # chunk: windows laid from the end, so the last holds the completion and the end of the prompt
    windows, end = [], n
    while True:
        start = max(0, end - seq_len)
        windows.append((ids[start:end], scored[start:end]))
        if start == 0:
            break
        end = start + 1  # consecutive windows share one token
    kept = [w for w in reversed(windows) if len(w[0]) >= 2 and any(w[1][1:])]
    if len(kept) < len(windows):
        count("chunks_without_completion", len(windows) - len(kept))
    return kept, False


def tokenize_texts(
    texts: list,
    sources: list[int],
    tokenizer,
    seq_len: int,
    policy: str,
    progress: bool = False,
    pairs: bool = False,
) -> TokenizedSplit:
    """Tokenise texts (str: every token scored) and rendered examples (`templates.Rendered`: segments,
    each encoded on its own); `scored` stays None when every example is a text. `pairs`: the items are
    preference pairs' sequences two by two (chosen, rejected); a pair either of whose sequences the length
    policy drops (or splits) is left out whole (`pairs_dropped`), so sequence 2i + 1 is always 2i's pair.

    One tokenizer call a batch; each batch becomes flat arrays at once (plain texts: EOS and the length
    policy applied with array operations), so no per-example Python list outlives its batch."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; lorafit appends one to every example")
    if pairs and (len(texts) % 2 or policy == "chunk"):
        raise ValueError("pairs: an even number of sequences, and a policy that keeps each whole (truncate or drop)")
    masked = any(not isinstance(t, str) for t in texts)
    count_bytes = byte_counter(tokenizer)
    batches = _Batches(masked)
    counts: dict[int, dict[str, int]] = {}
    bar = progress_bar(len(texts), "tokenising", "doc", progress and len(texts) >= PROGRESS_MIN_TEXTS, unit_scale=True)
    total_chars, done_chars = max(sum(map(_chars, texts)), 1), 0  # for the growth projection
    for start in range(0, len(texts), TOKENIZE_BATCH):
        items = texts[start : start + TOKENIZE_BATCH]
        done_chars += sum(map(_chars, items))
        batches.done = done_chars / total_chars
        batch_sources = np.asarray(sources[start : start + TOKENIZE_BATCH], dtype=np.int32)
        for source in dict.fromkeys(batch_sources.tolist()):  # every source gets its (maybe empty) counts
            counts.setdefault(source, {})
        if masked:
            batch = _rendered_batch(items, batch_sources, tokenizer, seq_len, policy, eos, counts, pairs)
        else:
            batch = _text_batch(items, batch_sources, tokenizer, seq_len, policy, eos, counts)
        batches.add(*batch, count_bytes)
        if bar is not None:
            bar.update(len(items))
    if bar is not None:
        bar.close()
    return batches.split(counts)


def _chars(item) -> int:
    return len(item) if isinstance(item, str) else sum(len(text) for text, _ in item.segments)


class _Batches:
    """Tokenised batches appended to growing arrays. A buffer grows by a quarter (ndarray.resize: realloc, which
    moves a large buffer's pages without copying them) and is cut to size at the end, so the token ids are
    held about once, never once as batches and again as their concatenation. The offsets are accumulated as
    such (no per-piece lengths joined and summed at the end)."""

    GROWTH = 1.25

    def __init__(self, masked: bool):
        self.masked = masked
        self.buffers = {k: np.zeros(0, dtype) for k, dtype in
                        (("ids", np.int32), ("offsets", np.int64), ("sources", np.int32), ("n_bytes", np.int64),
                         ("truncated", bool), ("scored", bool))}
        self.used = dict.fromkeys(self.buffers, 0)
        self.done = 0.0  # share of the texts' characters tokenised so far (set by the caller before each add)
        self.resizes = 0  # how many times a buffer grew (tests check that growth is geometric)
        self._append("offsets", np.zeros(1, np.int64))

    def _append(self, key: str, values: np.ndarray) -> None:
        buf, at = self.buffers[key], self.used[key]
        need = at + len(values)
        if need > len(buf):
            # ndarray.resize zero-fills (touches) the whole capacity, so a quarter's growth would be held unused;
            # once part of the texts is done, the buffer grows to the size the rest projects instead (2% spare)
            projected = int(need / self.done * 1.02) + 1024 if 0 < self.done < 1 else 0
            grown = projected if projected >= need else int(len(buf) * self.GROWTH) + 1024
            buf.resize(max(need, grown), refcheck=False)
            self.resizes += 1
        buf[at : at + len(values)] = values
        self.used[key] = at + len(values)

    def add(self, ids, lengths, sources, truncated, scored, count_bytes) -> None:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        self._append("n_bytes", count_bytes(ids, offsets, scored))
        offsets += self.used["ids"]
        for key, value in (("ids", ids), ("offsets", offsets[1:]), ("sources", sources), ("truncated", truncated)):
            self._append(key, value)
        if self.masked:
            self._append("scored", scored)

    def _final(self, key: str) -> np.ndarray:
        buf = self.buffers.pop(key)
        buf.resize(self.used[key], refcheck=False)
        return buf

    def split(self, counts: dict) -> TokenizedSplit:
        return TokenizedSplit(
            ids=self._final("ids"),
            offsets=self._final("offsets"),
            sources=self._final("sources"),
            n_bytes=self._final("n_bytes"),
            truncated=self._final("truncated"),
            scored=self._final("scored") if self.masked else None,
            policy_counts=counts,
        )


def _calls(texts: list[str]) -> list[tuple[int, int]]:
    """[start, end) ranges of texts, each range TOKENIZE_CHARS characters at most or a single text."""
    out, start, chars = [], 0, 0
    for k, text in enumerate(texts):
        if k > start and chars + len(text) > TOKENIZE_CHARS:
            out.append((start, k))
            start, chars = k, 0
        chars += len(text)
    if start < len(texts):
        out.append((start, len(texts)))
    return out


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens: batched calls of the (fast) tokenizer (see TOKENIZE_CHARS)."""
    out = []
    for a, b in _calls(texts):
        out += tokenizer(texts[a:b], add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return out


def _encode_flat(tokenizer, texts: list[str], eos: int, redo=None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, n): each text's token ids followed by `eos`, back to back (int32), and each text's count with its EOS.
    One call's ids are flat before the next call is made, so no list of Python ints outlives its call.
    `redo(k, ids)`: replacement ids for text k (or None to keep them)."""
    parts, n = [], np.zeros(len(texts), dtype=np.int64)
    for a, b in _calls(texts):
        encoded = _encode(tokenizer, texts[a:b])  # one call: the range is within the cap
        if redo is not None:
            for k in range(a, b):
                again = redo(k, encoded[k - a])
                if again is not None:
                    encoded[k - a] = again
        counts = np.fromiter(map(len, encoded), dtype=np.int64, count=b - a) + 1
        n[a:b] = counts
        ends = np.cumsum(counts)
        part = np.full(int(ends[-1]), eos, dtype=np.int32)
        body = np.ones(len(part), dtype=bool)
        body[ends - 1] = False
        part[body] = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=len(part) - (b - a))
        del encoded, body
        parts.append(part)
    if len(parts) == 1:
        return parts[0], n
    return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), n


def _count(counts: dict, sources: np.ndarray, what: str) -> None:
    """Add one to counts[source][what] for each entry of `sources`."""
    for source, k in zip(*np.unique(sources, return_counts=True)):
        c = counts[int(source)]
        c[what] = c.get(what, 0) + int(k)


def _text_batch(items: list[str], sources: np.ndarray, tokenizer, seq_len: int, policy: str, eos: int, counts: dict):
    """A batch of plain texts as (ids, piece lengths, piece sources, piece truncated, None): each text with its
    EOS, cut to pieces by the length policy (as `apply_length_policy`, with array operations)."""
    # Under truncate/drop a very long text is cut first (exact: see cut_long_texts); a cut that gave too few tokens
    # is encoded again from a longer prefix.
    cut = cut_long_texts(items, tokenizer, seq_len) if policy in ("truncate", "drop") else {}

    def redo(k: int, got: list[int]) -> list[int] | None:
        if k in cut and len(got) < seq_len:
            return _encode(tokenizer, [longer_prefix(items[k], tokenizer, seq_len)])[0]
        return None

    ids, n = _encode_flat(tokenizer, [cut.get(k, t) for k, t in enumerate(items)], eos, redo if cut else None)
    ends = np.cumsum(n)
    starts = ends - n
    example = np.arange(len(n))
    too_long = n > seq_len
    if policy == "truncate":
        piece_example, offset = example, np.zeros(len(n), dtype=np.int64)
    elif policy == "drop":
        _count(counts, sources[too_long], "dropped_too_long")
        piece_example, offset = example[~too_long], np.zeros(int((~too_long).sum()), dtype=np.int64)
    else:  # chunk: windows every seq_len - 1 tokens (consecutive windows share one token)
        stride = seq_len - 1
        windows = np.where(too_long, -(-(n - 1) // max(stride, 1)), 1)
        piece_example = np.repeat(example, windows)
        offset = (np.arange(int(windows.sum())) - np.repeat(np.cumsum(windows) - windows, windows)) * stride
    piece_len = np.minimum(seq_len, n[piece_example] - offset)
    keep = piece_len >= 2  # a piece needs at least one target
    piece_example, offset, piece_len = piece_example[keep], offset[keep], piece_len[keep]
    lost = too_long & (policy != "chunk")
    kept_lost = np.zeros(len(n), dtype=bool)
    kept_lost[piece_example[lost[piece_example]]] = True  # lost tokens, yet a piece remains
    _count(counts, sources[kept_lost], "truncated")
    if len(piece_example) == len(n) and np.array_equal(piece_len, n):  # every example whole: nothing to gather
        return ids, piece_len, sources, lost, None
    first = np.cumsum(piece_len) - piece_len
    gather = np.arange(int(piece_len.sum())) + np.repeat(starts[piece_example] + offset - first, piece_len)
    return ids[gather], piece_len, sources[piece_example], lost[piece_example], None


def _rendered_batch(items: list, sources: np.ndarray, tokenizer, seq_len: int, policy: str, eos: int, counts: dict,
                    pairs: bool = False):
    """A batch of rendered examples (and texts among them) as (ids, piece lengths, piece sources, piece
    truncated, scored): each segment encoded on its own, the policy by `apply_length_policy_scored`.
    `pairs`: items two by two are a pair's sequences, kept both or neither (TOKENIZE_BATCH is even)."""
    segments = [((t, True),) if isinstance(t, str) else t.segments for t in items]
    encoded = iter(_encode(tokenizer, [text for segs in segments for text, _ in segs]))
    pieces, masks, piece_sources, truncated = [], [], [], []
    held = None
    for j, (item, segs, source) in enumerate(zip(items, segments, sources.tolist())):
        ids, scored = [], []
        for _, flag in segs:
            seg = next(encoded)
            ids += seg
            scored += [flag] * len(seg)
        if isinstance(item, str) or item.eos:
            ids.append(eos)
            scored.append(True)
        c = counts[source]
        parts, lost = apply_length_policy_scored(ids, scored, seq_len, policy, c)
        parts = [(p, m) for p, m in parts if len(p) >= 2]  # an example needs at least one target
        if pairs and j % 2 == 0:  # a chosen sequence waits for its rejected one: a pair is kept whole or not at all
            held = (parts, lost)
            continue
        if pairs:
            (first, first_lost), both = held, held[0] + parts
            if len(first) != 1 or len(parts) != 1:
                c["pairs_dropped"] = c.get("pairs_dropped", 0) + 1
                continue
            parts, flags, lost = both, [first_lost, lost], first_lost or lost
        else:
            flags = [lost] * len(parts)
        if lost and parts:
            c["truncated"] = c.get("truncated", 0) + 1
        pieces += [p for p, _ in parts]
        masks += [m for _, m in parts]
        piece_sources += [source] * len(parts)
        truncated += flags
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    total = int(lengths.sum())
    return (np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=total), lengths,
            np.array(piece_sources, dtype=np.int32), np.array(truncated, dtype=bool),
            np.fromiter(itertools.chain.from_iterable(masks), dtype=bool, count=total))


def cut_long_texts(texts: list[str], tokenizer, seq_len: int) -> dict[int, str]:
    """{index: prefix} for the texts long enough to cut before truncation to seq_len tokens (see the module doc).
    A prefix that gives fewer than seq_len tokens is replaced by `longer_prefix` (rare: few characters a token)."""
    limit = seq_len * CHARS_PER_TOKEN
    long = [j for j, t in enumerate(texts) if len(t) > limit]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not long or backend is None or backend.normalizer is not None or backend.pre_tokenizer is None:
        return {}
    word_cap = _word_cap(backend, seq_len)
    cuts = {j: _cut(texts[j], backend.pre_tokenizer, limit, word_cap) for j in long}
    return {j: prefix for j, prefix in cuts.items() if prefix is not None}


def _cut(text: str, pre_tokenizer, end: int, word_cap: int | None) -> str | None:
    """A prefix of text[:end] whose tokens are the whole text's first ones, or None (too few pre-tokens). Two kinds:
    - at a pre-token boundary: the last pre-tokens of the window may end differently in the full text (a word or a
      run of spaces cut short), so the cut falls before the last two; every pre-token kept is then one the full
      text has, and the BPE model encodes each pre-token on its own: the tokens are exactly those of the whole text;
    - inside a single pre-token longer than `word_cap` characters (a 200 MB "word" of one letter): it alone gives
      more than seq_len tokens, so the text is truncated or dropped whatever happens; it is cut to its first
      `word_cap` characters, as tokenising it whole would take gigabytes. Only there may the kept tokens differ from
      the whole text's (BPE merges of a prefix of one pre-token can end differently); normal text never meets it."""
    pieces = pre_tokenizer.pre_tokenize_str(text[:end])
    if word_cap is not None:
        for _, (a, b) in pieces:
            if b - a > word_cap:
                return text[: a + word_cap]
    return text[: pieces[-2][1][0]] if len(pieces) >= 3 else None


def longer_prefix(text: str, tokenizer, seq_len: int) -> str:
    """A prefix of `text` giving at least seq_len tokens (exact, as `_cut`), from windows doubled from twice the
    first; the whole text when none does. The windows stay bounded: one without enough tokens has few characters a
    token, so few pre-tokens, and a pre-token longer than the word cap ends the search."""
    backend = tokenizer.backend_tokenizer
    word_cap = _word_cap(backend, seq_len)
    end = 2 * seq_len * CHARS_PER_TOKEN
    while end < len(text):
        prefix = _cut(text, backend.pre_tokenizer, end, word_cap)
        if prefix is not None and len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) >= seq_len:
            return prefix
        end *= 2
    return text


def _word_cap(backend, seq_len: int) -> int | None:
    """Characters beyond which one pre-token surely gives more than seq_len tokens: seq_len times the longest
    vocabulary entry (a BPE token covers at most as many characters as it has: one a byte for byte-level BPE).
    None for other models (a WordPiece or fused unknown token may cover a whole word of any length)."""
    model = backend.model
    if not isinstance(model, models.BPE) or (model.fuse_unk and model.unk_token is not None):
        return None
    longest = max((len(token) for token in backend.get_vocab(with_added_tokens=False)), default=1)
    return seq_len * max(longest, 1)


def target_bytes(ids: np.ndarray, offsets: np.ndarray, tokenizer, scored: np.ndarray | None = None) -> np.ndarray:
    """UTF-8 bytes of each example's scored text (its scored tokens after the first; special tokens count 0)."""
    return byte_counter(tokenizer)(ids, offsets, scored)


def byte_counter(tokenizer):
    """`target_bytes` for this tokenizer as a function of (ids, offsets, scored), its byte table built once
    (tokenisation counts batch by batch)."""
    table = token_byte_lengths(tokenizer)

    def count(ids: np.ndarray, offsets: np.ndarray, scored: np.ndarray | None = None) -> np.ndarray:
        n = len(offsets) - 1
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if table is not None and int(ids.max()) < len(table):
            return _table_bytes(table, ids, offsets, scored)
        if scored is None:
            pieces = [ids[a + 1 : b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
        else:
            pieces = [ids[a + 1 : b][scored[a + 1 : b]].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            decoded = backend.decode_batch(pieces, skip_special_tokens=True)  # in parallel, no per-token Python
        else:
            decoded = tokenizer.batch_decode(pieces, skip_special_tokens=True)
        return np.array([len(d.encode("utf-8")) for d in decoded], dtype=np.int64)

    return count


def _table_bytes(table: np.ndarray, ids: np.ndarray, offsets: np.ndarray, scored: np.ndarray | None) -> np.ndarray:
    """Each example's bytes after its first token, from the byte table: running sums over BYTES_CHUNK tokens at a
    time, read at the offsets (a per-token int64 array for a whole huge example would be twice its ids)."""
    prefix = np.zeros(len(offsets), dtype=np.int64)  # bytes of the tokens before each offset
    carry = 0
    for a in range(0, len(ids), BYTES_CHUNK):
        per_token = table[ids[a : a + BYTES_CHUNK]]
        if scored is not None:
            per_token *= scored[a : a + BYTES_CHUNK]
        running = np.cumsum(per_token)
        b = a + len(per_token)
        lo, hi = np.searchsorted(offsets, [a, b], side="right")  # the offsets in (a, b]
        prefix[lo:hi] = carry + running[offsets[lo:hi] - a - 1]
        carry += int(running[-1])
    firsts = offsets[:-1]
    first = table[ids[firsts]] if scored is None else table[ids[firsts]] * scored[firsts]
    return np.diff(prefix) - first  # examples have >= 2 tokens


def token_byte_lengths(tokenizer) -> np.ndarray | None:
    """Bytes each token id decodes to, for byte-level BPE (GPT-2 and kin); None for other tokenizers.

    With a byte-level decoder every vocabulary token stands for a fixed byte string (one byte per
    character of its printable form), so the bytes of any token sequence are the sum of its
    tokens' bytes. Special tokens are skipped when scored text is decoded, so they count 0.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
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


def cache_key(texts: list, sources: list[int], tokenizer_fp: str, seq_len: int, policy: str, pairs: bool = False) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{tokenizer_fp}|{seq_len}|{policy}|{len(texts)}|{int(pairs)}".encode())
    for text, src in zip(texts, sources):
        if isinstance(text, str):
            h.update(f"{src}|{len(text)}|".encode())
            h.update(text.encode("utf-8", "surrogatepass"))
            continue
        h.update(f"{src}|rendered|{len(text.segments)}|{int(text.eos)}|".encode())
        for piece, scored in text.segments:
            h.update(f"{int(scored)}|{len(piece)}|".encode())
            h.update(piece.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:24]


def default_cache_dir() -> Path:
    return user_cache_dir()


def tokenize_cached(
    texts: list,
    sources: list[int],
    tokenizer,
    seq_len: int,
    policy: str,
    cache_dir: Path | None,
    progress: bool = False,
    pairs: bool = False,
) -> tuple[TokenizedSplit, bool]:
    """Tokenise, reusing a cached result for identical texts/tokenizer/policy. Returns (split, hit)."""
    if cache_dir is None:
        return tokenize_texts(texts, sources, tokenizer, seq_len, policy, progress, pairs), False
    key = cache_key(texts, sources, tokenizer_fingerprint(tokenizer), seq_len, policy, pairs)
    path = Path(cache_dir) / "tokens" / f"{key}.npz"
    if path.is_file():
        try:
            return TokenizedSplit.load(path), True
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is rebuilt below
    split = tokenize_texts(texts, sources, tokenizer, seq_len, policy, progress, pairs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # a reader never sees half a file
            split.save(tmp)
    except OSError:
        pass  # caching is an optimisation; an unwritable cache dir must not stop the run
    return split, False
