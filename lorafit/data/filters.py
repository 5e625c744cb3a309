"""Which examples of a source are kept: not empty, at least `min_chars`, and with `dedupe` the first of
exact duplicates. One definition for local files (filtered once read) and hub streams (filtered as
they arrive, so that reading stops at the cap).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from lorafit.console import log
from lorafit.data.examples import Example, dedupe_key, pair_problem, scored_text

if TYPE_CHECKING:
    from lorafit.config import SourceConfig


def is_usable(text: str, src: SourceConfig) -> bool:
    """Not empty, not whitespace only, and at least min_chars characters once stripped."""
    return len(text.strip()) >= max(1, src.min_chars)


def kept(examples: Iterable[Example], src: SourceConfig, problems: dict[str, int] | None = None) -> Iterator[Example]:
    """The examples that pass the filters, in order, one at a time. A prompt-completion or chat example
    is judged by what would be scored (e.g. its completion); a preference pair with an empty response or
    two equal ones is left out and counted in `problems` (see examples.pair_problem)."""
    seen: set[str] = set()
    for example in examples:
        problem = pair_problem(example)
        if problem is not None:
            if problems is not None:
                problems[problem] = problems.get(problem, 0) + 1
            continue
        if not is_usable(scored_text(example, src), src):
            continue
        if src.dedupe:
            key = dedupe_key(example)
            if key in seen:
                continue
            seen.add(key)
        yield example


def filter_texts(texts: Iterable[Example], src: SourceConfig, name: str = "") -> list:
    """Drop empty, whitespace-only and too-short texts; optionally exact duplicates (first kept). Pairs left
    out for an empty or repeated response are reported."""
    problems: dict[str, int] = {}
    out = list(kept(texts, src, problems))
    report_pair_problems(name, problems)
    return out


def report_pair_problems(name: str, problems: dict[str, int]) -> None:
    if problems:
        what = {"empty_response": "an empty chosen or rejected response", "chosen_equals_rejected": "chosen == rejected"}
        log(f"source '{name}': left out " + ", ".join(f"{n:,} pair(s) with {what[k]}" for k, n in problems.items()))
