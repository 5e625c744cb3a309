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
import os
from collections.abc import Iterable
from pathlib import Path

from lorafit.config import SourceConfig
from lorafit.errors import DataError, LorafitError

SHUFFLE_BUFFER = 10_000
SAMPLE_CACHE_VERSION = 1
PROGRESS_MIN_ROWS = 1000  # a progress bar for streams at least this long


def _fields(src: SourceConfig) -> list[str]:
    return [str(f) for f in src.text_field] if isinstance(src.text_field, list) else [str(src.text_field)]


def _check_fields(columns: Iterable[str], fields: list[str], name: str, src: SourceConfig) -> None:
    columns = list(columns)
    missing = [f for f in fields if f not in columns]
    if missing:
        raise DataError(
            f"Source '{name}' (hub dataset {src.path}) has no field {missing[0]!r}; its fields are: "
            f"{', '.join(columns)}. Set data.sources.{name}.text_field to one of them."
        )


def _join(values: Iterable, join: str) -> str:
    return join.join("" if v is None else str(v) for v in values)


def _failure(name: str, src: SourceConfig, exc: Exception, doing: str) -> LorafitError:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return LorafitError(
        f"Could not {doing} source '{name}' from the Hugging Face Hub ({src.path}"
        f"{f', config {src.config!r}' if src.config else ''}, split {src.split!r}): {type(exc).__name__}: {first}\n"
        f"If you are offline, point it at a local file: data.sources.{name}.path=FILE "
        "(.jsonl, .json, .csv, .txt or .parquet)."
    )


def sample_cache_path(cache_dir: Path, src: SourceConfig, seed: int) -> Path:
    what = [SAMPLE_CACHE_VERSION, src.path, src.config, src.split, src.revision, _fields(src), src.join,
            src.max_examples, src.min_chars, src.dedupe, seed, SHUFFLE_BUFFER]
    if src.kind != "text":  # text keys stay as they were, so cached samples stay valid
        from lorafit.data.examples import record_fields

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
        from lorafit.data.examples import is_example

        if isinstance(texts, list) and all(is_example(t) for t in texts):
            return texts
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: stream it
    texts = _read(name, src, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"source": src.path, "config": src.config, "split": src.split, "texts": texts}),
                       encoding="utf-8")
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except OSError:
        pass  # the cache is an optimisation; an unwritable cache dir must not stop the run
    return texts


def _read(name: str, src: SourceConfig, seed: int) -> list[str]:
    import datasets

    from lorafit.data.examples import columns_needed, dedupe_key, from_record, scored_text
    from lorafit.data.sources import is_usable

    examples = src.kind != "text"
    fields = _fields(src)
    streaming = src.max_examples is not None
    try:
        ds = datasets.load_dataset(
            src.path, name=src.config, split=src.split, revision=src.revision, streaming=streaming
        )
    except Exception as exc:  # the datasets library raises many types for "cannot reach / not found"
        raise _failure(name, src, exc, "load") from None

    if examples:  # the top-level columns the fields are read from (e.g. `answers` for `answers.text[0]`)
        fields = columns_needed(src, list(ds.column_names or []))
    where = lambda i: lambda: f"Source '{name}' (hub dataset {src.path}) row {i + 1}"  # noqa: E731
    if not streaming:
        _check_fields(ds.column_names, fields, name, src)
        columns = [ds[f] for f in fields]  # column access: no per-row dicts of unused fields
        if examples:
            texts = [from_record(dict(zip(fields, values)), src, where(i)) for i, values in enumerate(zip(*columns))]
        else:
            texts = [_join(values, src.join) for values in zip(*columns)]
        from lorafit.data.sources import filter_texts

        return filter_texts(texts, src)

    if ds.column_names is not None:  # known up front when the hub publishes the features
        _check_fields(ds.column_names, fields, name, src)
    texts: list[str] = []
    seen: set[str] = set()
    bar = None
    if src.max_examples >= PROGRESS_MIN_ROWS:
        from tqdm.auto import tqdm

        bar = tqdm(total=src.max_examples, desc=f"streaming {name}", unit="row", unit_scale=True, dynamic_ncols=True)
    try:
        # Seeded shuffle within a buffer; keep rows that pass the filters; stop at the cap.
        for i, row in enumerate(ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)):
            if any(f not in row for f in fields):
                _check_fields(row, fields, name, src)
            text = from_record(row, src, where(i)) if examples else _join((row[f] for f in fields), src.join)
            if not is_usable(scored_text(text, src), src):
                continue
            if src.dedupe:
                key = dedupe_key(text)
                if key in seen:
                    continue
                seen.add(key)
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
    return texts
