"""Texts from a Hugging Face Hub dataset.

With a `max_examples` cap the dataset is streamed through a seeded shuffle buffer and reading
stops as soon as the cap is reached, so keeping 10,000 rows never downloads a multi-GB dataset:
the buffer is filled first (SHUFFLE_BUFFER rows), so a cap of 10,000 reads about 20,000 rows
(more where filters or dedupe drop rows). The sample is deterministic for a given seed; it is
drawn from the first shards the stream reaches (the shard order is shuffled with the same seed),
not uniformly from the whole dataset. Without a cap the split is downloaded and read whole
(and the datasets library caches it).

A streamed sample is kept in the lorafit cache (`hub/`), keyed by everything that decides it
(dataset, config, split, revision, fields, filters, cap, seed), so a second run or `lorafit eval`
of the same config reads no rows at all, also offline. Pin `revision` to be sure the sample
never changes; delete the cache's `hub/` folder to draw it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from lorafit.atomic import atomic_write_text
from lorafit.config import SourceConfig
from lorafit.console import progress_bar
from lorafit.data.examples import check_fields, columns_needed, from_record, is_example, record_fields
from lorafit.data.filters import filter_texts, kept, report_pair_problems
from lorafit.errors import DataError, LorafitError, described, offline_note

SHUFFLE_BUFFER = 10_000
SAMPLE_CACHE_VERSION = 1
PROGRESS_MIN_ROWS = 1000  # a progress bar for streams at least this long


def _join(values: Iterable, join: str) -> str:
    return join.join("" if v is None else str(v) for v in values)


def _failure(name: str, src: SourceConfig, exc: Exception, doing: str) -> LorafitError:
    return LorafitError(
        f"Could not {doing} source '{name}' from the Hugging Face Hub ({src.path}"
        f"{f', config {src.config!r}' if src.config else ''}, split {src.split!r}): {described(exc)}"
        f"{offline_note()}\nIf you are offline, point it at a local file: data.sources.{name}.path=FILE "
        "(.jsonl, .json, .csv, .txt or .parquet)."
    )


def sample_cache_path(cache_dir: Path, src: SourceConfig, seed: int) -> Path:
    what = [SAMPLE_CACHE_VERSION, src.path, src.config, src.split, src.revision, src.text_fields, src.join,
            src.max_examples, src.min_chars, src.dedupe, seed, SHUFFLE_BUFFER]
    if src.kind != "text":  # text keys stay as they were, so cached samples stay valid
        what += [src.kind, record_fields(src), src.train_on]
    key = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:24]
    return Path(cache_dir) / "hub" / f"{key}.json"


def read_hub_texts(name: str, src: SourceConfig, seed: int, cache_dir: Path | None = None) -> list[str]:
    """Filtered texts of one hub source; with a cap, at most `max_examples` of them, streamed."""
    if src.max_examples is None or cache_dir is None:
        return _read(name, src, seed)
    path = sample_cache_path(cache_dir, src, seed)
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))["texts"]
        if isinstance(texts, list) and all(is_example(t) for t in texts):
            return texts
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: stream it
    texts = _read(name, src, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a reader never sees half a file
        atomic_write_text(path, json.dumps({"source": src.path, "config": src.config, "split": src.split, "texts": texts}))
    except OSError:
        pass  # the cache is an optimisation; an unwritable cache dir must not stop the run
    return texts


def _read(name: str, src: SourceConfig, seed: int) -> list[str]:
    import datasets  # start-up: datasets (a second or more) loads only when a source is on the Hub, not for local files

    examples = src.kind != "text"
    fields = src.text_fields
    streaming = src.max_examples is not None
    try:
        ds = datasets.load_dataset(
            src.path, name=src.config, split=src.split, revision=src.revision, streaming=streaming
        )
    except Exception as exc:  # the datasets library raises many types for "cannot reach / not found"
        raise _failure(name, src, exc, "load") from None

    if examples:  # the top-level columns the fields are read from (e.g. `answers` for `answers.text[0]`)
        fields = columns_needed(src, list(ds.column_names or []))
    dataset = lambda: f"Source '{name}' (hub dataset {src.path})"  # noqa: E731
    where = lambda i: lambda: f"{dataset()} row {i + 1}"  # noqa: E731
    if not streaming:
        check_fields(fields, ds.column_names, dataset, name, src)
        columns = [ds[f] for f in fields]  # column access: no per-row dicts of unused fields
        if examples:
            texts = [from_record(dict(zip(fields, values)), src, where(i)) for i, values in enumerate(zip(*columns))]
        else:
            texts = [_join(values, src.join) for values in zip(*columns)]
        return filter_texts(texts, src, name)

    if ds.column_names is not None:  # known up front when the hub publishes the features
        check_fields(fields, ds.column_names, dataset, name, src)

    def rows():
        for i, row in enumerate(ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)):  # a seeded shuffle within a buffer
            check_fields(fields, row, dataset, name, src)
            yield from_record(row, src, where(i)) if examples else _join((row[f] for f in fields), src.join)

    texts: list[str] = []
    problems: dict[str, int] = {}
    bar = progress_bar(src.max_examples, f"streaming {name}", "row", src.max_examples >= PROGRESS_MIN_ROWS, unit_scale=True)
    try:
        for text in kept(rows(), src, problems):  # rows that pass the filters, until the cap
            texts.append(text)
            if bar is not None:
                bar.update(1)
            if len(texts) >= src.max_examples:
                break
    except DataError:
        raise
    except Exception as exc:  # a stream can fail mid-way (connection lost, bad shard)
        raise _failure(name, src, exc, "stream") from None
    finally:
        if bar is not None:
            bar.close()
    report_pair_problems(name, problems)
    return texts
