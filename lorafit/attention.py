"""Packed attention example by example: no padding slots and no masked-out attention work.

With row packing (`data.packing=rows`), transformers' SDPA path keeps examples apart with a
block-diagonal (L x L) mask: every row of a batch is padded to the widest one, and attention still
computes the blocks it masks out. With `data.packing=segments` a micro-batch is one row holding
exactly its tokens, and attention runs causal SDPA on each example's own slice; the linear layers,
which are most of the FLOPs, then see no padding at all. The loop costs microseconds an example
and layer: nothing next to a CPU step, but on a GPU those kernel launches add up, which is why
`auto` picks segments on CPU only.

The attention is registered with transformers under SEGMENTS by `register()`, which building a
`lorafit.forward.Forward` calls (not at import), and switched on only around a packed forward
(`lorafit.fast.forward_state`), so the model's own setting (sdpa) serves everything else:
generation, padded batches, a saved or merged model. Whether it stands in for a model's own
attention exactly is checked on the model itself (lorafit.fastpath); what it cannot do (soft-capping,
a window shorter than an example) it refuses, which that check reports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface


SEGMENTS = "lorafit_segments"


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: each key/value head serves `groups` query heads."""
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def segment_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 segment_bounds: tuple[int, ...] | None = None, **kwargs):
    """transformers attention function: causal SDPA on each [bounds[i], bounds[i+1]) slice of one row.
    query/key/value are (1, heads, L, head_dim); returns (1, L, heads, head_dim) like the sdpa path."""
    if segment_bounds is None or query.shape[0] != 1:
        raise RuntimeError("segment attention needs a single packed row and its segment_bounds")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("segment attention has no logit soft-capping; use data.packing=rows")
    window = kwargs.get("sliding_window")
    longest = max(e - s for s, e in zip(segment_bounds[:-1], segment_bounds[1:]))
    if window is not None and longest > window:
        raise NotImplementedError(
            f"an example of {longest} tokens is longer than the model's sliding window ({window}); "
            "segment attention does not window: use data.packing=rows"
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    parts = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                       scale=scaling, is_causal=True)
        for s, e in zip(segment_bounds[:-1], segment_bounds[1:])
    ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # the segments are the mask


_registered = False


def register() -> None:
    """Make SEGMENTS known to transformers, once a process: lorafit.forward.Forward calls it when it is built
    (importing this module changes nothing). Once: a later call leaves whatever is registered as it is."""
    global _registered
    if not _registered:
        AttentionInterface.register(SEGMENTS, segment_sdpa)
        AttentionMaskInterface.register(SEGMENTS, _no_mask)
        _registered = True
