"""Preference tuning on the SFT machinery: per-sequence log-probabilities from the per-token NLL that SFT
computes (same layouts, fast paths and head loss), the objective of lorafit/objectives.py on top.

A pair i is the tokenised sequences 2i (chosen) and 2i + 1 (rejected); a step takes pairs, and a pair's two
sequences always share a micro-batch (and so a rank), so its loss sees both in one graph.

The reference (DPO, IPO) is the model as training starts; its log-probabilities are computed once, before
training, kept with the tokenised data (`TokenizedSplit.ref_logps`) and saved in the run: lorafit/reference.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lorafit import distributed as dist
from lorafit.config import RunConfig
from lorafit.data.packing import IGNORE, PackedBatch
from lorafit.data.tokenize import TokenizedSplit
from lorafit.evaluate import Scoring, example_nll, totals_by_source
from lorafit.metrics import LN2
from lorafit.objectives import CHOSEN_NLL, Settings, pair_terms

# What the training log shows per step (TRL's names): means over the pairs of the logging window.
STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def settings(cfg: RunConfig) -> Settings:
    p = cfg.preference
    return Settings(p.beta, p.label_smoothing, p.gamma, p.lambda_)


def pair_sequences(pairs: np.ndarray) -> np.ndarray:
    """The sequences of the given pairs: chosen, rejected, chosen, ..."""
    pairs = np.asarray(pairs, dtype=np.int64)
    return np.stack([2 * pairs, 2 * pairs + 1], 1).reshape(-1)


def pair_costs(split: TokenizedSplit, pairs: np.ndarray) -> np.ndarray:
    """Positions a pair costs to compute (both sequences): what data parallel balances ranks by."""
    lengths = split.lengths() - 1
    return lengths[2 * pairs] + lengths[2 * pairs + 1]


@torch.no_grad()
def sequence_logps(model, split: TokenizedSplit, scoring: Scoring) -> np.ndarray:
    """Each sequence's log-probability (float64, summed over its scored tokens), in eval mode, under the model's
    adapter as it is set (the reference's switch: lorafit/reference.py)."""
    was_training = model.training
    model.eval()
    try:
        return -example_nll(model, split, scoring)
    finally:
        model.train(was_training)


@dataclass
class PreferenceObjective:
    """The trainer's hook for a preference objective: the loss of each micro-batch, and the step's statistics."""

    objective: str
    settings: Settings
    split: TokenizedSplit  # the training sequences (with ref_logps when the objective uses a reference)
    step_pairs: int = 0
    step_chosen_tokens: int = 0
    sums: torch.Tensor | None = None  # this step's sums over its pairs: loss, then STATS
    window: list[float] = field(default_factory=lambda: [0.0] * (2 + len(STATS)))  # steps, pairs, STATS sums
    window_loss: float = 0.0  # the window's step losses, summed
    reference_seconds: float = 0.0  # the one reference pass before training

    def begin_step(self, pairs: np.ndarray, device) -> None:
        self.step_pairs = len(pairs)
        self.step_chosen_tokens = int(self.split.targets_per_example()[2 * np.asarray(pairs)].sum())
        self.sums = torch.zeros(len(STATS), dtype=torch.float64, device=device)

    def micro_loss(self, nll: torch.Tensor, batch: PackedBatch, counted: bool = True) -> torch.Tensor:
        """This micro-batch's part of the step loss: its pairs' losses over the step's pair count (ORPO: plus its
        chosen tokens' NLL over the step's chosen tokens), so the micro-batching never changes the step.
        Not `counted`: a rank's stand-in batch (data parallel), weight 0 and left out of the statistics."""
        example = batch.example_ids[batch.targets != IGNORE].to(nll.device)
        seqs, where = torch.unique(example, return_inverse=True)  # sorted: 2i, 2i + 1, ...
        logp = torch.zeros(len(seqs), dtype=nll.dtype, device=nll.device).index_add(0, where, -nll)
        ids = seqs.cpu().numpy()
        if len(ids) % 2 or (ids[0::2] % 2).any() or (ids[1::2] != ids[0::2] + 1).any():
            raise RuntimeError("a preference micro-batch must hold both sequences of each of its pairs")
        tokens = torch.as_tensor(self.split.targets_per_example()[ids], dtype=nll.dtype, device=nll.device)
        ref = None if self.split.ref_logps is None else \
            torch.as_tensor(self.split.ref_logps[ids], dtype=nll.dtype, device=nll.device)
        terms = pair_terms(self.objective, self.settings, logp[0::2], logp[1::2], tokens[0::2], tokens[1::2],
                           None if ref is None else ref[0::2], None if ref is None else ref[1::2])
        loss = terms.losses.sum() / self.step_pairs
        if self.objective in CHOSEN_NLL:
            loss = loss + CHOSEN_NLL[self.objective] * nll[example % 2 == 0].sum() / self.step_chosen_tokens
        if not counted:
            return loss * 0.0
        c, r = terms.chosen_rewards, terms.rejected_rewards
        self.sums += torch.stack([c.sum(), r.sum(), (c > r).sum(), (c - r).sum(), logp[0::2].detach().sum(),
                                  logp[1::2].detach().sum()]).double()
        return loss

    def end_step(self, step_loss: torch.Tensor) -> None:
        """Add the step (its loss already summed over ranks) to the logging window."""
        sums = dist.all_reduce_sum(self.sums).tolist()
        self.window[0] += 1
        self.window[1] += self.step_pairs
        self.window[2:] = [a + b for a, b in zip(self.window[2:], sums)]
        self.window_loss += float(step_loss)

    def window_record(self) -> dict:
        """The logging window's figures (then a new window): the mean step loss, and each statistic per pair."""
        steps, pairs = self.window[0], self.window[1]
        record = {"loss": self.window_loss / steps if steps else None, "pairs": pairs,
                  **{k: v / pairs if pairs else None for k, v in zip(STATS, self.window[2:])}}
        self.reset_window()
        return record

    def reset_window(self) -> None:
        self.window, self.window_loss = [0.0] * (2 + len(STATS)), 0.0

    def state(self) -> dict:
        return {"window": list(self.window), "window_loss": self.window_loss}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.window, self.window_loss = list(state["window"]), float(state["window_loss"])


def evaluate_pairs(model, split: TokenizedSplit, source_names: list[str], scoring: Scoring, objective: str,
                   s: Settings) -> dict:
    """Validation of a preference run: `val_preference` (the objective's loss, preference accuracy and mean
    margin of the rewards, mean log-probabilities, the chosen responses' token-weighted NLL and bits per
    byte, pairs), and the usual validation keys measured on the chosen responses."""
    start = time.perf_counter()
    logp = sequence_logps(model, split, scoring)
    seconds = time.perf_counter() - start
    tokens = split.targets_per_example()
    ref = split.ref_logps
    as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731 - float64 figures
    terms = pair_terms(objective, s, as_t(logp[0::2]), as_t(logp[1::2]), as_t(tokens[0::2]), as_t(tokens[1::2]),
                       None if ref is None else as_t(ref[0::2]), None if ref is None else as_t(ref[1::2]))
    chosen = slice(0, None, 2)
    nll_c, tokens_c, bytes_c = -logp[chosen], tokens[chosen], split.n_bytes[chosen]
    loss = float(terms.losses.mean()) + CHOSEN_NLL.get(objective, 0.0) * float(nll_c.sum() / tokens_c.sum())
    c, r = terms.chosen_rewards, terms.rejected_rewards
    preference = {
        "loss": loss,
        "accuracy": float((c > r).double().mean()),
        "margin": float((c - r).mean()),
        "chosen_logp": float(logp[0::2].mean()),
        "rejected_logp": float(logp[1::2].mean()),
        "chosen_nll": float(nll_c.sum() / tokens_c.sum()),
        "chosen_bits_per_byte": float(nll_c.sum() / (LN2 * bytes_c.sum())) if bytes_c.sum() else float("nan"),
        "pairs": len(split) // 2,
    }
    overall, by_source = totals_by_source(nll_c, tokens_c, bytes_c, split.sources[chosen], source_names)
    return {
        **overall.metrics(),  # val_loss, val_ppl, val_bits_*: of the chosen responses
        "val_examples": overall.examples,
        "val_tokens": overall.tokens,
        "val_bytes": overall.bytes,
        "eval_seconds": seconds,
        "eval_samples_per_second": len(split) / seconds if seconds > 0 else float("nan"),
        "eval_tokens_per_second": int(tokens.sum()) / seconds if seconds > 0 else float("nan"),
        "val_by_source": by_source,
        "val_preference": preference,
    }
