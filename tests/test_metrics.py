"""Metric formulas (DESIGN invariant 8) against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import torch

from lorafit.evaluate import PLAIN, Scoring, evaluate_run
from lorafit.metrics import NllTotals


def test_formulas_against_hand_computed_values():
    t = NllTotals(nll=30.0, tokens=20, bytes=80, examples=3)
    m = t.metrics()
    assert m["val_loss"] == 1.5
    assert m["val_ppl"] == math.exp(1.5)
    assert m["val_bits_per_token"] == 1.5 / math.log(2)
    assert m["val_bits_per_byte"] == 30.0 / (math.log(2) * 80)


def test_totals_are_token_weighted_not_means_of_means():
    long, short = NllTotals(10.0, 10, 40, 1), NllTotals(2.0, 1, 4, 1)  # means 1.0 and 2.0
    assert (long + short).metrics()["val_loss"] == 12.0 / 11  # token-weighted
    assert (long + short).metrics()["val_loss"] != (1.0 + 2.0) / 2  # not the mean of the two means


def test_evaluate_overall_and_per_source_sum_to_the_same_totals():
    from test_invariants import lora_model, make_split, random_examples

    model = lora_model(seed=11)
    examples = random_examples(10, seed=11)
    split = make_split(examples)
    split.sources = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], dtype=np.int32)
    split.n_bytes = np.arange(10, 20, dtype=np.int64)
    from lorafit.data.packing import Layout
    from lorafit.forward import FastPaths, Forward

    cpu = torch.device("cpu")
    out = evaluate_run(model, split, ["a", "b", "c"], Scoring(Forward(model, FastPaths(Layout("rows", 64), True), device=cpu), 50, 299))
    plain = evaluate_run(model, split, ["a", "b", "c"], Scoring(Forward(model, PLAIN, device=cpu), 50, 299))  # no fast path at all
    # Reference: each example alone through the plain model, summed in float64.
    total = 0.0
    for e in examples:
        x = torch.tensor([e])
        with torch.no_grad():
            total += torch.nn.functional.cross_entropy(model(x).logits[0, :-1].double(), x[0, 1:], reduction="sum").item()
    tokens = sum(len(e) - 1 for e in examples)
    assert out["val_tokens"] == tokens and out["val_examples"] == 10
    assert math.isclose(out["val_loss"], total / tokens, rel_tol=1e-6)
    assert math.isclose(plain["val_loss"], total / tokens, rel_tol=1e-6)
    assert math.isclose(out["val_bits_per_byte"], total / (math.log(2) * 145), rel_tol=1e-6)
    by = out["val_by_source"]
    assert sum(s["tokens"] for s in by.values()) == tokens
    weighted = sum(s["val_loss"] * s["tokens"] for s in by.values()) / tokens
    assert math.isclose(weighted, out["val_loss"], rel_tol=1e-9)
