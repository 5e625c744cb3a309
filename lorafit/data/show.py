"""`lorafit data RECIPE --show N`: examples exactly as training sees them, rendered, the scored tokens marked.

The answer to "what exactly is trained on?": the same reading, splitting, template rendering, tokenisation and
length policy as `lorafit train` (data/prepare.py's steps), shown for the first N training examples.
"""

from __future__ import annotations

import sys

import numpy as np

from lorafit.config import RunConfig
from lorafit.data.sources import load_corpus
from lorafit.data.templates import describe_source, render_examples
from lorafit.data.tokenize import tokenize_texts

MARK_OPEN, MARK_CLOSE = "[[", "]]"  # around scored text where there is no terminal to colour it


def scored_spans(ids: np.ndarray, scored: np.ndarray) -> list[tuple[list[int], bool]]:
    """An example's tokens as runs of (token ids, scored?): a token is scored when it is a scored target."""
    runs: list[tuple[list[int], bool]] = []
    for token, flag in zip(ids.tolist(), scored.tolist()):
        if runs and runs[-1][1] == flag:
            runs[-1][0].append(token)
        else:
            runs.append(([token], flag))
    return runs


def show_examples(cfg: RunConfig, tokenizer, n: int, out=None) -> int:
    """Print the first `n` training examples (after the length policy; a chunked document gives several); returns
    how many were shown. On a terminal the scored text is green; elsewhere it stands between [[ and ]]."""
    out = out or sys.stdout
    d = cfg.data
    corpus = load_corpus(d)
    items, sources = corpus.train_texts[:n], corpus.train_sources[:n]
    rendered = render_examples(items, sources, d, tokenizer)
    split = tokenize_texts(rendered, sources, tokenizer, d.seq_len, d.long_examples)
    colour = out.isatty()
    if not colour:
        out.write(f"# scored tokens (the targets the loss is taken on) between {MARK_OPEN} and {MARK_CLOSE}\n")
    configs = list(d.sources.values())
    shown = min(n, len(split))
    for i in range(shown):
        ids, scored = split.example(i), split.example_scored(i)
        source = int(split.sources[i])
        about = describe_source(configs[source])
        cut = ", truncated" if split.truncated[i] else ""
        out.write(f"--- example {i + 1} of {shown}: source {corpus.source_names[source]} ({about['kind']}"
                  f"{', template ' + about['template'] if 'template' in about else ''}), {len(ids):,} tokens, "
                  f"{int(scored.sum()):,} scored{cut}\n")
        for run, flag in scored_spans(ids, scored):
            text = tokenizer.decode(run, skip_special_tokens=False)
            if flag:
                text = f"\x1b[32m{text}\x1b[0m" if colour else f"{MARK_OPEN}{text}{MARK_CLOSE}"
            out.write(text)
        out.write("\n")
    total = split.lengths()[:shown].sum() if shown else 0
    out.write(f"--- {shown} example(s): {int(total):,} tokens, {int(split.targets_per_example()[:shown].sum()):,} "
              f"scored; seq_len {d.seq_len}, long examples: {d.long_examples}\n")
    return shown
