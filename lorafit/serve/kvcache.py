"""The KV-cache surgery continuous batching needs, in one place: rows join a running batch (their
caches left-padded to a common length and concatenated), leave it, and padding columns every row
has are cut. transformers' own `generate` (and PEFT's mixed-adapter `generate(adapter_names=...)`)
runs one fixed batch with one sampling setting from start to end; its continuous-batching manager
takes no per-row adapter. So the batcher keeps its own decode loop, and these few functions are the
only code that touches the cache's insides (`cache.layers[i].keys` / `.values` of a DynamicCache).
Those are transformers internals: tests/test_serve.py::test_kv_cache_surgery_gives_each_row_its_own_tokens
pins them to the installed version's behaviour.
"""

from __future__ import annotations

import torch


def can_join(cache) -> bool:
    """Plain (non-sliding, non-static) layers can be left-padded and concatenated; others cannot, and
    rows then wait for the running batch to end."""
    return all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)


def join(cache, mask: torch.Tensor, new_cache, new_mask: torch.Tensor) -> torch.Tensor:
    """Append `new_cache`'s rows to `cache` (in place); both left-padded to one length. Returns the joined mask."""
    width = max(mask.shape[1], new_mask.shape[1])
    for old, new in zip(cache.layers, new_cache.layers):
        old.keys = torch.cat([left_pad(old.keys, width, dim=2), left_pad(new.keys, width, dim=2)])
        old.values = torch.cat([left_pad(old.values, width, dim=2), left_pad(new.values, width, dim=2)])
    return torch.cat([left_pad(mask, width), left_pad(new_mask, width)])


def keep_rows(cache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only the rows `keep` (in place; transformers' own batch_select_indices), then cut the
    leading columns that are padding in every remaining row. Returns the new mask."""
    index = torch.tensor(keep, device=mask.device)
    cache.batch_select_indices(index)
    mask = mask[index]
    lead = int((mask.cumsum(1) == 0).all(0).sum())  # padding in every row: attention cost for nothing
    if lead and can_join(cache):
        mask = mask[:, lead:]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
    return mask


def left_pad(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim)
