"""Texts from a Hugging Face Hub dataset.

With a `max_examples` cap the dataset is streamed through a seeded shuffle buffer and only as
many rows as needed are read, so keeping 10,000 rows never downloads a multi-GB dataset.
"""

from __future__ import annotations

from lorafit.config import SourceConfig
from lorafit.errors import DataError, LorafitError

SHUFFLE_BUFFER = 10_000


def _join_fields(row: dict, fields: list[str], join: str, name: str, src: SourceConfig) -> str:
    missing = [f for f in fields if f not in row]
    if missing:
        raise DataError(
            f"Source '{name}' (hub dataset {src.path}) has no field {missing[0]!r}; its fields are: "
            f"{', '.join(row)}. Set data.sources.{name}.text_field to one of them."
        )
    return join.join("" if row[f] is None else str(row[f]) for f in fields)


def read_hub_texts(name: str, src: SourceConfig, seed: int) -> list[str]:
    import datasets

    fields = src.text_field if isinstance(src.text_field, list) else [src.text_field]
    streaming = src.max_examples is not None
    try:
        ds = datasets.load_dataset(
            src.path, name=src.config, split=src.split, revision=src.revision, streaming=streaming
        )
    except Exception as exc:  # the datasets library raises many types for "cannot reach / not found"
        raise LorafitError(
            f"Could not load source '{name}' from the Hugging Face Hub ({src.path}, split {src.split!r}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            f"If you are offline, point it at a local file: data.sources.{name}.path=FILE "
            "(.jsonl, .json, .csv, .txt or .parquet)."
        ) from None
    from lorafit.data.sources import filter_texts

    if not streaming:
        rows = ds.select_columns([f for f in fields if f in ds.column_names] or ds.column_names[:1])
        if not all(f in ds.column_names for f in fields):
            _join_fields(dict.fromkeys(ds.column_names), fields, src.join, name, src)
        texts = [src.join.join("" if r[f] is None else str(r[f]) for f in fields) for r in rows]
        return filter_texts(texts, src)
    # Stream: shuffle within a buffer (seeded), keep rows that pass the filters, stop at the cap.
    texts: list[str] = []
    seen: set[str] = set()
    for row in ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER):
        text = _join_fields(row, fields, src.join, name, src)
        if not filter_texts([text], src) or text in seen:
            continue
        if src.dedupe:
            seen.add(text)
        texts.append(text)
        if len(texts) >= src.max_examples:
            break
    return texts
