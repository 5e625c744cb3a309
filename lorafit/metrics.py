"""Token-weighted language-modelling metrics (DESIGN invariant 8).

Every metric comes from three sums, never from means of per-batch means:
    loss           = total NLL / target tokens          (nats per token)
    ppl            = exp(loss)
    bits_per_token = loss / ln 2
    bits_per_byte  = total NLL / (ln 2 * UTF-8 bytes of the scored text)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LN2 = math.log(2.0)


@dataclass
class NllTotals:
    nll: float = 0.0  # summed in float64
    tokens: int = 0
    bytes: int = 0
    examples: int = 0

    def __add__(self, other: "NllTotals") -> "NllTotals":
        return NllTotals(
            self.nll + other.nll, self.tokens + other.tokens, self.bytes + other.bytes, self.examples + other.examples
        )

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        loss = self.nll / self.tokens if self.tokens else float("nan")
        return {
            f"{prefix}loss": loss,
            f"{prefix}ppl": math.exp(loss) if loss < 700 else float("inf"),
            f"{prefix}bits_per_token": loss / LN2,
            f"{prefix}bits_per_byte": self.nll / (LN2 * self.bytes) if self.bytes else float("nan"),
        }
