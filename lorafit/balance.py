"""Longest first into the lightest bin: how examples are spread over packed rows (data/packing.py) and over the
ranks of a data-parallel step (distributed.py). One greedy rule, so both balance the same way."""

from __future__ import annotations

import heapq

import numpy as np


def longest_first(lengths: np.ndarray, n_bins: int, capacity: int | None = None) -> list[list[int]]:
    """Items (by index into `lengths`) in `n_bins` bins: longest first (ties in index order), each into the
    lightest bin (ties to the lowest bin). With `capacity`, an item that fits no bin opens a new one. Each
    bin lists its items in the order they went in; a bin may stay empty."""
    heap = [(0, b) for b in range(n_bins)]  # (load, bin): the lightest first
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    for i in np.argsort(-lengths, kind="stable"):
        load, b = heapq.heappop(heap)
        if capacity is not None and load + lengths[i] > capacity:  # even the lightest bin is full: a new one
            heapq.heappush(heap, (load, b))
            b, load = len(bins), 0
            bins.append([])
        bins[b].append(int(i))
        heapq.heappush(heap, (load + int(lengths[i]), b))
    return bins
