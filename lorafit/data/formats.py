"""Texts from local files: txt, jsonl, json, csv/tsv and parquet.

    texts = read_local_texts(Path("train.jsonl"), src, "quotes")

Every problem becomes a `DataError` naming the source, the file and the line or record, and what
to do. Files are decoded here rather than by `open(encoding=...)` so that a bad byte can be
reported with its offset and line, and line-based formats are streamed (files can be large).

Libraries parse: `json` (JSON and JSON lines), `csv`, pyarrow (parquet). What is by hand is there for the
messages, because the libraries' readers that would do more lack them (issue 22):
- pyarrow.json says "JSON parse error: ... in row 2" counting from 0 within a block, not the file's line; a field
  that holds a string on one line and a number on the next fails the whole file ("changed from string to number");
  a byte that is not UTF-8 raises a bare UnicodeDecodeError that names no file and no line;
- pyarrow.csv says "Expected 2 columns, got 3: 3,4,5", without a row or line number;
- datasets' loaders are built on these, and its text loader splits on lines or blank lines only (not on
  `separator`); its json `field=` is one top-level key, not a path like "data[].paragraphs[]" with inherited fields.
"""

from __future__ import annotations

import csv
import errno
import json
import re
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.data.examples import check_fields, columns_needed, from_record
from lorafit.errors import DataError, first_line
from lorafit.localpaths import special_kind

if TYPE_CHECKING:
    from lorafit.config import SourceConfig

FORMATS = ("jsonl", "json", "csv", "txt", "parquet")
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "txt",
    ".parquet": "parquet",
}
BOM = b"\xef\xbb\xbf"
SNIFF_BYTES = 8192  # NUL bytes here mean binary (or UTF-16), not UTF-8 text
CHUNK_BYTES = 1 << 20
MAX_JSON_DEPTH = 500  # Python's parser gives up near 1,000 levels; a record is a few levels deep
_numbers_as_text = [0]  # numeric field values used as text in the current read (reported once, see read_local_texts)


def read_local_texts(path: Path, src: SourceConfig, source_name: str) -> list[str]:
    """Every example's text, in file order, before any filtering (empty strings kept; the caller filters)."""
    path = Path(path)
    fmt = _format(path, src, source_name)
    _check_file(path, fmt, source_name)
    _numbers_as_text[0] = 0
    if src.kind != "text" and fmt == "txt":
        raise DataError(
            f"Source '{source_name}': kind {src.kind} reads fields, and a txt file ({path}) has none. Use a jsonl, "
            f"json, csv or parquet file, or set data.sources.{source_name}.format to the file's real format."
        )
    texts = READERS[fmt](path, src, source_name)
    if _numbers_as_text[0]:  # said once, so a numeric column used as text by mistake is noticed
        print(f"source '{source_name}': {_numbers_as_text[0]:,} numeric value(s) in {path} were used as text "
              "(written as Python prints them, e.g. 3 and 2.5)", file=sys.stderr)
    if not texts:
        raise DataError(
            f"Source '{source_name}': {path} holds no records ({fmt}). "
            f"Point data.sources.{source_name}.path at a file with data, or remove the source."
        )
    return texts


# ---------------------------------------------------------------- checks shared by all formats


def _format(path: Path, src: SourceConfig, name: str) -> str:
    fmt = src.format
    if fmt == "auto":
        fmt = EXTENSIONS.get(path.suffix.lower(), "")
        if not fmt:
            raise DataError(
                f"Source '{name}': cannot tell the format of {path} from its extension "
                f"'{path.suffix}'. Set data.sources.{name}.format to one of: {', '.join(FORMATS)}."
            )
    if fmt not in FORMATS:
        raise DataError(
            f"Source '{name}': format '{fmt}' cannot be read from a local file ({path}). "
            f"Set data.sources.{name}.format to one of: auto, {', '.join(FORMATS)}."
        )
    return fmt


def _check_file(path: Path, fmt: str, name: str) -> None:
    if path.is_symlink() and not path.exists():
        try:
            path.resolve(strict=True)
            why = "a symbolic link that cannot be followed"
        except RuntimeError:  # Python 3.11 reports a loop this way
            why = "a symbolic link loop"
        except OSError as exc:
            why = "a symbolic link loop" if exc.errno == errno.ELOOP else f"a broken symbolic link (to {path.readlink()})"
        raise DataError(f"Source '{name}': {path} is {why}. Fix the link, or point data.sources.{name}.path at the file itself.")
    if not path.exists():
        raise DataError(
            f"Source '{name}': file not found: {path.absolute()}. Check data.sources.{name}.path (relative paths "
            "are resolved against data.root when it is set, else against a recipe file's folder, or for shipped "
            "recipes and command-line overrides the current directory)."
        )
    if path.is_dir():
        raise DataError(
            f"Source '{name}': {path} is a directory, not a file. "
            f"Set data.sources.{name}.path to a file inside it."
        )
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # opening a FIFO waits for a writer; /dev/zero never ends
        kind = special_kind(info.st_mode)  # worded as `lorafit train`'s early check (lorafit/preflight.py) words it
        raise DataError(
            f"Source '{name}': {path} is {kind}, not a regular file: lorafit reads a data file more than once. "
            f"Save the data to a file and point data.sources.{name}.path at it."
        )
    if info.st_size == 0 and _has_data(path):
        raise DataError(
            f"Source '{name}': {path} is a pseudo-file (as in /proc or /sys): it reports 0 bytes yet has content, "
            f"which changes as it is read. Save a copy to a regular file and point data.sources.{name}.path at it."
        )
    if info.st_size == 0:
        raise DataError(
            f"Source '{name}': {path} is empty (0 bytes). "
            f"Point data.sources.{name}.path at a file with data, or remove the source."
        )
    if fmt == "parquet":  # binary by design; pyarrow checks it
        return
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"Source '{name}': {path} looks binary, not UTF-8 text (NUL byte at offset {nul}). "
            f"If it is UTF-16 or another encoding, convert it to UTF-8; if it is parquet, "
            f"set data.sources.{name}.format: parquet."
        )


def _has_data(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return bool(f.read(1))
    except OSError:
        return False


def _not_utf8(path: Path, name: str, offset: int, err: UnicodeDecodeError) -> DataError:
    with path.open("rb") as f:  # the line number is only worked out when there is an error
        line = f.read(offset).count(b"\n") + 1
    return DataError(
        f"Source '{name}': {path} is not valid UTF-8 at byte offset {offset} (line {line}): "
        f"{err.reason}. Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
    )


def _decode(raw: bytes, path: Path, name: str, offset: int) -> str:
    """`raw` decoded; `offset` is where it starts in the file, for the error message."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, name, offset + e.start, e) from None


def _lines(path: Path, name: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its newline) for each line of the file, BOM dropped."""
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw, offset = raw[len(BOM) :], len(BOM)
            yield lineno, _decode(raw, path, name, offset)
            offset += len(raw)


# ---------------------------------------------------------------- fields and values


def _text(values: list[tuple[Any, Any]], src: SourceConfig, where: Callable[[], str]) -> str:
    """Join the (field, value) pairs' values as text; `where` names the record for errors."""
    out = []
    for field, value in values:
        if value is None:
            out.append("")
        elif isinstance(value, str):
            out.append(value)
        elif isinstance(value, bool):
            raise DataError(
                f"{where()}: field '{field}' holds {str(value).lower()}, not text. "
                f"Set text_field to fields that hold strings."
            )
        elif isinstance(value, int | float):
            _numbers_as_text[0] += 1
            out.append(str(value))
        else:
            kind = {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
            raise DataError(
                f"{where()}: field '{field}' holds {kind}, not text. "
                f"Set text_field to fields that hold strings."
            )
    return src.join.join(out)


def _record_text(record: Any, src: SourceConfig, name: str, where: Callable[[], str]) -> str:
    """Text of one JSON record (jsonl line or json element); a prompt_completion or chat example instead
    for those kinds (lorafit/data/examples.py)."""
    if src.kind != "text":
        return from_record(record, src, where)
    fields = src.text_fields
    if not isinstance(record, dict):
        raise DataError(
            f"{where()}: expected a JSON object with field(s) {', '.join(fields)}, "
            f"got {type(record).__name__} {str(record)[:60]!r}. Each record must be an object."
        )
    check_fields(fields, record, where, name, src)
    text = _text([(f, record[f]) for f in fields], src, where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a "\ud800" escape: valid JSON, but no character; the tokenizer would fail on it
        raise DataError(
            f"{where()}: the text holds a lone surrogate {text[e.start]!r} (from a \\u escape), which is not a character. "
            "Fix the escape (a pair like \\ud83d\\ude00 is one character) or remove the record."
        ) from None
    return text


def _json_failure(exc: Exception, where: str) -> DataError:
    """What json.loads raises beyond JSONDecodeError: a number too long to read, nesting too deep."""
    if isinstance(exc, RecursionError):
        return DataError(f"{where}: JSON nested too deeply to read (over {MAX_JSON_DEPTH} levels). A record is a few "
                         "levels deep; fix or remove it.")
    if "digits" in str(exc):
        return DataError(f"{where}: a number has thousands of digits, too long to read. Fix or remove it.")
    return DataError(f"{where}: cannot be read as JSON ({first_line(exc, 200)}). Fix or remove it.")


def _line_of(text: str, pattern: str) -> int | None:
    m = re.search(pattern, text)
    return text.count("\n", 0, m.start()) + 1 if m else None


def _too_deep_line(text: str) -> int | None:
    """The line where JSON nesting first goes beyond MAX_JSON_DEPTH (strings skipped); only run on a failure."""
    depth, in_string, escaped, line = 0, False, False, 1
    for ch in text:
        if ch == "\n":
            line += 1
        elif in_string:
            escaped, in_string = (not escaped and ch == "\\"), in_string and (escaped or ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return line
        elif ch in "]}":
            depth -= 1
    return None


# ---------------------------------------------------------------- one reader per format


def _read_txt(path: Path, src: SourceConfig, name: str) -> list[str]:
    if src.separator:
        return _read_txt_pieces(path, src, name)
    # Split on "\n" only (and drop a "\r" before it): str.splitlines would also split on
    # characters such as \x0c or \u2028 that occur inside real paragraphs.
    return [line.rstrip("\n").removesuffix("\r") for _, line in _lines(path, name)]


def _read_txt_pieces(path: Path, src: SourceConfig, name: str) -> list[str]:
    """The file split on `separator`, streamed in chunks."""
    sep = src.separator.encode("utf-8")
    texts: list[str] = []
    parts: list[bytes] = []  # the current, not yet terminated piece
    keep = len(sep) - 1
    window = b""  # the last `keep` bytes of the current piece: a separator may straddle chunks
    with path.open("rb") as f:
        offset = len(BOM) if f.read(len(BOM)) == BOM else 0  # byte offset of the current piece
        f.seek(offset)
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            seen = window + chunk
            window = seen[max(0, len(seen) - keep) :]
            # Only join when a separator is complete: keeps a huge piece linear, not quadratic.
            if sep not in seen:
                parts.append(chunk)
                continue
            *done, rest = (b"".join(parts) + chunk).split(sep)
            for piece in done:
                texts.append(_decode(piece, path, name, offset))
                offset += len(piece) + len(sep)
            parts, window = [rest], rest[max(0, len(rest) - keep) :]
    # The last piece has no separator after it: in a file cut mid-example it is a fragment.
    if not src.drop_unterminated:
        texts.append(_decode(b"".join(parts), path, name, offset))
    return texts


def _read_jsonl(path: Path, src: SourceConfig, name: str) -> list[str]:
    texts = []
    for lineno, line in _lines(path, name):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"Source '{name}': {path} line {lineno} is not valid JSON: {e.msg} at column "
                f"{e.colno}. Each line of a JSON-lines file must be one JSON object; fix or remove it."
            ) from None
        except (ValueError, RecursionError) as e:
            raise _json_failure(e, f"Source '{name}': {path} line {lineno}") from None
        texts.append(_record_text(record, src, name, lambda: f"Source '{name}': {path} line {lineno}"))
    return texts


def _read_json(path: Path, src: SourceConfig, name: str) -> list[str]:
    raw = path.read_bytes()
    start = len(BOM) if raw.startswith(BOM) else 0
    text = _decode(raw[start:], path, name, start)
    try:
        root = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (it looks like JSON lines: set format: jsonl)" if "Extra data" in e.msg else ""
        raise DataError(
            f"Source '{name}': {path} is not valid JSON: {e.msg} at line {e.lineno} column "
            f"{e.colno}{hint}. Fix the file, or set data.sources.{name}.format to match it."
        ) from None
    except (ValueError, RecursionError) as e:
        line = _too_deep_line(text) if isinstance(e, RecursionError) else _line_of(text, r"\d{4000,}")
        raise _json_failure(e, f"Source '{name}': {path}{f' line {line}' if line else ''}") from None
    records = _records(root, src.records_path, path, name, inherit=src.kind != "text")
    where = f"records_path '{src.records_path}'" if src.records_path else "the top-level list"
    return [
        _record_text(r, src, name, lambda i=i: f"Source '{name}': {path} record {i} of {where}")
        for i, r in enumerate(records, 1)
    ]


def _records(root: Any, records_path: str | None, path: Path, name: str, inherit: bool = False) -> list:
    """The records `records_path` points at: "a.b[].c[]" walks keys, "[]" means each element.

    With `inherit` (prompt_completion and chat sources), each object along the path is given, in place, the
    fields of the object around it that it lacks, so that a SQuAD question (`data[].paragraphs[].qas[]`)
    sees its paragraph's `context`."""
    if not records_path:
        if isinstance(root, list):
            return root
        what = f"a JSON object (keys: {', '.join(map(str, root))})" if isinstance(root, dict) else "a scalar"
        raise DataError(
            f"Source '{name}': {path} holds {what}, not a list of records. "
            f"Set data.sources.{name}.records_path to where the records are, e.g. \"data\" or "
            f"\"data[].paragraphs[]\"."
        )
    nodes = [root]
    for part in records_path.split("."):
        key, each = (part[:-2], True) if part.endswith("[]") else (part, False)
        found = []
        for node in nodes:
            if key:
                if not isinstance(node, dict) or key not in node:
                    kind = f"a {type(node).__name__}"
                    there = ", ".join(map(str, node)) if isinstance(node, dict) else kind
                    raise DataError(
                        f"Source '{name}': records_path '{records_path}' does not resolve in {path}: "
                        f"no key '{key}' at component '{part}'; what is there: {there}. "
                        f"Fix data.sources.{name}.records_path."
                    )
                outer = {k: v for k, v in node.items() if k != key} if inherit else {}
                node = node[key]
                for child in (node if isinstance(node, list) else [node]) if outer else ():
                    if isinstance(child, dict):
                        for k, v in outer.items():
                            child.setdefault(k, v)
            if each and not isinstance(node, list):
                raise DataError(
                    f"Source '{name}': records_path '{records_path}' in {path}: component '{part}' "
                    f"holds a {type(node).__name__}, not a list. Drop the '[]' from that component."
                )
            found.extend(node if each else [node])
        nodes = found
    # A path that ends at a list (e.g. "data") means its elements are the records.
    return [r for node in nodes for r in (node if isinstance(node, list) else [node])]


def _read_csv(path: Path, src: SourceConfig, name: str) -> list[str]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # real files hold fields of many MB
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # csv.reader pulls further lines itself for quoted fields that span lines.
    reader = csv.reader((line for _, line in _lines(path, name)), delimiter=delimiter)
    where = lambda: f"Source '{name}': {path} row ending at line {reader.line_num}"  # noqa: E731
    texts: list[str] = []
    cols: list[int] = []
    width = 0
    try:
        for row in reader:
            if not row:  # blank line
                continue
            if not width:
                width = len(row)
                if src.kind != "text":  # fields by name (the header) or index, read per row as a record
                    header = row if src.csv_header else [str(i) for i in range(width)]
                    if src.csv_header:
                        continue
                else:
                    cols = _csv_columns(row, src, path, name)
                    if src.csv_header:
                        continue
            if len(row) != width:
                raise DataError(
                    f"{where()} has {len(row)} fields but the first row has {width}. "
                    f"Fix that row (quote fields that contain '{delimiter}' or newlines)."
                )
            if src.kind != "text":
                texts.append(from_record(dict(zip(header, row)), src, where))
                continue
            texts.append(src.join.join(row[c] for c in cols))  # csv values are always strings
    except csv.Error as e:
        raise DataError(f"{where()} is not valid CSV: {e}. Fix that row.") from None
    return texts


def _csv_columns(first: list[str], src: SourceConfig, path: Path, name: str) -> list[int]:
    """Indices of the text fields: names looked up in the header, or given directly."""
    fields = src.text_fields
    if src.csv_header:
        check_fields(fields, first, lambda: f"Source '{name}': {path}", name, src, noun="column",
                     hint=" (or csv_header: false if the first row is data)")
        return [first.index(f) for f in fields]
    cols = []
    for f in fields:
        if not f.isdigit():
            raise DataError(
                f"Source '{name}': {path} is read with csv_header: false, so text_field entries "
                f"must be 0-based column indices, got '{f}'. Use indices, or set csv_header: true."
            )
        if int(f) >= len(first):
            raise DataError(
                f"Source '{name}': text_field index {int(f)} is out of range: {path} has "
                f"{len(first)} columns (indices 0-{len(first) - 1}). Fix data.sources.{name}.text_field."
            )
        cols.append(int(f))
    return cols


def _read_parquet(path: Path, src: SourceConfig, name: str) -> list[str]:
    # start-up: pyarrow (a few tenths of a second) loads only for a Parquet source
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"Source '{name}': {path} is not a readable parquet file ({e}). "
            f"Check the file, or set data.sources.{name}.format to its real format."
        ) from None
    fields = src.text_fields
    columns = pf.schema_arrow.names
    if src.kind != "text":
        return _read_parquet_examples(pf, columns, path, src, name)
    check_fields(fields, columns, lambda: f"Source '{name}': {path}", name, src, noun="column")
    texts: list[str] = []
    for cols in _parquet_columns(pf, fields, path, name):
        for values in zip(*cols):
            row = len(texts) + 1
            texts.append(_text(list(zip(fields, values)), src, lambda: f"Source '{name}': {path} row {row}"))
    return texts


def _parquet_columns(pf, fields: list[str], path: Path, name: str) -> Iterator[list[list]]:
    """Each batch's columns as Python lists, streamed (one row-group slice at a time). A page that does not
    decompress or decode, and a string column holding bytes that are not UTF-8, become a DataError naming the
    file and the rows (pyarrow names neither)."""
    import pyarrow as pa  # start-up: as in _read_parquet

    first = 1  # the batch's first row, 1-based
    batches = pf.iter_batches(columns=fields)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            cols = [batch.column(f).to_pylist() for f in fields]
        except UnicodeDecodeError as e:
            raise _parquet_not_utf8(batch, fields, first, path, name, e) from None
        except (pa.ArrowException, OSError) as e:
            raise DataError(
                f"Source '{name}': {path} is damaged: the rows from {first:,} on cannot be read ({str(e).strip()[:200]}). "
                f"Write the file again from its source."
            ) from None
        yield cols
        first += batch.num_rows


def _parquet_not_utf8(batch, fields: list[str], first: int, path: Path, name: str, err: UnicodeDecodeError) -> DataError:
    """Which row and column hold bytes that are not UTF-8 (looked for only once decoding failed)."""
    for field in fields:
        column = batch.column(field)
        for i in range(len(column)):
            try:
                column[i].as_py()
            except UnicodeDecodeError as e:
                return DataError(
                    f"Source '{name}': {path} row {first + i:,}, column '{field}', is not valid UTF-8 ({e.reason}, "
                    f"byte 0x{e.object[e.start]:02x}). Write the column as UTF-8 text (if it is Latin-1, decode it "
                    "from latin-1 first)."
                )
    return DataError(f"Source '{name}': {path} rows from {first:,} on are not valid UTF-8 ({err.reason}). "
                     "Write the text columns as UTF-8.")


def _read_parquet_examples(pf, columns: list[str], path: Path, src: SourceConfig, name: str) -> list:
    """prompt_completion / chat examples from a parquet file: each row a record of the columns the fields need."""
    needed = columns_needed(src, columns)
    check_fields(needed, columns, lambda: f"Source '{name}': {path}", name, src, noun="column")
    examples: list = []
    for cols in _parquet_columns(pf, needed, path, name):
        for record in (dict(zip(needed, values)) for values in zip(*cols)):
            row = len(examples) + 1
            examples.append(from_record(record, src, lambda: f"Source '{name}': {path} row {row}"))
    return examples


READERS: dict[str, Callable[[Path, Any, str], list[str]]] = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
}
