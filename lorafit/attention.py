"""Packed attention example by example: no padding slots and no masked-out attention work.

With row packing (`data.packing=rows`), transformers' SDPA path keeps examples apart with a
block-diagonal (L x L) mask: every row of a batch is padded to the widest one, and attention still
computes the blocks it masks out. With `data.packing=segments` a micro-batch is one row holding
exactly its tokens, and attention runs causal SDPA on each example's own slice; the linear layers,
which are most of the FLOPs, then see no padding at all. The loop costs microseconds an example
and layer: nothing next to a CPU step, but on a GPU those kernel launches add up, which is why
`auto` picks segments on CPU only.

The attention is registered with transformers under SEGMENTS and switched on only around a
packed forward (`segment_attention`), so the model's own setting (sdpa) serves everything else:
generation, padded batches, a saved or merged model.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from lorafit.errors import LorafitError, first_line
from lorafit.lora import unwrapped

SEGMENTS = "lorafit_segments"
SUPPORTED_BASE_ATTENTION = ("sdpa", "eager")  # what segment attention stands in for


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


AttentionInterface.register(SEGMENTS, segment_sdpa)
AttentionMaskInterface.register(SEGMENTS, _no_mask)


@contextlib.contextmanager
def segment_attention(config):
    """Run the model's attention as segment attention for the duration of one forward."""
    saved = config._attn_implementation
    config._attn_implementation = SEGMENTS
    try:
        yield
    finally:
        config._attn_implementation = saved


def segments_unsupported(config) -> str | None:
    """Why segment attention cannot stand in for this model's attention, or None when it can."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_BASE_ATTENTION:
        return f"model.attn_implementation is '{impl}'; segment attention replaces only {' or '.join(SUPPORTED_BASE_ATTENTION)}"
    for key in ("attn_logit_softcapping", "final_attn_softcapping"):
        if getattr(config, key, None):
            return f"the model soft-caps attention logits ({key})"
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        return "the model has cross-attention"
    return None


def segments_probe(model) -> str | None:
    """Check on the model itself that a packed row under segment attention gives each example the
    log-probabilities it gets alone (two short examples, no dropout): a model whose code does not
    route attention through transformers' interface would otherwise attend across examples
    silently. Returns what went wrong, or None.

    The gap is judged against rounding and against the gap of the wrong answer itself: the same
    row with attention crossing examples."""
    base = unwrapped(model)
    param = next(base.parameters())
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, base.config.vocab_size, (n,), generator=gen).to(param.device) for n in (5, 3))
    row = torch.cat([first, second])[None]
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]], device=param.device)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            with segment_attention(base.config):
                packed = base(input_ids=row, position_ids=positions, segment_bounds=(0, 5, 8), use_cache=False).logits
            alone = torch.cat([base(input_ids=x[None], use_cache=False).logits for x in (first, second)], dim=1)
            # An explicit mask turns off transformers' packed-sequence detection: attention crosses examples.
            crossed = base(input_ids=row, position_ids=positions, attention_mask=torch.ones_like(row), use_cache=False).logits
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use segments with this model
        return f"a packed forward failed ({type(exc).__name__}: {first_line(exc)})"
    finally:
        base.train(was_training)

    def gap(a: torch.Tensor) -> float:
        return (a.float().log_softmax(-1) - alone.float().log_softmax(-1)).abs().max().item()

    # Right within rounding, or at least ten times closer than attention that crosses examples (a
    # fixed tolerance alone fails bf16, whose rounding of large logits is large). Measured on random
    # GPT-2s: segments are 5e-7 to 6e-6 off in fp32 and 0 in bf16; crossing is 0.06 to 2.4 off.
    off = gap(packed)
    if not (off <= 1e-4 or off <= 0.1 * gap(crossed)):
        return f"packed examples do not get the log-probabilities they get alone (max gap {off:.3g})"
    return None


def use_segments(packing: str, device: torch.device, compile: bool, model) -> tuple[bool, str | None]:
    """Resolve data.packing: (segments?, why not where `auto` wanted them). `auto` is segments on CPU
    (eager), rows on GPU or when compiled, and rows for a model segment attention cannot serve;
    an explicit `segments` there is an error."""
    config = unwrapped(model).config
    if packing == "rows" or (packing == "auto" and (device.type != "cpu" or compile)):
        return False, None
    if packing == "segments" and compile:
        raise LorafitError(
            "data.packing=segments cannot be compiled (example boundaries change every batch, so "
            "torch.compile would recompile); use data.packing=rows with train.compile=true."
        )
    reason = segments_unsupported(config) or segments_probe(model)
    if reason and packing == "segments":
        raise LorafitError(f"data.packing=segments: {reason}. Use data.packing=rows (or auto).")
    return reason is None, reason
