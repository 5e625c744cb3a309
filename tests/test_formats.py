"""Reading texts from local files: every format and option, every error, and the real samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafit.config import SourceConfig
from lorafit.data import formats
from lorafit.data.formats import read_local_texts
from lorafit.errors import DataError

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mixture-samples"


def src(**kw) -> SourceConfig:
    drop = kw.pop("drop_unterminated", None)
    cfg = SourceConfig(path="unused", **kw)
    if drop is not None:  # the field may be newer than this test
        setattr(cfg, "drop_unterminated", drop)
    return cfg


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_bytes(content.encode("utf-8"))
    return p


def read(path: Path, **kw) -> list[str]:
    return read_local_texts(path, src(**kw), "demo")


def error(path: Path, **kw) -> str:
    with pytest.raises(DataError) as e:
        read(path, **kw)
    return str(e.value)


# ---------------------------------------------------------------- formats and options


def test_txt_lines(tmp_path):
    p = write(tmp_path, "a.txt", "first line\n\n  second\r\nlast without newline")
    assert read(p) == ["first line", "", "  second", "last without newline"]


def test_txt_lines_keep_form_feed_and_unicode_separators(tmp_path):
    p = write(tmp_path, "a.txt", "one\x0cstill one\u2028same\ntwo\n")
    assert read(p) == ["one\x0cstill one\u2028same", "two"]


def test_txt_ignores_text_field(tmp_path):
    p = write(tmp_path, "a.txt", "x\ny\n")
    assert read(p, text_field=["nope", "nada"]) == ["x", "y"]


def test_txt_separator(tmp_path):
    p = write(tmp_path, "s.txt", "story one<|e|>\nstory two<|e|>\ncut sto")
    assert read(p, separator="<|e|>") == ["story one", "\nstory two", "\ncut sto"]
    assert read(p, separator="<|e|>", drop_unterminated=False) == ["story one", "\nstory two", "\ncut sto"]
    assert read(p, separator="<|e|>", drop_unterminated=True) == ["story one", "\nstory two"]


def test_txt_separator_at_end(tmp_path):
    p = write(tmp_path, "s.txt", "a##b##")
    assert read(p, separator="##") == ["a", "b", ""]
    assert read(p, separator="##", drop_unterminated=True) == ["a", "b"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 13, 64])
def test_txt_separator_across_chunks(tmp_path, monkeypatch, chunk):
    # Tiny chunks: separators straddle chunk boundaries, and pieces span many chunks.
    monkeypatch.setattr(formats, "CHUNK_BYTES", chunk)
    stories = ["é" * 7, "short", "", "a much longer story " * 5, "ünïcode ✓"]
    p = write(tmp_path, "s.txt", b"\xef\xbb\xbf" + "<|endoftext|>".join(stories).encode())
    assert read(p, separator="<|endoftext|>") == stories
    assert read(p, separator="<|endoftext|>", drop_unterminated=True) == stories[:-1]


def test_txt_cut_mid_character_dropped(tmp_path):
    # A file cut at a byte limit may end inside a UTF-8 character; that tail is dropped unread.
    p = write(tmp_path, "s.txt", b"one||two||thr\xc3")
    assert read(p, separator="||", drop_unterminated=True) == ["one", "two"]


def test_jsonl(tmp_path):
    lines = [{"text": "a", "n": 1}, {"text": ""}, {"text": "c\nd"}]
    body = "\n".join(json.dumps(r) for r in lines[:2]) + "\n\n   \n" + json.dumps(lines[2]) + "\n"
    p = write(tmp_path, "d.jsonl", body)
    assert read(p) == ["a", "", "c\nd"]


def test_ndjson_extension(tmp_path):
    p = write(tmp_path, "d.ndjson", '{"text": "x"}\n')
    assert read(p) == ["x"]


def test_field_values_none_and_numbers(tmp_path):
    p = write(tmp_path, "d.jsonl", '{"a": null, "b": 3}\n{"a": 2.5, "b": "s"}\n')
    assert read(p, text_field=["a", "b"], join="|") == ["|3", "2.5|s"]


def test_json_list(tmp_path):
    p = write(tmp_path, "d.json", json.dumps([{"text": "one"}, {"text": "two"}]))
    assert read(p) == ["one", "two"]


def test_json_records_path_nested(tmp_path):
    squad = {
        "version": "1.1",
        "data": [
            {"title": "A", "paragraphs": [{"context": "a1", "qas": []}, {"context": "a2", "qas": []}]},
            {"title": "B", "paragraphs": [{"context": "b1", "qas": []}]},
        ],
    }
    p = write(tmp_path, "squad.json", json.dumps(squad))
    assert read(p, records_path="data[].paragraphs[]", text_field="context") == ["a1", "a2", "b1"]
    assert read(p, records_path="data", text_field="title") == ["A", "B"]
    assert read(p, records_path="data[]", text_field="title") == ["A", "B"]


def test_json_records_path_dotted_keys(tmp_path):
    p = write(tmp_path, "d.json", json.dumps({"result": {"rows": [{"t": "x"}, {"t": "y"}]}}))
    assert read(p, records_path="result.rows", text_field="t") == ["x", "y"]


def test_csv_header_by_name(tmp_path):
    body = 'id,title,body\n1,"Hello, world","line one\nline two"\n2,Plain,"say ""hi"""\n'
    p = write(tmp_path, "d.csv", body)
    assert read(p, text_field="body") == ["line one\nline two", 'say "hi"']
    both = read(p, text_field=["title", "body"], join=" - ")
    assert both == ["Hello, world - line one\nline two", 'Plain - say "hi"']


def test_csv_no_header_by_index(tmp_path):
    p = write(tmp_path, "d.csv", '"3","Title A","Desc A"\r\n"4","Title, B","Desc B"\r\n')
    assert read(p, csv_header=False, text_field=[1, 2], join="\n") == ["Title A\nDesc A", "Title, B\nDesc B"]
    assert read(p, csv_header=False, text_field=["2"]) == ["Desc A", "Desc B"]


def test_csv_crlf_and_blank_lines(tmp_path):
    p = write(tmp_path, "d.csv", "label,sentence\r\n1,good\r\n\r\n0,bad\r\n")
    assert read(p, text_field="sentence") == ["good", "bad"]


def test_csv_huge_field(tmp_path):
    big = "x" * 300_000  # past the csv module's default 131,072-character field limit
    p = write(tmp_path, "d.csv", f'text\n"{big}"\n')
    assert read(p) == [big]


def test_tsv(tmp_path):
    p = write(tmp_path, "d.tsv", "label\ttext\n1\thas, commas\n0\tplain\n")
    assert read(p) == ["has, commas", "plain"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "d.parquet"
    table = pa.table({"title": ["t1", "t2", None], "text": ["x", "", "z"], "n": [1, 2, 3]})
    pq.write_table(table, p, row_group_size=2)
    assert read(p) == ["x", "", "z"]
    assert read(p, text_field=["title", "text", "n"], join="/") == ["t1/x/1", "t2//2", "/z/3"]


def test_explicit_format_overrides_extension(tmp_path):
    p = write(tmp_path, "data.dat", '{"text": "x"}\n')
    assert read(p, format="jsonl") == ["x"]
    q = write(tmp_path, "articles.source", "one\ntwo\n")
    assert read(q, format="txt") == ["one", "two"]


def test_utf8_bom_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    assert read(write(tmp_path, "a.txt", bom + "héllo\nx\n".encode())) == ["héllo", "x"]
    assert read(write(tmp_path, "b.txt", bom + b"a|b"), separator="|") == ["a", "b"]
    assert read(write(tmp_path, "c.jsonl", bom + b'{"text": "j"}\n')) == ["j"]
    assert read(write(tmp_path, "d.json", bom + b'[{"text": "k"}]')) == ["k"]
    assert read(write(tmp_path, "e.csv", bom + b"text,other\nc,1\n")) == ["c"]


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    msg = error(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in msg and "not found" in msg and "data.sources.demo.path" in msg


def test_directory(tmp_path):
    d = tmp_path / "folder.txt"
    d.mkdir()
    msg = error(d)
    assert "folder.txt" in msg and "is a directory" in msg


@pytest.mark.parametrize("name", ["e.txt", "e.jsonl", "e.json", "e.csv", "e.parquet"])
def test_empty_file(tmp_path, name):
    msg = error(write(tmp_path, name, b""))
    assert name in msg and "0 bytes" in msg


@pytest.mark.parametrize(
    ("name", "body", "kw"),
    [
        ("blank.jsonl", "\n  \n\n", {}),
        ("list.json", "[]", {}),
        ("header_only.csv", "text,label\n", {}),
        ("nested.json", '{"data": []}', {"records_path": "data[].paragraphs[]"}),
    ],
)
def test_no_records(tmp_path, name, body, kw):
    msg = error(write(tmp_path, name, body), **kw)
    assert name in msg and "no records" in msg


def test_unknown_extension(tmp_path):
    msg = error(write(tmp_path, "data.xml", "<a/>"))
    assert "data.xml" in msg and "data.sources.demo.format" in msg and "jsonl" in msg and "parquet" in msg


def test_hub_format_rejected(tmp_path):
    msg = error(write(tmp_path, "a.txt", "x\n"), format="hub")
    assert "a.txt" in msg and "'hub'" in msg


def test_binary_file(tmp_path):
    msg = error(write(tmp_path, "blob.txt", b"ok\x00\x01\x02"))
    assert "blob.txt" in msg and "binary" in msg and "offset 2" in msg


def test_utf16_file(tmp_path):
    msg = error(write(tmp_path, "u16.jsonl", '{"text": "x"}\n'.encode("utf-16")))
    assert "u16.jsonl" in msg and "NUL" in msg and "UTF-8" in msg


@pytest.mark.parametrize(
    ("name", "kw"),
    [("l.txt", {}), ("l.jsonl", {}), ("l.csv", {}), ("s.txt", {"separator": "\n"})],
)
def test_not_utf8_line_and_offset(tmp_path, name, kw):
    body = b"text\nb\ncaf\xe9\n"
    if name.endswith(".jsonl"):
        body = b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n'
    msg = error(write(tmp_path, name, body), **kw)
    offset = body.index(b"\xe9")
    assert name in msg and "not valid UTF-8" in msg and f"offset {offset}" in msg and "line 3" in msg


def test_not_utf8_json(tmp_path):
    msg = error(write(tmp_path, "bad.json", b'[\n{"text": "a"},\n{"text": "\xff"}\n]'))
    assert "bad.json" in msg and "line 3" in msg and "not valid UTF-8" in msg


def test_malformed_jsonl_line(tmp_path):
    p = write(tmp_path, "bad.jsonl", '{"text": "a"}\n\n{"text": "b",}\n')
    msg = error(p)
    assert "bad.jsonl" in msg and "line 3" in msg and "not valid JSON" in msg and "column" in msg


def test_jsonl_line_not_an_object(tmp_path):
    msg = error(write(tmp_path, "arr.jsonl", '{"text": "a"}\n["text"]\n'))
    assert "arr.jsonl" in msg and "line 2" in msg and "object" in msg


def test_malformed_json(tmp_path):
    msg = error(write(tmp_path, "bad.json", '[{"text": "a"},\n {"text": }]'))
    assert "bad.json" in msg and "line 2" in msg and "not valid JSON" in msg


def test_json_lines_read_as_json(tmp_path):
    msg = error(write(tmp_path, "rows.json", '{"text": "a"}\n{"text": "b"}\n'))
    assert "rows.json" in msg and "format: jsonl" in msg


def test_jsonl_missing_field(tmp_path):
    p = write(tmp_path, "q.jsonl", '{"quote": "a", "author": "x"}\n{"quote": "b", "author": "y"}\n')
    msg = error(p, text_field="text")
    assert "q.jsonl" in msg and "line 1" in msg and "'text'" in msg and "quote, author" in msg


def test_jsonl_field_missing_in_later_record(tmp_path):
    p = write(tmp_path, "q.jsonl", '{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n')
    msg = error(p)
    assert "q.jsonl" in msg and "line 3" in msg and "'text'" in msg and "body" in msg


def test_json_missing_field(tmp_path):
    p = write(tmp_path, "d.json", json.dumps([{"text": "a"}, {"body": "b", "id": 2}]))
    msg = error(p)
    assert "d.json" in msg and "record 2" in msg and "'text'" in msg and "body, id" in msg


def test_field_holds_list(tmp_path):
    p = write(tmp_path, "q.jsonl", '{"quote": "a", "tags": ["x", "y"]}\n')
    msg = error(p, text_field=["quote", "tags"])
    assert "q.jsonl" in msg and "line 1" in msg and "field 'tags' holds a list, not text" in msg


def test_field_holds_object(tmp_path):
    p = write(tmp_path, "d.json", json.dumps([{"text": {"en": "hi"}}]))
    msg = error(p)
    assert "d.json" in msg and "record 1" in msg and "field 'text' holds an object, not text" in msg


def test_json_object_without_records_path(tmp_path):
    msg = error(write(tmp_path, "squad.json", json.dumps({"version": "1.1", "data": []})))
    assert "squad.json" in msg and "records_path" in msg and "version, data" in msg


def test_records_path_does_not_resolve(tmp_path):
    p = write(tmp_path, "squad.json", json.dumps({"data": [{"title": "A", "paragraphs": []}]}))
    msg = error(p, records_path="data[].paragraph[]", text_field="context")
    assert "squad.json" in msg and "'paragraph'" in msg and "title, paragraphs" in msg


def test_records_path_each_on_non_list(tmp_path):
    p = write(tmp_path, "d.json", json.dumps({"meta": {"a": 1}}))
    msg = error(p, records_path="meta[]")
    assert "d.json" in msg and "'meta[]'" in msg and "not a list" in msg


def test_csv_missing_column(tmp_path):
    msg = error(write(tmp_path, "y.csv", "label,sentence\n1,good\n"), text_field="text")
    assert "y.csv" in msg and "'text'" in msg and "label, sentence" in msg


def test_csv_index_out_of_range(tmp_path):
    msg = error(write(tmp_path, "ag.csv", '"3","t","d"\n'), csv_header=False, text_field=[1, 5])
    assert "ag.csv" in msg and "index 5" in msg and "3 columns" in msg


def test_csv_name_without_header(tmp_path):
    msg = error(write(tmp_path, "ag.csv", '"3","t","d"\n'), csv_header=False, text_field="title")
    assert "ag.csv" in msg and "'title'" in msg and "indices" in msg


def test_csv_ragged_row(tmp_path):
    msg = error(write(tmp_path, "r.csv", "a,text\n1,x\n2,y,extra\n3,z\n"))
    assert "r.csv" in msg and "line 3" in msg and "3 fields" in msg and "2" in msg


def test_parquet_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"title": ["a"], "body": ["b"]}), p)
    msg = error(p)
    assert "d.parquet" in msg and "'text'" in msg and "title, body" in msg and "data.sources.demo.text_field" in msg
    # the same check for the other kinds names the keys that name their fields
    msg = error(p, kind="prompt_completion")
    assert "no column 'prompt'" in msg and "title, body" in msg and "data.sources.demo.prompt_field / completion_field" in msg
    msg = error(p, kind="chat")
    assert "no column 'messages'" in msg and "data.sources.demo.messages_field" in msg


def test_parquet_not_parquet(tmp_path):
    msg = error(write(tmp_path, "fake.parquet", "text\nhello\n"))
    assert "fake.parquet" in msg and "parquet" in msg


# ---------------------------------------------------------------- real samples


REAL = [
    ("wikitext/wiki.test.txt", {}, 2891),
    ("tinystories/tinystories_sample.txt", {"separator": "<|endoftext|>", "drop_unterminated": True}, 2316),
    ("ag_news/test.csv", {"csv_header": False, "text_field": [1, 2]}, 7600),
    ("yelp_review_full/yelp_test.csv", {"text_field": "sentence"}, 2000),
    ("cnn_dailymail/test.source", {"format": "txt"}, 100),
    ("xsum/test.jsonl", {"text_field": "document"}, 1000),
    ("squad/dev-v1.1.json", {"records_path": "data[].paragraphs[]", "text_field": "context"}, 913),
    ("imdb/imdb_sample.csv", {"text_field": "review"}, 499),
]


def sample(rel: str) -> Path:
    p = SAMPLES / rel
    if not p.is_file():
        pytest.skip(f"../shared/data/mixture-samples not found: {p}")
    return p


@pytest.mark.parametrize(("rel", "kw", "expected"), REAL, ids=[r[0].split("/")[0] for r in REAL])
def test_real_sample_counts(rel, kw, expected):
    texts = read(sample(rel), **kw)
    assert sum(1 for t in texts if t.strip()) == expected


def test_real_tinystories_cut_tail_kept_without_drop():
    texts = read(sample("tinystories/tinystories_sample.txt"), separator="<|endoftext|>")
    assert sum(1 for t in texts if t.strip()) == 2317
    assert texts[0].startswith("One day, a little girl named Lily")


def test_real_ag_news_joins_title_and_description():
    texts = read(sample("ag_news/test.csv"), csv_header=False, text_field=[1, 2])
    assert texts[0].startswith("Fears for T N pension after talks\nUnions representing workers")


def test_real_squad_paragraph_text():
    texts = read(sample("squad/dev-v1.1.json"), records_path="data[].paragraphs[]", text_field="context")
    assert "Super Bowl 50" in texts[0]


# ---------------------------------------------------------------- issue 21 item 12: files that are not data files


def test_a_fifo_or_device_is_not_a_regular_file_not_an_empty_one(tmp_path):
    import os

    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    assert "stream.jsonl is a FIFO (named pipe), not a regular file" in error(fifo)  # and does not wait for a writer
    assert "/dev/zero is a character device, not a regular file" in error(Path("/dev/zero"), format="txt")


def test_a_proc_file_is_a_pseudo_file_not_an_empty_one(tmp_path):
    proc = Path("/proc/self/status")
    if not proc.is_file():
        pytest.skip("no /proc here")
    message = error(proc, format="txt")
    assert "is a pseudo-file" in message and "is empty" not in message


def _parquet_with(tmp_path, name, values, kind="string"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.array(values, pa.binary()).view(pa.string()) if kind == "bytes-as-string" else pa.array(values)
    pq.write_table(pa.table({"quote": column}), tmp_path / name, row_group_size=2)
    return tmp_path / name


@pytest.mark.parametrize("kind", ["text", "prompt_completion"])
def test_a_parquet_string_column_with_latin1_bytes_names_row_and_column(tmp_path, kind):
    path = _parquet_with(tmp_path, "latin1.parquet", [b"fine", b"good", b"ok", b"caf\xe9"], "bytes-as-string")
    kw = {"text_field": "quote"} if kind == "text" else {"kind": kind, "prompt_field": "quote", "completion_field": "quote"}
    message = error(path, **kw)
    assert "latin1.parquet row 4, column 'quote', is not valid UTF-8" in message and "byte 0xe9" in message


def test_a_damaged_parquet_page_names_the_file(tmp_path):
    path = _parquet_with(tmp_path, "damaged.parquet", [f"text number {i} " * 20 for i in range(2000)])
    raw = bytearray(path.read_bytes())
    for k in range(200, 3000):  # inside the first data pages: snappy no longer decompresses them
        raw[k] ^= 0x5A
    path.write_bytes(bytes(raw))
    message = error(path, text_field="quote")
    assert "damaged.parquet is damaged: the rows from 1 on cannot be read" in message and "Write the file again" in message
