"""Opt-in speed-ups for training that leave the arithmetic unchanged up to rounding.

- `train.compile`: the backbone goes through `torch.compile`, which fuses casts, layer norms and
  dropouts. `Module.compile()` compiles in place, so parameter names (and so the saved adapter)
  are unchanged.

(GPT-2's one-kernel GELU is not here: the base is loaded with it, see modeling.FUSED_ACTIVATIONS.)
"""

from __future__ import annotations

from lorafit.lora import unwrapped


def prepare_for_speed(model, compile: bool) -> None:
    if compile:
        base = unwrapped(model)
        getattr(base, base.base_model_prefix).compile(dynamic=None)
