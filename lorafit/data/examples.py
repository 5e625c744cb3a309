"""What one example is for each source `kind`, and how it is read from a record (a JSON object, a
CSV row with a header, a parquet or hub row).

    text               a str: every token is scored (the plain language-modelling case)
    prompt_completion  {"prompt": {field: text, ...}, "completion": text}
    chat               {"messages": [{"role": "system" | "user" | "assistant", "content": text}, ...]}

Examples stay plain JSON values so that they can be filtered, deduplicated, capped, split and kept
in the hub-sample cache like texts. Which tokens are scored is decided later, when a template
renders the example (lorafit/data/templates.py), because a chat template belongs to the tokenizer.

Field names may be paths into nested values: `answers.text[0]` (the hub's SQuAD, where `answers`
holds a list of texts) or `answers[0].text` (SQuAD's own JSON). A name that is a key of the record
as it stands is always taken as that key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lorafit.errors import DataError

if TYPE_CHECKING:
    from lorafit.config import SourceConfig

KINDS = ("text", "prompt_completion", "chat")
ROLES = ("system", "user", "assistant")
Example = str | dict
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _as_list(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def prompt_fields(src: SourceConfig) -> list[str]:
    if src.prompt_field is not None:
        return _as_list(src.prompt_field)
    return ["instruction", "input"] if src.template == "alpaca" else ["prompt"]


def completion_fields(src: SourceConfig) -> list[str]:
    if src.completion_field is not None:
        return _as_list(src.completion_field)
    return ["output"] if src.template == "alpaca" else ["completion"]


def record_fields(src: SourceConfig) -> list[str]:
    """Every field (path) an example of this source is read from."""
    if src.kind == "prompt_completion":
        return prompt_fields(src) + completion_fields(src)
    if src.kind == "chat":
        return [str(src.messages_field)]
    return src.text_fields


def columns_needed(src: SourceConfig, columns: list[str]) -> list[str]:
    """The top-level columns (of a parquet file or hub dataset) the fields are read from."""
    out = []
    for f in record_fields(src):
        col = f if f in columns else _path(f)[0]
        if col not in out:
            out.append(col)
    return out


def check_fields(fields: Iterable[str], present: Collection, where: Callable[[], str], name: str, src: SourceConfig,
                 noun: str = "field", hint: str = "") -> None:
    """Refuse a record, file or dataset (`where()` names it: file and line or record, or hub dataset) that lacks
    one of `fields` (among `present`: its keys or columns), naming the field, what is there, and the key to fix."""
    missing = next((f for f in fields if f not in present), None)
    if missing is None:
        return
    fix = {"prompt_completion": f"Fix data.sources.{name}.prompt_field / completion_field to name fields among them",
           "chat": f"Fix data.sources.{name}.messages_field to name one of them"}.get(
        src.kind, f"Set data.sources.{name}.text_field to one of them")
    raise DataError(f"{where()}: no {noun} '{missing}'; its {noun}s are: {', '.join(map(str, present)) or '(none)'}. {fix}{hint}.")


def _path(field: str) -> list[str | int]:
    steps, pos = [], 0
    for m in _STEP.finditer(field):
        steps.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    return steps if steps and pos == len(field) else [field]


def get_field(record: Mapping, field: str, where: Callable[[], str]) -> Any:
    """The value at `field` (a key, or a path like `answers.text[0]`) of a record."""
    if field in record:
        return record[field]
    node: Any = record
    for step in _path(field):
        if isinstance(step, int) and isinstance(node, list) and step < len(node):
            node = node[step]
        elif isinstance(step, str) and isinstance(node, Mapping) and step in node:
            node = node[step]
        else:
            if node is record:
                there = f"this record has fields: {', '.join(map(str, record)) or '(none)'}"
            elif isinstance(node, list):
                there = f"it holds a list of {len(node)}"
            elif isinstance(node, Mapping):
                there = f"its fields are: {', '.join(map(str, node))}"
            else:
                there = f"it holds {type(node).__name__} {str(node)[:40]!r}"
            raise DataError(f"{where()}: no field '{field}' (at '{step}': {there}). Fix the source's field names.")
    return node


def _text(value: Any, field: str, where: Callable[[], str]) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    kind = {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    hint = f" Pick one element, e.g. '{field}[0]'." if isinstance(value, list) else ""
    raise DataError(f"{where()}: field '{field}' holds {kind}, not text.{hint}")


def from_record(record: Any, src: SourceConfig, where: Callable[[], str]) -> dict:
    """One prompt_completion or chat example from a record; errors name the record (`where()`)."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where()}: expected an object with fields {', '.join(record_fields(src))}, "
                        f"got {type(record).__name__} {str(record)[:60]!r}.")
    if src.kind == "prompt_completion":
        prompt = {f: _text(get_field(record, f, where), f, where) for f in prompt_fields(src)}
        completion = src.join.join(_text(get_field(record, f, where), f, where) for f in completion_fields(src))
        return {"prompt": prompt, "completion": completion}
    return {"messages": messages(get_field(record, str(src.messages_field), where), str(src.messages_field), where)}


def messages(value: Any, field: str, where: Callable[[], str]) -> list[dict]:
    """A chat's messages, checked: a list of {role, content} with a known role and text content."""
    if isinstance(value, str):  # a JSON string in a CSV column or a string-typed parquet column
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if not isinstance(value, list):
        raise DataError(f"{where()}: field '{field}' must hold a list of messages ({{role, content}}), "
                        f"got {type(value).__name__}.")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"{where()}: message {i} of '{field}' must be an object with 'role' and 'content', got {str(m)[:60]!r}.")
        if m["role"] not in ROLES:
            raise DataError(f"{where()}: message {i} of '{field}' has the unknown role {m['role']!r}; "
                            f"roles are: {', '.join(ROLES)}. Fix or drop that message.")
        out.append({"role": m["role"], "content": _text(m["content"], f"{field}[{i}].content", where)})
    return out


def scored_text(example: Example, src: SourceConfig) -> str:
    """The text that would be scored: what `min_chars` and the empty-example filter look at."""
    if isinstance(example, str):
        return example
    everything = src.train_on == "all"
    if "completion" in example:
        prompt = src.join.join(example["prompt"].values()) if everything else ""
        return prompt + example["completion"]
    return "".join(m["content"] for m in example["messages"] if everything or m["role"] == "assistant")


def dedupe_key(example: Example) -> str:
    return example if isinstance(example, str) else json.dumps(example, ensure_ascii=False)


def is_example(value: Any) -> bool:
    """A well-formed example as the hub-sample cache stores it."""
    if isinstance(value, str):
        return True
    if isinstance(value, dict) and "completion" in value:
        return isinstance(value.get("prompt"), dict) and isinstance(value["completion"], str)
    return isinstance(value, dict) and isinstance(value.get("messages"), list)
