"""Did the adapter forget? Base and base + adapter side by side.

`lorafit eval RUN --data SOURCE` scores any text (a local file in any format lorafit reads, or a
Hub dataset id) with lorafit's own exact evaluator, once with the adapter and once with it
disabled: the same loaded model, the same tokenisation as training (EOS appended, the run's
seq_len and long-example policy), so the adapter's figure on the run's own validation examples is
the val_loss of summary.json. `--tasks` runs lm-evaluation-harness on both (lm_eval_bridge.py).
Results go to RUN/eval/ and into the model card; summary.json is never touched.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from lorafit.atomic import atomic_write_text
from lorafit.comparison import fmt
from lorafit.config import DataConfig, SourceConfig, build_config, load_yaml, run_config
from lorafit.console import log
from lorafit.data.sources import read_source
from lorafit.data.templates import describe_source, render_examples
from lorafit.data.tokenize import default_cache_dir, tokenize_cached
from lorafit.errors import DataError, LorafitError
from lorafit.evaluate import evaluate_run, saved_scoring
from lorafit.generate import load_for_inference, resolve_adapter_dir
from lorafit.lm_eval_bridge import compare_on_tasks, plan_tasks
from lorafit.report import model_card, read_evaluations
from lorafit.rundir import CONFIG_FILE, EVAL_DIR, MODEL_CARD, SUMMARY_FILE, RunDir, check_output_path, eval_dir, note_written, saving, to_json
from lorafit.modeling import default_device, resolve_precision

FORGETTING_FILE = "forgetting.json"
METRICS = (("loss", "loss (nats/token)"), ("ppl", "perplexity"), ("bits_per_token", "bits/token"),
           ("bits_per_byte", "bits/byte"))


def eval_command(args) -> int:
    """`lorafit eval RUN --data ... / --tasks ...`: compare, print, write eval/*.json, refresh the card."""
    run = Path(args.run)
    adapter_dir = resolve_adapter_dir(run)
    check_output_path(run, f"the evaluation results ({EVAL_DIR}/)", replaces=False)  # RUN/eval/ is written
    cfg = run_config(run, args.recipe, args.overrides)
    plan = None
    if args.tasks is not None:  # flags, the extra and the task names are checked before anything runs
        plan = plan_tasks(args.tasks, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                          include_path=args.include_path)
    result: dict = {}
    try:
        if args.data:
            result.update(compare_on_data(run, adapter_dir, cfg, args.data, args.text_field, args.max_examples, args.base,
                                          trust_remote_code=args.trust_remote_code, force_base=args.force_base))
        if plan is not None:
            tasks = compare_on_tasks(run, adapter_dir, plan, base=args.base, trust_remote_code=args.trust_remote_code,
                                     force_base=args.force_base)
            result.update({k: v for k, v in tasks.items() if k not in result})  # one run, base and adapter: said once
    finally:
        if (run / EVAL_DIR).is_dir():
            refresh_model_card(run)  # whatever is in eval/, also when a later part failed
    print(json.dumps(json.loads(to_json(result)), indent=2))
    return 0


# ---------------------------------------------------------------- --data


FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")  # what may follow the last ':' of --data PATH:FIELD


@dataclass
class EvalSource:
    """One source of `eval --data`: its label in the results, its settings, and the folder its relative paths
    mean (a sources YAML's; None: the current directory). `flags`: given on the command line, so messages name
    the flags rather than config keys."""

    label: str
    config: SourceConfig
    root: str | None = None
    flags: bool = True


def split_field(value: str) -> tuple[str, str | None]:
    """`--data PATH:FIELD` -> (PATH, FIELD). Split on the last ':' only when the whole value is no existing file,
    the part before it is not empty, and the part after it reads as a field name (letters, digits, _ . -): so a
    path holding ':' that exists, a URL (`https://...`) and a Windows drive (`C:\\data.txt`) stay whole."""
    if Path(value).exists() or ":" not in value:
        return value, None
    path, field_name = value.rsplit(":", 1)
    if path and FIELD_NAME.fullmatch(field_name):
        return path, field_name
    return value, None


def eval_sources(values: list[str], text_field: str | None, max_examples: int | None) -> list[EvalSource]:
    """The sources `--data` names: files or Hub ids (each `PATH:FIELD` with its own field; --text-field is the
    field of those without one), or a YAML file of sources written as a recipe's data.sources."""
    if max_examples is not None and max_examples < 1:
        raise LorafitError(f"--max-examples {max_examples}: give a positive number of examples.")
    out: list[EvalSource] = []
    for value in values:
        if value.lower().endswith((".yaml", ".yml")):
            out += sources_file(Path(value), max_examples)
            continue
        path, field_name = split_field(value)
        out.append(EvalSource(value, SourceConfig(path=path, text_field=field_name or text_field or "text",
                                                  max_examples=max_examples)))
    labels = [s.label for s in out]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise LorafitError(f"--data {duplicates[0]} is given more than once; give each source once.")
    return out


def sources_file(path: Path, max_examples: int | None) -> list[EvalSource]:
    """A YAML file of sources in a recipe's format: `{name: {path: ..., text_field: ...}}` (or the same under
    `sources:` or `data: {sources: ...}`); relative paths mean the file's folder. Checked as a recipe's are."""
    if not path.is_file():
        raise LorafitError(f"--data {path}: no such sources file. A YAML file of sources holds "
                           "{name: {path: FILE, text_field: FIELD}}, as a recipe's data.sources.")
    raw = load_yaml(path.read_text(encoding="utf-8"), f"--data {path}") or {}
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        raw = raw["data"]
    if isinstance(raw, dict) and "sources" in raw:
        raw = raw["sources"]
    if not isinstance(raw, dict) or not raw:
        raise LorafitError(f"--data {path}: expected a mapping of sources, {{name: {{path: FILE, text_field: FIELD}}}}.")
    if max_examples is not None:
        for spec in raw.values():
            if isinstance(spec, dict):
                spec.setdefault("max_examples", max_examples)
    cfg = build_config({"data": {"sources": raw, "root": str(path.parent.absolute())}})
    return [EvalSource(name, src, cfg.data.root, flags=False) for name, src in cfg.data.sources.items()]


def read_texts(source: str, src, seed: int, cache_dir: Path, root: str | None = None, flags: bool = True) -> list[str]:
    """The texts of one --data source; the reader's hints name the flags instead of config keys."""
    try:
        return read_source(source, src, root, seed, cache_dir)
    except LorafitError as exc:
        if not flags:  # from a sources file: its keys are the recipe's, as the message says
            raise
        message = str(exc).replace(" (relative paths are resolved against data.root)", "")
        for key, flag in (("path", "--data"), ("text_field", "--text-field"), ("max_examples", "--max-examples")):
            message = message.replace(f"data.sources.{source}.{key}=", f"{flag} ").replace(f"data.sources.{source}.{key}", flag)
        message = message.replace("Set text_field", "Set --text-field")
        raise (DataError if isinstance(exc, DataError) else LorafitError)(message) from None


def compare_on_data(run: Path, adapter_dir: Path, cfg, values: list[str], text_field: str | None,
                    max_examples: int | None, base: str | None, *, trust_remote_code: bool = False,
                    force_base: bool = False) -> dict:
    """Loss, perplexity and bits of base and base + adapter on every source; written to eval/forgetting.json."""

    d = cfg.data
    cache = Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir()
    given = eval_sources(values, text_field, max_examples)
    configs = {s.label: s.config for s in given}
    roots = {s.label: s.root for s in given}
    sources = list(configs)
    # bad data fails before any model loads
    texts = {s.label: read_texts(s.label, s.config, d.split_seed, cache, s.root, s.flags) for s in given}

    log(f"loading the base and the adapter from {adapter_dir} ...")
    precision = resolve_precision(cfg.model.precision, default_device())  # once: the weights' dtype and autocast
    model, tokenizer, base_name = load_for_inference(adapter_dir, base=base, precision=precision,
                                                     trust_remote_code=trust_remote_code, force_base=force_base)
    scoring = saved_scoring(run, cfg, model, tokenizer, precision, base=base)
    data = {}
    for source in sources:
        items = texts[source]
        if configs[source].kind != "text":  # a sources file's prompt_completion or chat source: rendered as in training
            one = DataConfig(sources={source: configs[source]}, root=roots[source])
            items = render_examples(items, [0] * len(items), one, tokenizer)
        split, _ = tokenize_cached(items, [0] * len(items), tokenizer, d.seq_len, d.long_examples, cache)
        if len(split) == 0:
            raise DataError(f"--data {source}: no example is left after tokenisation (data.long_examples={d.long_examples}).")
        tuned = evaluate_run(model, split, [source], scoring, progress=f"{source}: adapter")
        with model.disable_adapter():
            plain = evaluate_run(model, split, [source], scoring, progress=f"{source}: base")
        data[source] = {
            "path": configs[source].path,
            **describe_source(configs[source]),  # only what applied: no text_field for a .txt file
            **({"max_examples": configs[source].max_examples} if configs[source].max_examples else {}),
            "examples": tuned["val_examples"],
            "tokens": tuned["val_tokens"],
            "bytes": tuned["val_bytes"],
            "truncated": int(split.truncated.sum()),
            "base": strip(plain),
            "adapter": strip(tuned),
            "difference": {k: strip(tuned)[k] - strip(plain)[k] for k, _ in METRICS},
        }
        show_data_table(source, data[source])
    del model
    result = {
        "run": str(run), "base_model": base_name, "adapter": str(adapter_dir),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seq_len": d.seq_len, "long_examples": d.long_examples, "data": data,
    }
    write_eval_json(run, FORGETTING_FILE, result)
    return result


def strip(metrics: dict) -> dict:
    """evaluate()'s val_* figures under plain names."""
    return {k: metrics[f"val_{k}"] for k, _ in METRICS}


def show_data_table(source: str, row: dict) -> None:

    table = Table(title=f"{source}: {row['examples']:,} examples, {row['tokens']:,} tokens (lower is better)")
    for column in ("metric", "base", "adapter", "difference"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, label in METRICS:
        b, a, diff = row["base"][key], row["adapter"][key], row["difference"][key]
        table.add_row(label, fmt(b), fmt(a), fmt(diff, "+.4f"))
    Console(stderr=True).print(table)


# ---------------------------------------------------------------- files and the card


def write_eval_json(run: Path, name: str, obj: dict) -> Path:
    path = eval_dir(run) / name
    with saving(f"{path}", "Free space or fix the permissions, then run the evaluation again."):
        atomic_write_text(path, json.dumps(json.loads(to_json(obj)), indent=2) + "\n")
        note_written(run, path)
    return path


def refresh_model_card(run: Path) -> None:
    """Rewrite RUN/README.md with the latest evaluations; only for a finished lorafit run."""
    run = Path(run)
    if not ((run / CONFIG_FILE).is_file() and (run / SUMMARY_FILE).is_file()):
        return  # a bare adapter directory has no card of lorafit's to update
    cfg = build_config(yaml.safe_load((run / CONFIG_FILE).read_text(encoding="utf-8")) or {})
    summary = json.loads((run / SUMMARY_FILE).read_text(encoding="utf-8"))
    with saving(f"the model card {run / MODEL_CARD}", "Free space or fix the permissions, then run the evaluation again."):
        RunDir(run).write_model_card(model_card(cfg, summary, read_evaluations(run / EVAL_DIR)))
