"""Which examples of a source are kept: not empty, at least `min_chars`, and with `dedupe` the first of
exact duplicates. One definition for local files (filtered once read) and hub streams (filtered as
they arrive, so that reading stops at the cap).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from lorafit.data.examples import Example, dedupe_key, scored_text

if TYPE_CHECKING:
    from lorafit.config import SourceConfig


def is_usable(text: str, src: SourceConfig) -> bool:
    """Not empty, not whitespace only, and at least min_chars characters once stripped."""
    return len(text.strip()) >= max(1, src.min_chars)


def kept(examples: Iterable[Example], src: SourceConfig) -> Iterator[Example]:
    """The examples that pass the filters, in order, one at a time. A prompt-completion or chat example
    is judged by what would be scored (e.g. its completion)."""
    seen: set[str] = set()
    for example in examples:
        if not is_usable(scored_text(example, src), src):
            continue
        if src.dedupe:
            key = dedupe_key(example)
            if key in seen:
                continue
            seen.add(key)
        yield example


def filter_texts(texts: Iterable[Example], src: SourceConfig) -> list:
    """Drop empty, whitespace-only and too-short texts; optionally exact duplicates (first kept)."""
    return list(kept(texts, src))
