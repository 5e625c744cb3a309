"""Batch layouts: how a set of examples becomes model inputs, with padding never scored.

A target is scored when the split marks it so (`TokenizedSplit.scored`: a prompt's tokens are
context, not targets); the others are IGNORE, in every layout alike.

- rows: each row holds whole examples back to back. Position ids restart at 0 for every example;
  transformers (>= 5) reads the restarts and builds a block-diagonal causal mask, so a packed
  example sees exactly what it would see alone (DESIGN invariant 4) -- on models whose mask
  honours the restarts, which `lorafit.fastpath` checks on the model itself. Rows are balanced
  (longest example first into the emptiest row), so the few padding slots left sit at row ends;
  they get target -100, never scored, and positions of their own so they form a separate block.
- segments: one row of all the examples, with their boundaries; attention runs on each slice
  alone (lorafit.attention).
- padded: the fallback for models on which neither packed layout is exact: one example a row,
  right-padded to the longest and masked, the model's own plain forward with padding after the
  last real token (which a causal model never attends to).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lorafit.balance import longest_first
from lorafit.data.tokenize import TokenizedSplit

IGNORE = -100
LAYOUTS = ("segments", "rows", "padded")


@dataclass(frozen=True)
class Layout:
    kind: str  # one of LAYOUTS
    row_len: int | None = None  # rows: the packed row length

    def __post_init__(self):
        if self.kind not in LAYOUTS or (self.kind == "rows") != (self.row_len is not None):
            raise ValueError(f"bad layout {self}")

    def __str__(self) -> str:
        return f"rows of {self.row_len}" if self.kind == "rows" else self.kind


def shape_multiple(device) -> int:
    """Row widths are rounded to this: a GPU then sees few distinct shapes (kernel plans are cached
    per shape); on CPU any padding slot is pure cost."""
    return 8 if getattr(device, "type", str(device)) == "cuda" else 1


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, L) int64
    position_ids: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64, IGNORE where nothing is scored
    example_ids: torch.Tensor  # (B, L) int64, index into the split, -1 on padding
    n_targets: int
    n_examples: int
    # Segment layout (one row): where each example, and the end padding, start and end in the row;
    # attention then runs on each slice alone (lorafit.attention). None: rows with a block mask.
    segments: tuple[int, ...] | None = None
    # Padded layout: 1 on real tokens, 0 on padding; the model then builds its own positions and mask.
    attention_mask: torch.Tensor | None = None

    @property
    def n_slots(self) -> int:
        return self.input_ids.numel()

    def to(self, device) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(
            move(self.input_ids), move(self.position_ids), move(self.targets), move(self.example_ids),
            self.n_targets, self.n_examples, self.segments,
            None if self.attention_mask is None else move(self.attention_mask),
        )


def balance_rows(lengths: np.ndarray, row_len: int) -> list[list[int]]:
    """Assign items (by index) to as few rows of capacity row_len as the total needs, balanced."""
    if len(lengths) == 0:
        return []
    if lengths.max() > row_len:
        raise ValueError(f"an example of {lengths.max()} positions does not fit a row of {row_len}")
    n_rows = max(1, math.ceil(int(lengths.sum()) / row_len))
    return [row for row in longest_first(lengths, n_rows, capacity=row_len) if row]


def pack(split: TokenizedSplit, indices: np.ndarray, layout: Layout, pad_id: int, multiple: int = 1) -> PackedBatch:
    """One batch of rows holding the given examples; L is the longest row (rounded up to `multiple`,
    which keeps the number of distinct shapes a GPU sees small), not the row length.

    The segment layout is one row of all the examples back to back, with their boundaries in
    `segments` (padding to `multiple`, if any, is a last segment of its own). The padded layout is
    one example a row, with an attention mask."""
    positions_per_example = split.lengths()[indices] - 1  # inputs are tokens[:-1]
    if layout.kind == "segments":
        rows = [list(range(len(indices)))]
        width = int(positions_per_example.sum())
        width = -(-width // multiple) * multiple
    elif layout.kind == "padded":
        rows = [[j] for j in range(len(indices))]
        width = -(-int(positions_per_example.max()) // multiple) * multiple
    else:
        row_len = layout.row_len
        rows = balance_rows(positions_per_example, row_len)
        width = max(int(sum(positions_per_example[j] for j in row)) for row in rows)
        width = min(-(-width // multiple) * multiple, max(row_len, width))
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    targets = np.full(shape, IGNORE, dtype=np.int64)
    example_ids = np.full(shape, -1, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    for r, row in enumerate(rows):
        col = 0
        for j in row:
            tokens = split.example(int(indices[j]))
            n = len(tokens) - 1
            input_ids[r, col : col + n] = tokens[:-1]
            targets[r, col : col + n] = tokens[1:] if split.scored is None else np.where(
                split.example_scored(int(indices[j]))[1:], tokens[1:], IGNORE)
            position_ids[r, col : col + n] = np.arange(n)
            example_ids[r, col : col + n] = indices[j]
            col += n
        position_ids[r, col:] = np.arange(width - col)  # padding: a block of its own
    segments = attention_mask = None
    if layout.kind == "segments":
        bounds = [0, *np.cumsum(positions_per_example).tolist(), width]
        segments = tuple(b for i, b in enumerate(bounds) if i == 0 or b > bounds[i - 1])  # no empty slices
    elif layout.kind == "padded":
        attention_mask = torch.from_numpy((example_ids >= 0).astype(np.int64))
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        targets=torch.from_numpy(targets),
        example_ids=torch.from_numpy(example_ids),
        n_targets=int((targets != IGNORE).sum()),
        n_examples=len(indices),
        segments=segments,
        attention_mask=attention_mask,
    )


def micro_batches(
    split: TokenizedSplit, indices: np.ndarray, layout: Layout, max_tokens: int, pad_id: int, multiple: int = 1,
    pairs: bool = False,
) -> list[PackedBatch]:
    """Split a set of examples into micro-batches of at most ~max_tokens slots each (see `pack`).

    Examples are grouped by length (longest first) so each micro-batch packs tightly; the
    grouping never changes the step's loss, which is normalised by the step's total targets.
    A padded micro-batch costs (examples x its longest) slots, padding included.
    `pairs`: `indices` are preference pairs, whose sequences 2i and 2i + 1 always go into the same
    micro-batch (a pair's loss needs both log-probabilities in one graph).
    """
    if len(indices) == 0:
        return []
    indices = np.asarray(indices)
    members = np.stack([2 * indices, 2 * indices + 1], 1) if pairs else indices[:, None]
    lengths = split.lengths()[members] - 1
    positions, widest = lengths.sum(1), lengths.max(1)
    budget = max(max_tokens, layout.row_len or 0)
    order = np.argsort(-(widest if layout.kind == "padded" else positions), kind="stable")
    groups, current, used = [], [], 0
    for i in order:
        n = int(positions[i])
        # Padded: longest first, so the group's first unit sets the width of every row.
        cost = (len(current) + 1) * members.shape[1] * width if layout.kind == "padded" and current else used + n
        if current and cost > budget:
            groups.append(current)
            current, used = [], 0
        if not current:
            width = int(widest[i])
        current.append(i)
        used += n
    groups.append(current)
    return [pack(split, members[g].reshape(-1), layout, pad_id, multiple) for g in groups]


def default_micro_tokens(device) -> int:
    """Tokens a training forward pass. Training keeps ~3 MB of activations a token for full-size GPT-2
    (LoRA on c_attn + c_proj): 2,048 tokens is ~6.5 GB on a laptop CPU; a GPU takes 16k (the head never
    holds full logits). Evaluation keeps no activations and takes four times as many."""
    return 16384 if getattr(device, "type", str(device)) == "cuda" else 2048
