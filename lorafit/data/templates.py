"""Templates: how a prompt-completion or chat example becomes text, and which of it is scored.

A template renders an example to segments, each (text, scored). Tokenisation encodes every segment
on its own and concatenates the ids, so the prompt/completion boundary falls between tokens and a
prompt is the same tokens at generation (`lorafit generate --template`) as in training.

prompt_completion (the completion follows the rendered prompt; then the EOS):
- `plain` (the default): "{prompt}\\n", where {prompt} is the prompt fields joined with `join`;
- `alpaca`: the Stanford Alpaca prompt, instruction = the first prompt field, input = the second
  (its "### Input:" section left out when empty), then "### Response:\\n";
- a format string, or a file holding one (relative to data.root), over {prompt} and the prompt
  fields by name, e.g. "{context}\\n\\nQuestion: {question}\\nAnswer:" (literal braces: {{ }}).
chat:
- `chat` (the default): the model's own chat template (tokenizer.apply_chat_template) when it has
  one, else `roles`;
- `roles`: one "{role}: {content}\\n" a turn.

preference (a prompt with a chosen and a rejected response): each response is rendered as a
prompt_completion (plain pairs) or chat (conversational pairs) example with that response as its
completion or last assistant turn -- `render_pair` -- so the two sequences share the prompt's tokens
and only the response (and the EOS) is scored, whatever `train_on` says. An SFT run on a preference
source trains on the prompt and its chosen response.

`train_on: completion` scores the completion (chat: each assistant turn's content with what the
template puts after it, e.g. an end-of-turn token) and the EOS; `train_on: all` every token.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafit.data.examples import KINDS, Example, completion_fields, prompt_fields, response_fields
from lorafit.data.paths import resolve_path
from lorafit.errors import DataError, LorafitError
from lorafit.localpaths import path_problem

if TYPE_CHECKING:
    from lorafit.config import DataConfig, SourceConfig

PROMPT_TEMPLATES = ("plain", "alpaca")
CHAT_TEMPLATES = ("chat", "roles")
NAMED = PROMPT_TEMPLATES + CHAT_TEMPLATES
PLAIN = "{prompt}\n"
ALPACA_INTRO = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"
ALPACA = ALPACA_INTRO.format(", paired with an input that provides further context") + (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ALPACA_INTRO.format("") + "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Template:
    name: str  # one of NAMED, or "custom"
    text: str = ""  # custom: the format string

    @property
    def kind(self) -> str:
        return "chat" if self.name in CHAT_TEMPLATES else "prompt_completion"


@dataclass(frozen=True)
class Rendered:
    """An example as text segments, each (text, scored); `eos`: tokenisation appends the (scored) EOS."""

    segments: tuple[tuple[str, bool], ...]
    eos: bool = True


def resolve_template(spec: str | None, kind: str | None = None, root: str | None = None) -> Template:
    """A template by name, format string or file; None: the default for `kind`."""
    if spec is None:
        return Template("chat" if kind == "chat" else "plain")
    if spec in NAMED:
        return Template(spec)
    if "{" in spec:
        return Template("custom", spec)
    path = resolve_path(spec, root)
    why = path_problem(path)
    if why is None:
        try:
            return Template("custom", path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise LorafitError(f"Cannot read the template file {path}: {exc}") from None
    if path.exists():  # there, but nothing to read a template from (a FIFO would block, a directory has no text)
        raise LorafitError(f"template file {path} {why}; give a regular file holding a format string with {{prompt}}.")
    raise LorafitError(
        f"template {spec!r} is none of the named templates ({', '.join(NAMED)}), a file ({path} does not exist), "
        "or a format string such as \"Question: {prompt}\\nAnswer:\"."
    )


def _placeholders(text: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise LorafitError(f"template {text!r} is not a valid format string ({exc}); write literal braces as {{{{ }}}}.") from None


def source_problems(name: str, src: SourceConfig, root: str | None) -> list[str]:
    """Config problems of a source's kind, fields, template and train_on (collected with the rest)."""
    key = f"data.sources.{name}"
    if src.kind not in KINDS:
        return [f"{key}.kind: {src.kind!r} is not one of {', '.join(KINDS)}"]
    problems = []
    if src.train_on not in ("completion", "all"):
        problems.append(f"{key}.train_on: {src.train_on!r} is not one of completion, all")
    if src.kind == "text":
        given = [k for k in ("prompt_field", "completion_field", "template") if getattr(src, k) is not None]
        if given:
            problems.append(f"{key}.{given[0]}: only for prompt_completion or chat sources; set {key}.kind: prompt_completion")
        return problems
    try:
        template = resolve_template(src.template, src.kind, root)
    except LorafitError as exc:
        return problems + [f"{key}.template: {exc}"]
    if src.kind == "preference":  # plain pairs take a prompt template, conversational ones a chat template
        pass
    elif template.kind != src.kind:
        allowed = CHAT_TEMPLATES if src.kind == "chat" else PROMPT_TEMPLATES + ("a format string or file",)
        problems.append(f"{key}.template: {src.template!r} is for {template.kind} sources; {src.kind} takes {', '.join(allowed)}")
    if template.kind == "chat":
        pass
    elif template.name == "alpaca" and len(prompt_fields(src)) > 2:
        problems.append(f"{key}.prompt_field: the alpaca template takes an instruction and an optional input, got {prompt_fields(src)}")
    elif template.name == "custom":
        try:
            used = _placeholders(template.text)
        except LorafitError as exc:
            return problems + [f"{key}.template: {exc}"]
        allowed = ["prompt"] + [f for f in prompt_fields(src) if f.isidentifier()]
        unknown = [u for u in used if u not in allowed]
        if unknown or not used:
            what = f"uses {{{unknown[0]}}}" if unknown else "uses no placeholder, so it would drop the prompt"
            problems.append(f"{key}.template: {what}; it may use {', '.join('{' + a + '}' for a in allowed)} "
                            "(the completion follows the rendered prompt)")
    return problems


# ---------------------------------------------------------------- rendering for training


def render_examples(examples: list[Example], sources: list[int], data: DataConfig, tokenizer) -> list[str | Rendered]:
    """Every example ready for tokenisation: texts as they are, the others rendered by their source's template."""
    cfgs = list(data.sources.values())
    names = list(data.sources)
    templates = {i: resolve_template(c.template, c.kind, data.root) for i, c in enumerate(cfgs) if c.kind != "text"}
    out: list[str | Rendered] = []
    for j, (example, s) in enumerate(zip(examples, sources)):
        if isinstance(example, str):
            out.append(example)
        elif "chosen" in example:  # a pair in an SFT run: the prompt and its chosen response
            out.append(render_pair(example, data.sources[names[s]], tokenizer, data.root,
                                   lambda: f"Source '{names[s]}', example {j}")[0])
        else:
            out.append(render(example, templates[s], cfgs[s], tokenizer, lambda: f"Source '{names[s]}', example {j}"))
    return out


def render_pairs(examples: list[dict], sources: list[int], data: DataConfig, tokenizer) -> tuple[list[Rendered], list[int]]:
    """Every pair as its two sequences, chosen then rejected, back to back (sequence 2i is pair i's chosen,
    2i + 1 its rejected), with the source of each sequence."""
    names = list(data.sources)
    out: list[Rendered] = []
    for j, (example, s) in enumerate(zip(examples, sources)):
        out += render_pair(example, data.sources[names[s]], tokenizer, data.root, lambda: f"Source '{names[s]}', example {j}")
    return out, [s for s in sources for _ in range(2)]


def render_pair(example: dict, src: SourceConfig, tokenizer, root: str | None = None,
                where=lambda: "a pair") -> tuple[Rendered, Rendered]:
    """(chosen, rejected) sequences of a preference pair: the same prompt segment(s), unscored, then the response,
    scored (and the EOS). Plain pairs are rendered as prompt_completion renders them, conversational ones as the
    chat template renders the prompt's turns and then the response's."""
    if "prompt" in example:
        template = resolve_template(src.template, "prompt_completion", root)
        if template.kind == "chat":
            raise DataError(f"{where()}: a plain-text pair cannot take the chat template {src.template!r}; "
                            "give a prompt template (plain, alpaca or a format string).")
        prompt = (prompt_text(template, example["prompt"], src.join), False)
        return tuple(Rendered((prompt, (example[k], True))) for k in ("chosen", "rejected"))
    template = resolve_template(src.template if src.template in CHAT_TEMPLATES else None, "chat", root)
    return tuple(_chat_response(example["messages"], example[k], template, tokenizer, where) for k in ("chosen", "rejected"))


def _chat_response(prompt: list[dict], response: list[dict], template: Template, tokenizer, where) -> Rendered:
    """A conversation's prompt turns (unscored) and its response turns (scored), as the chat template renders them."""
    if template.name == "chat" and getattr(tokenizer, "chat_template", None):
        def apply(msgs: list[dict], generation_prompt: bool) -> str:
            try:
                return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
            except Exception as exc:  # a Jinja template raises what its author chose
                raise DataError(f"{where()}: the model's chat template cannot render it: {exc}. "
                                "Fix the messages, or set the source's template: roles.") from None

        before, full = apply(prompt, True), apply(prompt + response, False)
        if not full.startswith(before):
            raise DataError(f"{where()}: the model's chat template renders the prompt differently once the response "
                            "follows, so the response cannot be told apart. Set the source's template: roles.")
        eos = not (tokenizer.eos_token and full.rstrip().endswith(tokenizer.eos_token))  # the template ends turns itself
        return Rendered(((before, False), (full[len(before):], True)), eos)
    segments = [(f"{m['role']}: {m['content']}\n", False) for m in prompt]
    for m in response:  # the space goes with the content: " word" is one BPE token
        if m["role"] == "assistant":
            segments += [("assistant:", False), (f" {m['content']}\n", True)]
        else:
            segments.append((f"{m['role']}: {m['content']}\n", True))
    return Rendered(tuple(segments))


def render(example: dict, template: Template, src: SourceConfig, tokenizer, where=lambda: "an example") -> Rendered:
    everything = src.train_on == "all"
    if "completion" in example:
        return Rendered(((prompt_text(template, example["prompt"], src.join), everything), (example["completion"], True)))
    messages = example["messages"]
    if template.name == "chat" and getattr(tokenizer, "chat_template", None):
        return _model_chat(messages, tokenizer, everything, where)
    segments = []
    for m in messages:
        if m["role"] == "assistant":  # the space goes with the content: " word" is one BPE token
            segments += [("assistant:", everything), (f" {m['content']}\n", True)]
        else:
            segments.append((f"{m['role']}: {m['content']}\n", everything))
    return Rendered(tuple(segments))


def prompt_text(template: Template, fields: dict[str, str], join: str) -> str:
    values = list(fields.values())
    if template.name == "alpaca":
        instruction, extra = values[0], (values[1] if len(values) > 1 else "")
        return (ALPACA if extra.strip() else ALPACA_NO_INPUT).format(instruction=instruction, input=extra)
    text = PLAIN if template.name == "plain" else template.text
    return text.format_map({**{k: v for k, v in fields.items() if k.isidentifier()}, "prompt": join.join(values)})


def _model_chat(messages: list[dict], tokenizer, everything: bool, where) -> Rendered:
    """The model's chat template, with each assistant turn scored: the text up to a turn is the template
    applied to the turns before it with the generation prompt; the turn is what its own message adds."""
    def apply(msgs: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # a Jinja template raises what its author chose (e.g. roles must alternate)
            raise DataError(f"{where()}: the model's chat template cannot render it: {exc}. "
                            "Fix the messages, or set the source's template: roles.") from None

    full = apply(messages, False)
    eos = not (tokenizer.eos_token and full.rstrip().endswith(tokenizer.eos_token))  # the template ends turns itself
    if everything:
        return Rendered(((full, True),), eos)
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = apply(messages[:i], True) if i else ""
        after = apply(messages[: i + 1], False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(
                f"{where()}: the model's chat template renders earlier turns differently once later turns follow, "
                "so the assistant turns cannot be told apart. Set the source's template: roles, or train_on: all."
            )
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    if not full.startswith(done):
        raise DataError(f"{where()}: the model's chat template does not render the conversation as the sum of its turns; "
                        "set the source's template: roles, or train_on: all.")
    if full[len(done):]:
        segments.append((full[len(done):], False))
    return Rendered(tuple(segments), eos)


# ---------------------------------------------------------------- rendering for generation


def generation_prompt(template: Template, tokenizer, prompt: str) -> list[str]:
    """The segments a prompt becomes, as training rendered the text before a completion (or an assistant
    turn): the prompt fills {prompt} (alpaca: the instruction; chat: one user message)."""
    if template.kind == "chat":
        if template.name == "chat" and getattr(tokenizer, "chat_template", None):
            return [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)]
        return [f"user: {prompt}\n", "assistant:"]
    if template.name == "custom":
        other = [p for p in _placeholders(template.text) if p != "prompt"]
        if other:
            raise LorafitError(f"--template: this template also uses {{{other[0]}}}; generate fills only {{prompt}}. "
                               "Give the whole prompt in a template with {prompt} only.")
    return [prompt_text(template, {"instruction": prompt}, "")]


def describe_source(src: SourceConfig) -> dict:
    """What an example of this source is and which of its tokens are scored: only the settings that apply to its
    kind (summary.json's `sources`, the model card's data table, `lorafit data --show`)."""
    if src.kind == "text":
        if src.format == "txt" or (src.format == "auto" and src.path.lower().endswith(".txt")):
            return {"kind": "text", "text": f"pieces split on {src.separator!r}" if src.separator else "one per line"}
        fields = src.text_fields
        return {"kind": "text", "text_field": fields[0] if len(fields) == 1 else fields}
    template = src.template or ("chat (the model's chat template)" if src.kind == "chat" else "plain")
    if src.kind == "preference":
        about = {"kind": "preference", "prompt_field": prompt_fields(src), "chosen_field": response_fields(src)[0],
                 "rejected_field": response_fields(src)[1], "template": template,
                 "scored": "each response and its EOS (chosen and rejected, one sequence each)"}
        if src.pair_by_label:
            about["pair_by_label"] = dict(src.pair_by_label, text_field=src.text_fields)
        return about
    scored = "every token" if src.train_on == "all" else \
        ("the assistant turns and the EOS" if src.kind == "chat" else "the completion and the EOS")
    if src.kind == "chat":
        return {"kind": "chat", "messages_field": src.messages_field, "template": template, "train_on": src.train_on,
                "scored": scored}
    return {"kind": src.kind, "prompt_field": prompt_fields(src), "completion_field": completion_fields(src),
            "template": template, "train_on": src.train_on, "scored": scored}
