"""Speed-ups for training that leave the arithmetic unchanged up to rounding.

- `train.compile`: the backbone goes through `torch.compile`, which fuses casts, layer norms and
  dropouts. `Module.compile()` compiles in place, so parameter names (and so the saved adapter)
  are unchanged.

(GPT-2's one-kernel GELU is not here: the base is loaded with it, see modeling.FUSED_ACTIVATIONS.)

Every speed-up that changes state outside lorafit's own objects is switched here and nowhere else,
only around lorafit's own forward passes (`forward_state`, entered by lorafit.forward.Forward alone), and restored after: a model's attention
implementation (segment attention for a segments batch, the layout's, not optional), PEFT's cast of
LoRA inputs (skipped under autocast), cuDNN attention (off on CUDA), and the kept CPU buffer of the
head loss. One switch, LORAFIT_SPEEDUPS=0, turns off all of them but the layout's: each leaves the
arithmetic unchanged up to rounding, and off rules them out when a result looks wrong.
"""

from __future__ import annotations

import contextlib
import os

import torch

from lorafit.attention import SEGMENTS
from lorafit.lora import unwrapped

SPEEDUPS = os.environ.get("LORAFIT_SPEEDUPS", "1") != "0"


def prepare_for_speed(model, compile: bool) -> None:
    if compile:
        base = unwrapped(model)
        getattr(base, base.base_model_prefix).compile(dynamic=None)


@contextlib.contextmanager
def forward_state(model, base, device: torch.device, segments: bool):
    """The state one lorafit forward (and so its backward's kernels) runs in; everything is restored after.
    `model`: the PEFT model; `base`: its transformers model; `segments`: the batch is a row of segments."""
    with contextlib.ExitStack() as stack:
        if segments:
            stack.enter_context(_set(base.config, "_attn_implementation", SEGMENTS))
        if SPEEDUPS and torch.is_autocast_enabled(device.type):
            # PEFT casts every LoRA input to fp32, a full copy of the activations that autocast at once casts
            # back; autocast still computes the LoRA matmuls correctly without it.
            for layer in (m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")):
                stack.enter_context(_set(layer, "cast_input_dtype_enabled", False))
        if SPEEDUPS and device.type == "cuda":
            # cuDNN attention builds an execution plan per input shape (milliseconds of CPU each), and packed
            # batches change shape every step: the flash / memory-efficient kernels instead.
            previous = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
            stack.callback(torch.backends.cuda.enable_cudnn_sdp, previous)
        yield


@contextlib.contextmanager
def _set(obj, name: str, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


_head_buffers: dict[torch.dtype, torch.Tensor] = {}


def head_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A CPU buffer of `numel` elements for the head loss's logits, kept across chunks and steps: a fresh
    50 MB tensor is a fresh mmap, and page-faulting it in cost ~19 ms, twice a quotes step. With the
    speed-ups off, a fresh one each time (the same arithmetic)."""
    with torch.inference_mode(False):  # a normal tensor: evaluation (inference mode) and training share it
        if not SPEEDUPS:
            return torch.empty(numel, dtype=dtype)
        buf = _head_buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = _head_buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]
