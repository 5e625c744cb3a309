"""Preference objectives as pure functions of per-sequence log-probabilities.

Each takes, per pair, the policy's log-probability of the chosen and of the rejected response
(summed over the response's tokens and its EOS), their token counts, and (DPO, IPO) the frozen
reference's log-probabilities; it returns each pair's loss and the "rewards" TRL logs. A training
step's loss is the mean over its pairs (ORPO adds the chosen responses' token-weighted NLL, which the
trainer computes from the same forward pass: `CHOSEN_NLL`).

    dpo    -(1 - e) log s(b D) - e log s(-b D),   D = (pc - rc) - (pr - rr)            (summed logps;
           e = label_smoothing: conservative DPO; e = 0 is TRL's `sigmoid` loss)
    ipo    (D' - 1 / (2 b))^2,   D' = (pc - rc) / nc - (pr - rr) / nr       (TRL's length-normalised IPO)
    simpo  -(1 - e) log s(b (pc/nc - pr/nr) - g) - e log s(-(...))          (averaged logps, no reference)
    orpo   -l log s(log odds(pc/nc) - log odds(pr/nr)),  odds(p) = p / (1 - p)   (averaged logps, no
           reference) + the chosen responses' NLL

with s the logistic function, b = preference.beta, g = preference.gamma, l = preference.lambda. Rewards:
b * (logp - ref) for DPO and IPO, b * average logp for SimPO, l * average logp for ORPO (as TRL logs them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("dpo", "ipo", "orpo", "simpo")
WITH_REFERENCE = ("dpo", "ipo")  # the others are reference-free
CHOSEN_NLL = {"orpo": 1.0}  # weight of the chosen responses' token-weighted NLL in the step loss


@dataclass(frozen=True)
class Settings:
    """preference.* as the objectives read them (lorafit.config.PreferenceConfig)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    lambda_: float = 0.1


@dataclass
class PairTerms:
    losses: torch.Tensor  # (pairs,) each pair's loss
    chosen_rewards: torch.Tensor  # (pairs,) detached
    rejected_rewards: torch.Tensor


def uses_reference(objective: str) -> bool:
    return objective in WITH_REFERENCE


def _smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log s(x) - eps log s(-x): the logistic loss with a share eps of labels taken as flipped."""
    loss = -F.logsigmoid(x)
    return loss if eps == 0 else (1 - eps) * loss - eps * F.logsigmoid(-x)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_terms(objective: str, s: Settings, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, ref_chosen: torch.Tensor | None = None,
               ref_rejected: torch.Tensor | None = None) -> PairTerms:
    """Each pair's loss and rewards from summed log-probabilities (see the module doc)."""
    if objective in WITH_REFERENCE:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"{objective} needs the reference's log-probabilities")
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if objective == "dpo":
            losses = _smoothed(s.beta * (chosen_ratio - rejected_ratio), s.label_smoothing)
        else:
            delta = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
            losses = (delta - 1 / (2 * s.beta)) ** 2
        return PairTerms(losses, (s.beta * chosen_ratio).detach(), (s.beta * rejected_ratio).detach())
    chosen_avg, rejected_avg = chosen / chosen_tokens, rejected / rejected_tokens
    if objective == "simpo":
        losses = _smoothed(s.beta * (chosen_avg - rejected_avg) - s.gamma, s.label_smoothing)
        return PairTerms(losses, (s.beta * chosen_avg).detach(), (s.beta * rejected_avg).detach())
    if objective == "orpo":
        log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
        losses = -s.lambda_ * F.logsigmoid(log_odds)
        return PairTerms(losses, (s.lambda_ * chosen_avg).detach(), (s.lambda_ * rejected_avg).detach())
    raise ValueError(f"unknown preference objective {objective!r}; one of {', '.join(OBJECTIVES)}")
