"""Opt-in speed-ups for training on a GPU that leave the arithmetic unchanged up to rounding.

- GPT-2's `gelu_new` is written as seven elementwise kernels (pow, mul, add, tanh, ...); on a
  GPU each one is a full pass over the (tokens x 3072) MLP activations. `F.gelu(x, approximate=
  "tanh")` is the same function in one kernel.
- `train.compile`: the backbone goes through `torch.compile`, which fuses the remaining casts,
  layer norms and dropouts. `Module.compile()` compiles in place, so parameter names (and so the
  saved adapter) are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def prepare_for_speed(model, device: torch.device, compile: bool) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if device.type == "cuda":
        fuse_gelu(base)
    if compile:
        getattr(base, base.base_model_prefix).compile(dynamic=None)
