"""Where a training run stands: which examples each step takes, and the counters a checkpoint restores.

`StepPlan` is a pure function of (seed, step), so the step is all a resume needs to continue
mid-epoch; `Progress` is everything else a checkpoint keeps besides the weights, optimizer, schedule
and RNG states, saved and restored whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch


@dataclass
class StepPlan:
    """Which examples each optimizer step takes: a seeded permutation per epoch, then slices."""

    n_train: int
    per_step: int
    epochs: float
    max_steps: int | None
    seed: int
    _perm_epoch: int = -1
    _perm: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.per_step)

    @property
    def total_steps(self) -> int:
        total = math.ceil(self.steps_per_epoch * self.epochs)
        return min(total, self.max_steps) if self.max_steps else total

    def examples(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_train)
            self._perm_epoch = epoch
        return self._perm[j * self.per_step : (j + 1) * self.per_step]

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch


@dataclass
class Window:
    """Training loss and throughput since the last log line (summed on device, read on log steps)."""

    nll: torch.Tensor | float = 0.0
    tokens: int = 0
    examples: int = 0
    seconds: float = 0.0
    steps: int = 0
    rank_tokens: list[int] | None = None  # data parallel: the target tokens each rank computed
    processed: int = 0  # positions computed (each example's tokens but the last): scored or context

    def to_state(self) -> dict:
        return {"nll": float(self.nll), "tokens": self.tokens, "examples": self.examples, "seconds": self.seconds,
                "steps": self.steps, "rank_tokens": self.rank_tokens, "processed": self.processed}

    @classmethod
    def from_state(cls, state: dict, device: torch.device, world_size: int) -> "Window":
        w = cls(torch.tensor(state["nll"], dtype=torch.float64, device=device), state["tokens"], state["examples"],
                state["seconds"], state["steps"], processed=state.get("processed", 0))  # older checkpoints: none
        if state.get("rank_tokens") and len(state["rank_tokens"]) == world_size:  # kept only at the same world size
            w.rank_tokens = state["rank_tokens"]
        return w


@dataclass
class Progress:
    """The run's counters: saved whole in each checkpoint (state.json), restored whole on --resume."""

    step: int = 0
    window: Window = field(default_factory=Window)
    train_seconds: float = 0.0
    train_tokens: int = 0
    train_processed_tokens: int = 0
    last_train_loss: float | None = None
    nonfinite_skipped: int = 0

    def to_state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"window": self.window.to_state()}

    @classmethod
    def from_state(cls, state: dict, device: torch.device, world_size: int) -> "Progress":
        values = {f.name: state.get(f.name, 0) if f.name == "train_processed_tokens" else state[f.name]
                  for f in fields(cls)}  # a checkpoint older than the processed count has none
        return cls(**values | {"window": Window.from_state(state["window"], device, world_size)})


def progress_line(record: dict, total_steps: int, seconds_per_step: float) -> str:
    """`step 10/283: loss 3.2145, lr 2.00e-04, 1,234 tokens/s (all scored), ETA 12m05s` (ETA from the window's pace);
    when a prompt is context, both: `..., 1,234 processed tokens/s, 160 scored tokens/s, ETA ...`."""
    loss = "n/a (every step skipped)" if record["loss"] is None else f"{record['loss']:.4f}"
    scored, processed = record["tokens_per_second"], record.get("processed_tokens_per_second")
    speed = ""
    if scored and processed and round(processed) != round(scored):  # a prompt is computed, not scored
        speed = f", {processed:,.0f} processed tokens/s, {scored:,.0f} scored tokens/s"
    elif scored:
        speed = f", {scored:,.0f} tokens/s (all scored)"
    eta = int(round(max(total_steps - record["step"], 0) * seconds_per_step))
    hours, rest = divmod(eta, 3600)
    clock = f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
    return f"step {record['step']}/{total_steps}: loss {loss}, lr {record['lr']:.2e}{speed}, ETA {clock}"
