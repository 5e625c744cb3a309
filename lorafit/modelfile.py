"""The Ollama Modelfile `lorafit export --ollama` writes: FROM (and ADAPTER), the run's prompt template in
Ollama's template syntax (Go's text/template), and the stop tokens the run trained with."""

from __future__ import annotations

from pathlib import Path

import yaml

from lorafit.config import build_config
from lorafit.data.templates import generation_prompt, resolve_template
from lorafit.errors import LorafitError
from lorafit.rundir import CONFIG_FILE

MODELFILE = "Modelfile"
HEADER = "# Modelfile written by lorafit export"
SLOT = "\x00PROMPT\x00"  # stands for the user's prompt while the run's template renders


def check_modelfile_target(path: Path) -> None:
    if path.exists() and not path.read_text(encoding="utf-8", errors="replace").startswith(HEADER):
        raise LorafitError(f"'{path}' exists and was not written by lorafit export; it is left as it is. Export into "
                           "another directory, or move it away.")


def run_template(run: Path):
    """The template the run's prompt_completion or chat data was rendered with (None: plain text only)."""
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        return None
    cfg = build_config(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    for src in cfg.data.sources.values():
        if src.kind != "text":
            return resolve_template(src.template, src.kind, cfg.data.root)
    return None


def go_literal(text: str) -> str:
    """Text as itself inside a Go template (only "{{" would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(run: Path, tokenizer) -> str:
    """The prompt as training rendered it, with Ollama's {{ .Prompt }} where the prompt goes, then the reply."""
    template = run_template(run)
    if template is None:
        return "{{ .Prompt }}"
    rendered = "".join(generation_prompt(template, tokenizer, SLOT))
    if rendered.count(SLOT) != 1:
        raise LorafitError(f"The run's template {template.name!r} does not place the prompt once; write the "
                           "Modelfile's TEMPLATE by hand.")
    before, after = rendered.split(SLOT)
    return go_literal(before) + "{{ .Prompt }}" + go_literal(after) + "{{ .Response }}"


def quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(run: Path, tokenizer, model: Path, adapter: Path | None, stops: list[str]) -> str:
    template = ollama_template(run, tokenizer)
    if '"""' in template:
        raise LorafitError('The run\'s template holds """, which a Modelfile cannot quote; write its TEMPLATE by hand.')
    lines = [f"{HEADER} from {Path(run).resolve().name}", f"# ollama create NAME -f {MODELFILE}", f"FROM ./{model.name}"]
    if adapter is not None:
        lines.append(f"ADAPTER ./{adapter.name}")
    lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {quoted(s)}" for s in stops]
    return "\n".join(lines) + "\n"
