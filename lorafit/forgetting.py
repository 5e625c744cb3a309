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
import sys
from datetime import datetime, timezone
from pathlib import Path

from lorafit.errors import DataError, LorafitError
from lorafit.rundir import check_output_path, note_written

EVAL_DIR = "eval"
FORGETTING_FILE = "forgetting.json"
METRICS = (("loss", "loss (nats/token)"), ("ppl", "perplexity"), ("bits_per_token", "bits/token"),
           ("bits_per_byte", "bits/byte"))
DATA_ONLY = ("text_field", "max_examples")
TASKS_ONLY = ("limit", "num_fewshot", "batch_size", "include_path")


def wants_comparison(args) -> bool:
    """True when `lorafit eval` was given --data or --tasks; their sub-options alone are an error."""
    for names, main, example in ((DATA_ONLY, "data", "--data FILE --text-field text"),
                                 (TASKS_ONLY, "tasks", "--tasks hellaswag --limit 100")):
        stray = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]
        if stray and getattr(args, main, None) is None:
            verb = "applies" if len(stray) == 1 else "apply"
            raise LorafitError(f"{', '.join(stray)} only {verb} with --{main}, e.g. lorafit eval RUN {example}.")
    return getattr(args, "data", None) is not None or getattr(args, "tasks", None) is not None


def run_config(run: Path, recipe: str | None, overrides: list[str]):
    """The run's recorded config (or a recipe's, or the defaults for a bare adapter), with overrides."""
    import yaml

    from lorafit.config import apply_overrides, build_config, read_recipe
    from lorafit.errors import ConfigError
    from lorafit.rundir import CONFIG_FILE

    path = run / CONFIG_FILE
    if path.is_file():
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    elif recipe:
        raw, name = read_recipe(recipe)
        raw.setdefault("recipe", name)
    else:
        raw = {}  # a plain adapter directory: lorafit's defaults (seq_len 64, truncate), overridable
        print(f"note: '{run}' has no {CONFIG_FILE}; using lorafit's defaults (data.seq_len=64, "
              "data.long_examples=truncate). Override them, or pass --recipe.", file=sys.stderr)
    problems: list[str] = []
    raw = apply_overrides(raw, overrides, problems)
    cfg = build_config(raw)
    if problems:
        raise ConfigError(problems)
    return cfg


def eval_command(args) -> int:
    """`lorafit eval RUN --data ... / --tasks ...`: compare, print, write eval/*.json, refresh the card."""
    from lorafit.generate import resolve_adapter_dir
    from lorafit.rundir import to_json

    run = Path(args.run)
    adapter_dir = resolve_adapter_dir(run)
    check_output_path(run, f"the evaluation results ({EVAL_DIR}/)", replaces=False)  # RUN/eval/ is written
    cfg = run_config(run, args.recipe, args.overrides)
    plan = None
    if args.tasks is not None:  # flags, the extra and the task names are checked before anything runs
        from lorafit.lm_eval_bridge import plan_tasks

        plan = plan_tasks(args.tasks, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                          include_path=args.include_path)
    result: dict = {}
    try:
        if args.data:
            result.update(compare_on_data(run, adapter_dir, cfg, args.data, args.text_field, args.max_examples, args.base,
                                          trust_remote_code=args.trust_remote_code, force_base=args.force_base))
        if plan is not None:
            from lorafit.lm_eval_bridge import compare_on_tasks

            tasks = compare_on_tasks(run, adapter_dir, plan, base=args.base, trust_remote_code=args.trust_remote_code,
                                     force_base=args.force_base)
            result.update({k: v for k, v in tasks.items() if k not in result})  # one run, base and adapter: said once
    finally:
        if (run / EVAL_DIR).is_dir():
            refresh_model_card(run)  # whatever is in eval/, also when a later part failed
    print(json.dumps(json.loads(to_json(result)), indent=2))
    return 0


# ---------------------------------------------------------------- --data


def source_config(source: str, text_field: str | None, max_examples: int | None):
    """The SourceConfig the flags describe: lorafit's one reader does the rest."""
    from lorafit.config import SourceConfig

    if max_examples is not None and max_examples < 1:
        raise LorafitError(f"--max-examples {max_examples}: give a positive number of examples.")
    return SourceConfig(path=source, text_field=text_field or "text", max_examples=max_examples)


def read_texts(source: str, src, seed: int, cache_dir: Path) -> list[str]:
    """The texts of one --data source; the reader's hints name the flags instead of config keys."""
    from lorafit.data.sources import read_source

    try:
        return read_source(source, src, None, seed, cache_dir)
    except LorafitError as exc:
        message = str(exc).replace(" (relative paths are resolved against data.root)", "")
        for key, flag in (("path", "--data"), ("text_field", "--text-field"), ("max_examples", "--max-examples")):
            message = message.replace(f"data.sources.{source}.{key}=", f"{flag} ").replace(f"data.sources.{source}.{key}", flag)
        message = message.replace("Set text_field", "Set --text-field")
        raise (DataError if isinstance(exc, DataError) else LorafitError)(message) from None


def compare_on_data(run: Path, adapter_dir: Path, cfg, sources: list[str], text_field: str | None,
                    max_examples: int | None, base: str | None, *, trust_remote_code: bool = False,
                    force_base: bool = False) -> dict:
    """Loss, perplexity and bits of base and base + adapter on every source; written to eval/forgetting.json."""
    from lorafit.data.tokenize import default_cache_dir, tokenize_cached
    from lorafit.evaluate import evaluate_run, saved_scoring
    from lorafit.generate import load_for_inference

    duplicates = sorted({s for s in sources if sources.count(s) > 1})
    if duplicates:
        raise LorafitError(f"--data {duplicates[0]} is given more than once; give each source once.")
    d = cfg.data
    cache = Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir()
    configs = {s: source_config(s, text_field, max_examples) for s in sources}
    texts = {s: read_texts(s, configs[s], d.split_seed, cache) for s in sources}  # bad data fails before any model loads

    model, tokenizer, base_name = load_for_inference(adapter_dir, base=base, precision=cfg.model.precision,
                                                     trust_remote_code=trust_remote_code, force_base=force_base)
    scoring = saved_scoring(run, cfg, model, tokenizer, base=base)
    data = {}
    for source in sources:
        split, _ = tokenize_cached(texts[source], [0] * len(texts[source]), tokenizer, d.seq_len, d.long_examples, cache)
        if len(split) == 0:
            raise DataError(f"--data {source}: no example is left after tokenisation (data.long_examples={d.long_examples}).")
        tuned = evaluate_run(model, split, [source], scoring)
        with model.disable_adapter():
            plain = evaluate_run(model, split, [source], scoring)
        data[source] = {
            "text_field": configs[source].text_field,
            "max_examples": max_examples,
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
    from rich.console import Console
    from rich.table import Table

    from lorafit.lm_eval_bridge import fmt

    table = Table(title=f"{source}: {row['examples']:,} examples, {row['tokens']:,} tokens (lower is better)")
    for column in ("metric", "base", "adapter", "difference"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, label in METRICS:
        b, a, diff = row["base"][key], row["adapter"][key], row["difference"][key]
        table.add_row(label, fmt(b), fmt(a), fmt(diff, "+.4f"))
    Console(stderr=True).print(table)


# ---------------------------------------------------------------- files and the card


def eval_dir(run: Path) -> Path:
    path = Path(run) / EVAL_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_eval_json(run: Path, name: str, obj: dict) -> Path:
    from lorafit.atomic import atomic_write_text
    from lorafit.rundir import saving, to_json

    path = eval_dir(run) / name
    with saving(f"{path}", "Free space or fix the permissions, then run the evaluation again."):
        atomic_write_text(path, json.dumps(json.loads(to_json(obj)), indent=2) + "\n")
        note_written(run, path)
    return path


def refresh_model_card(run: Path) -> None:
    """Rewrite RUN/README.md with the latest evaluations; only for a finished lorafit run."""
    from lorafit.report import read_evaluations, model_card
    from lorafit.rundir import CONFIG_FILE, MODEL_CARD, SUMMARY_FILE, RunDir, saving

    run = Path(run)
    if not ((run / CONFIG_FILE).is_file() and (run / SUMMARY_FILE).is_file()):
        return  # a bare adapter directory has no card of lorafit's to update
    import yaml

    from lorafit.config import build_config

    cfg = build_config(yaml.safe_load((run / CONFIG_FILE).read_text(encoding="utf-8")) or {})
    summary = json.loads((run / SUMMARY_FILE).read_text(encoding="utf-8"))
    with saving(f"the model card {run / MODEL_CARD}", "Free space or fix the permissions, then run the evaluation again."):
        RunDir(run).write_model_card(model_card(cfg, summary, read_evaluations(run / EVAL_DIR)))
