"""Preference pairs from a labelled corpus (`pair_by_label`): texts with a preferred label against texts with a
dispreferred one, under one shared prompt.

    pair_by_label: {field: label, chosen: "1", rejected: "0", prompt: "Write a restaurant review."}

The source's `text_field` holds the text. The texts of each label keep their file order, are shuffled with
data.split_seed (each label on its own), and the i-th chosen text is paired with the i-th rejected one, so
there are as many pairs as the rarer label has texts (yelp_test.csv: 1,383 positive, 617 negative -> 617
pairs). Every pair has the same prompt: what DPO then learns is which kind of text to prefer after it (the
shape of the DPO paper's controlled-sentiment task, with real reviews instead of sampled ones). Pairs are then
filtered, capped and split like any other examples.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from lorafit.data.examples import Example

if TYPE_CHECKING:
    from lorafit.config import SourceConfig

KEYS = ("field", "chosen", "rejected", "prompt")
DEFAULT_PROMPT = "Review:"


def problems(name: str, src: SourceConfig) -> list[str]:
    spec = src.pair_by_label
    if spec is None:
        return []
    key = f"data.sources.{name}.pair_by_label"
    out = [f"{key}.{k}: unknown key; keys: {', '.join(KEYS)}" for k in spec if k not in KEYS]
    out += [f"{key}.{k}: required" for k in ("field", "chosen", "rejected") if not spec.get(k)]
    if src.kind != "preference":
        out.append(f"{key}: builds preference pairs; set data.sources.{name}.kind: preference")
    return out


HUB_ROWS_PER_PAIR = 10  # a capped hub source streams this many rows per pair wanted (labels may be rare)


def as_labelled(src: SourceConfig, local: bool) -> SourceConfig:
    """The source read as (label, text) examples: prompt_completion with the label as its one prompt field. A local
    file is read whole (max_examples caps the pairs); a hub stream stops after HUB_ROWS_PER_PAIR rows a pair."""
    cap = None if local or src.max_examples is None else src.max_examples * HUB_ROWS_PER_PAIR
    return dataclasses.replace(src, kind="prompt_completion", prompt_field=src.pair_by_label["field"],
                               completion_field=src.text_fields, template=None, pair_by_label=None, max_examples=cap)


def pairs(examples: list[Example], src: SourceConfig, seed: int) -> list[dict]:
    spec = src.pair_by_label
    label = lambda e: e["prompt"][spec["field"]]  # noqa: E731
    chosen = [e["completion"] for e in examples if label(e) == spec["chosen"]]
    rejected = [e["completion"] for e in examples if label(e) == spec["rejected"]]
    rng = np.random.default_rng(seed)
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    rejected = [rejected[i] for i in rng.permutation(len(rejected))]
    prompt = {"prompt": spec.get("prompt", DEFAULT_PROMPT)}
    return [{"prompt": dict(prompt), "chosen": c, "rejected": r} for c, r in zip(chosen, rejected)]
