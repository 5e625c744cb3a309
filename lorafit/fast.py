"""Speed-ups for training that leave the arithmetic unchanged up to rounding.

- GPT-2's `gelu_new` is written as seven elementwise ops (pow, mul, add, tanh, ...), each a full
  pass over the (tokens x 3072) MLP activations, forward and backward. `F.gelu(x, approximate=
  "tanh")` is the same function in one kernel: 3.4x faster forward + backward on CPU too (6.6 vs
  2.0 ms for one quotes step's activations, ~5% of the step), so it is used on every device.
- `train.compile`: the backbone goes through `torch.compile`, which fuses the remaining casts,
  layer norms and dropouts. `Module.compile()` compiles in place, so parameter names (and so the
  saved adapter) are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.lora import unwrapped


class FusedTanhGELU(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def fuse_gelu(model) -> int:
    """Replace gelu_new modules by the one-kernel equivalent; returns how many were replaced."""
    from transformers.activations import NewGELUActivation

    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, NewGELUActivation):
                setattr(module, name, FusedTanhGELU())
                replaced += 1
    return replaced


def prepare_for_speed(model, compile: bool) -> None:
    base = unwrapped(model)
    fuse_gelu(base)
    if compile:
        getattr(base, base.base_model_prefix).compile(dynamic=None)
