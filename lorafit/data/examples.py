"""What one example is for each source `kind`, and how it is read from a record (a JSON object, a
CSV row with a header, a parquet or hub row).

    text               a str: every token is scored (the plain language-modelling case)
    prompt_completion  {"prompt": {field: text, ...}, "completion": text}
    chat               {"messages": [{"role": "system" | "user" | "assistant", "content": text}, ...]}
    preference         {"prompt": {field: text, ...}, "chosen": text, "rejected": text}, or conversational
                       (TRL's format): {"messages": [the prompt's turns], "chosen": [turns], "rejected": [turns]}

A pair is one example until it is rendered (templates.render_pair): it is filtered, capped and split
whole, so its two responses always land on the same side of the train/validation split. A pair
whose chosen or rejected response is empty, or whose responses are the same, would train on
nothing (or on noise); it is left out and counted (`pair_problems`), never trained on silently.

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

KINDS = ("text", "prompt_completion", "chat", "preference")
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


def response_fields(src: SourceConfig) -> list[str]:
    """preference: the (chosen, rejected) fields."""
    return [src.chosen_field or "chosen", src.rejected_field or "rejected"]


def record_fields(src: SourceConfig) -> list[str]:
    """Every field (path) an example of this source is read from."""
    if src.kind == "prompt_completion":
        return prompt_fields(src) + completion_fields(src)
    if src.kind == "preference":
        return prompt_fields(src) + response_fields(src)
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
           "chat": f"Fix data.sources.{name}.messages_field to name one of them",
           "preference": f"Fix data.sources.{name}.prompt_field / chosen_field / rejected_field to name fields among them"}.get(
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
    if src.kind == "preference":
        return _pair(record, src, where)
    return {"messages": messages(get_field(record, str(src.messages_field), where), str(src.messages_field), where)}


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) or (isinstance(value, str) and value.lstrip().startswith("[{"))


def _pair(record: Mapping, src: SourceConfig, where: Callable[[], str]) -> dict:
    """A preference pair: plain text (the prompt fields as prompt_completion reads them), or conversational
    when the responses are lists of messages (the prompt then too: its turns, or a text as one user turn)."""
    chosen_f, rejected_f = response_fields(src)
    chosen, rejected = get_field(record, chosen_f, where), get_field(record, rejected_f, where)
    if not (_is_conversation(chosen) or _is_conversation(rejected)):
        prompt = {f: _text(get_field(record, f, where), f, where) for f in prompt_fields(src)}
        return {"prompt": prompt, "chosen": _text(chosen, chosen_f, where), "rejected": _text(rejected, rejected_f, where)}
    field = prompt_fields(src)[0]
    turns = get_field(record, field, where)
    turns = messages(turns, field, where) if _is_conversation(turns) else [{"role": "user", "content": _text(turns, field, where)}]
    return {"messages": turns, "chosen": messages(chosen, chosen_f, where), "rejected": messages(rejected, rejected_f, where)}


def pair_problem(example: Example) -> str | None:
    """Why a preference pair cannot be trained on (None: it can): an empty response, or two equal ones."""
    if not (isinstance(example, dict) and "chosen" in example):
        return None
    chosen, rejected = (_response_text(example[k]) for k in ("chosen", "rejected"))
    if not chosen.strip() or not rejected.strip():
        return "empty_response"
    return "chosen_equals_rejected" if example["chosen"] == example["rejected"] else None


def _response_text(response: str | list) -> str:
    return response if isinstance(response, str) else "".join(m["content"] for m in response)


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
    if "chosen" in example:  # a pair is judged by its preferred response (empty responses: pair_problem)
        return _response_text(example["chosen"])
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
    if isinstance(value, dict) and "chosen" in value:
        return isinstance(value.get("rejected"), str | list) and isinstance(value.get("prompt", value.get("messages")), dict | list)
    if isinstance(value, dict) and "completion" in value:
        return isinstance(value.get("prompt"), dict) and isinstance(value["completion"], str)
    return isinstance(value, dict) and isinstance(value.get("messages"), list)
