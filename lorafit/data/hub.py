"""Texts from a Hugging Face Hub dataset.

With a `max_examples` cap the dataset is streamed through a seeded shuffle buffer and reading
stops as soon as the cap is reached, so keeping 10,000 rows never downloads a multi-GB dataset:
the buffer is filled first (SHUFFLE_BUFFER rows), so a cap of 10,000 reads about 20,000 rows
(more where filters or dedupe drop rows). The sample is deterministic for a given seed; it is
drawn from the first shards the stream reaches (the shard order is shuffled with the same seed),
not uniformly from the whole dataset. Without a cap the split is downloaded and read whole.
"""

from __future__ import annotations

from collections.abc import Iterable

from lorafit.config import SourceConfig
from lorafit.errors import DataError, LorafitError

SHUFFLE_BUFFER = 10_000


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


def read_hub_texts(name: str, src: SourceConfig, seed: int) -> list[str]:
    """Filtered texts of one hub source; with a cap, at most `max_examples` of them, streamed."""
    import datasets

    from lorafit.data.sources import is_usable

    fields = _fields(src)
    streaming = src.max_examples is not None
    try:
        ds = datasets.load_dataset(
            src.path, name=src.config, split=src.split, revision=src.revision, streaming=streaming
        )
    except Exception as exc:  # the datasets library raises many types for "cannot reach / not found"
        raise _failure(name, src, exc, "load") from None

    if not streaming:
        _check_fields(ds.column_names, fields, name, src)
        columns = [ds[f] for f in fields]  # column access: no per-row dicts of unused fields
        texts = [_join(values, src.join) for values in zip(*columns)]
        from lorafit.data.sources import filter_texts

        return filter_texts(texts, src)

    if ds.column_names is not None:  # known up front when the hub publishes the features
        _check_fields(ds.column_names, fields, name, src)
    texts: list[str] = []
    seen: set[str] = set()
    try:
        # Seeded shuffle within a buffer; keep rows that pass the filters; stop at the cap.
        for row in ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER):
            if any(f not in row for f in fields):
                _check_fields(row, fields, name, src)
            text = _join((row[f] for f in fields), src.join)
            if not is_usable(text, src):
                continue
            if src.dedupe:
                if text in seen:
                    continue
                seen.add(text)
            texts.append(text)
            if len(texts) >= src.max_examples:
                break
    except DataError:
        raise
    except Exception as exc:  # a stream can fail mid-way (connection lost, bad shard)
        raise _failure(name, src, exc, "stream") from None
    return texts
