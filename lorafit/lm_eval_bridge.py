"""lm-evaluation-harness on the base and on base + adapter (`lorafit eval RUN --tasks ...`).

Both sides run through lm-eval's own Hugging Face model (`hf`), the adapter through its PEFT
support (`peft=ADAPTER_DIR`): what is measured is what any user of the adapter gets with
`lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER`. Each side's results are saved
by lm-eval's own writer (EvaluationTracker), its layout unchanged, and renamed into place:
eval/lm_eval_base.json, eval/lm_eval_adapter.json and, per task, the logged samples
eval/lm_eval_{base,adapter}_samples_TASK.jsonl.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lorafit.comparison import compare, fmt, stderr_cell
from lorafit.errors import LorafitError, described, first_line
from lorafit.fingerprint import FINGERPRINT_KEY, base_fingerprint
from lorafit.generate import base_load_config
from lorafit.lora import check_same_base, read_base_record
from lorafit.modeling import default_device, is_network_error, resolve_precision
from lorafit.rundir import eval_dir, note_written, saving

EXTRA_HINT = 'pip install -e ".[lm-eval]"'
SIDES = ("base", "adapter")
OFFLINE_TASKS = (
    "To run offline, define the task locally: --include-path DIR, where DIR holds a task YAML such as\n"
    "  task: my_task\n  dataset_path: json\n  dataset_kwargs: {data_files: {test: /path/to/data.jsonl}}\n"
    "  test_split: test\n  output_type: multiple_choice   # or loglikelihood_rolling, ...\n"
    "(see the README, 'Did it forget?')."
)
def results_file(side: str) -> str:
    return f"lm_eval_{side}.json"


def samples_file(side: str, task: str) -> str:
    return f"lm_eval_{side}_samples_{task}.jsonl"


def import_lm_eval():
    try:
        # optional extra: [lm-eval]
        import lm_eval
        from lm_eval.loggers import EvaluationTracker  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as exc:
        raise LorafitError(
            f"--tasks runs EleutherAI's lm-evaluation-harness, which is not installed ({first_line(exc)}). "
            f"Install it with: {EXTRA_HINT}"
        ) from None
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown the table
    return lm_eval


# ---------------------------------------------------------------- the flags


def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise LorafitError(f"--tasks {spec!r}: name at least one lm-eval task, e.g. --tasks hellaswag,arc_easy.")
    return list(dict.fromkeys(tasks))


def parse_limit(text: str | None) -> int | float | None:
    """lm-eval's --limit: a number of examples per task, or a fraction of each task below 1."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise LorafitError(f"--limit {text}: give a number of examples per task (e.g. 100) or a fraction below 1 (e.g. 0.1).")
    return int(value) if value >= 1 and value == int(value) else value


def parse_batch_size(text: str | None) -> int | str:
    if text is None:
        return 1  # lm-eval's own default
    if text == "auto" or text.startswith("auto:"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise LorafitError(f"--batch-size {text}: give a positive whole number, or auto (lm-eval picks the largest that fits).")


def task_manager(include_path: str | None, tasks: list[str]):
    """lm-eval's TaskManager, knowing the tasks in --include-path; the task names checked (globs expanded)."""
    from lm_eval.tasks import TaskManager  # optional extra: [lm-eval]

    if include_path is not None:
        path = Path(include_path).expanduser()
        if not path.is_dir():
            raise LorafitError(f"--include-path {include_path}: not a directory; give the directory that holds your task YAML files.")
        local = TaskManager(include_path=str(path), include_defaults=False)
        expanded = expand(tasks, local)
        if expanded is not None:  # all local: skip indexing lm-eval's ~200 built-in task folders (seconds)
            return local, expanded
    manager = TaskManager(include_path=str(Path(include_path).expanduser()) if include_path else None)
    expanded = expand(tasks, manager)
    if expanded is None:
        unknown = [t for t in tasks if not known(t, manager)]
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=5)
        raise LorafitError(
            f"--tasks: lm-evaluation-harness has no task '{unknown[0]}'"
            + (f"; did you mean: {', '.join(close)}?" if close else ".")
            + " `lm_eval ls tasks` lists them; a task of your own goes in a YAML file under --include-path DIR."
        )
    return manager, expanded


def known(task: str, manager) -> bool:
    return task in manager.all_tasks or bool(manager.match_tasks([task])) or (
        task.endswith((".yaml", ".yml")) and Path(task).is_file())


def expand(tasks: list[str], manager) -> list[str] | None:
    """Task names with globs (hellaswag*, mmlu_*) expanded as lm-eval's CLI does; None if one is unknown."""
    out: list[str] = []
    for task in tasks:
        if not known(task, manager):
            return None
        out += [task] if task in manager.all_tasks or Path(task).is_file() else manager.match_tasks([task])
    return list(dict.fromkeys(out))


def hf_model_args(m, base_name: str) -> dict:
    """model_args for lm-eval's `hf` model: the base as the run loaded it (`m`, a ModelConfig from the
    run's record: revision, dtype, attention); fp32 on CPU, where half precision is emulated and slow."""

    device = default_device()
    weights = resolve_precision(m.precision, device).weights if device.type == "cuda" else torch.float32
    # use_safetensors: as lorafit loads every model, weights never come from pickles (lorafit's bases have safetensors)
    args = {"pretrained": base_name, "dtype": str(weights).replace("torch.", ""), "use_safetensors": True}
    if m.revision:
        args["revision"] = m.revision
    if m.trust_remote_code:
        args["trust_remote_code"] = True
    if m.attn_implementation and m.attn_implementation != "auto":
        args["attn_implementation"] = m.attn_implementation
    return args


# ---------------------------------------------------------------- running lm-eval


@dataclass
class TaskPlan:
    """What --tasks and its options ask for, checked: lm-eval importable, task names known."""

    lm_eval: object
    manager: object
    tasks: list[str]
    limit: int | float | None
    num_fewshot: int | None
    batch_size: int | str
    include_path: str | None


def plan_tasks(tasks_spec: str, *, limit: str | None, num_fewshot: int | None, batch_size: str | None,
               include_path: str | None) -> TaskPlan:
    lm_eval = import_lm_eval()
    tasks = parse_tasks(tasks_spec)
    limit_value, batch = parse_limit(limit), parse_batch_size(batch_size)
    if num_fewshot is not None and num_fewshot < 0:
        raise LorafitError(f"--num-fewshot {num_fewshot}: give 0 or more examples.")
    manager, tasks = task_manager(include_path, tasks)
    return TaskPlan(lm_eval, manager, tasks, limit_value, num_fewshot, batch, include_path)


def compare_on_tasks(run: Path, adapter_dir: Path, plan: TaskPlan, base: str | None = None, *,
                     trust_remote_code: bool = False, force_base: bool = False) -> dict:
    """The plan's tasks on the base and on base + adapter; lm-eval's files under eval/; the comparison.
    lm-eval loads the models itself: the base's fingerprint is checked here first, as lora.load_adapter would."""
    base_model = base_load_config(adapter_dir, base, trust_remote_code=trust_remote_code)  # as the run recorded it
    base_name = base_model.name
    check_same_base(read_base_record(adapter_dir).get(FINGERPRINT_KEY), base_fingerprint(base_name, None), force_base,
                    lambda why: LorafitError(f"The adapter in '{adapter_dir}' was trained on another base than "
                                             f"'{base_name}': {why}. Pass the adapter's own base (--base), or "
                                             "--force-base to evaluate it on this one anyway."),
                    f"the adapter in '{adapter_dir}'")
    model_args = hf_model_args(base_model, base_name)
    device = str(default_device())
    out_dir = eval_dir(run)
    results = {}
    for side in SIDES:
        args = model_args if side == "base" else {**model_args, "peft": str(Path(adapter_dir).resolve())}
        print(f"lm-eval: {', '.join(plan.tasks)} on the {side} "
              f"({'pretrained=' + base_name if side == 'base' else 'peft=' + args['peft']})", file=sys.stderr, flush=True)
        results[side] = run_side(plan, side, args, out_dir, device)
    rows = compare(results["base"], results["adapter"])
    show_task_table(rows)
    by_task: dict = {}
    for r in rows:
        by_task.setdefault(r["task"], {})[r["metric"]] = {k: v for k, v in r.items() if k not in ("task", "metric")}
    return {
        "run": str(run), "base_model": base_name, "adapter": str(adapter_dir),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lm_eval_version": results["adapter"].get("lm_eval_version"),
        "model_args": model_args, "num_fewshot": plan.num_fewshot, "limit": plan.limit,
        "tasks": by_task,
        "files": sorted(str(p) for p in out_dir.glob("lm_eval_*")),
    }


def run_side(plan: TaskPlan, side: str, model_args: dict, out_dir: Path, device: str) -> dict:
    """One lm-eval run, saved by lm-eval's own EvaluationTracker and renamed into place; its results file."""
    from lm_eval.loggers import EvaluationTracker  # optional extra: [lm-eval]


    # Not atomic_dir: eval/ also holds the other side's and `eval --data`'s results, so lm-eval's files are renamed
    # into it one by one (the results file last: its presence means the side is complete).
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".lm_eval_{side}.tmp-"))
    try:
        tracker = EvaluationTracker(output_path=str(tmp / results_file(side)))
        try:
            res = plan.lm_eval.simple_evaluate(
                model="hf", model_args=model_args, tasks=plan.tasks, task_manager=plan.manager,
                num_fewshot=plan.num_fewshot, limit=plan.limit, batch_size=plan.batch_size, device=device,
                log_samples=True, evaluation_tracker=tracker,
            )
        except Exception as exc:
            explained = explain_failure(exc, plan.tasks, model_args, plan.include_path, is_network_error(exc))
            if explained is exc:
                raise  # not the user's to fix: a bug keeps its traceback
            raise explained from None
        samples = res.pop("samples")
        # As lm-eval's CLI does: the aggregated results, then the logged samples of each task.
        with saving(f"lm-eval's results under {out_dir}", "Free space or fix the permissions, then run again."):
            tracker.save_results_aggregated(results=res, samples=samples)
            for task in res["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
        # lm-eval names its files NAME_DATE.json and samples_TASK_DATE.jsonl; lorafit's names have no date.
        moves = {tmp / f"{Path(results_file(side)).stem}_{tracker.date_id}.json": out_dir / results_file(side)}
        moves.update({tmp / f"samples_{t}_{tracker.date_id}.jsonl": out_dir / samples_file(side, t) for t in res["configs"]})
        if not all(src.is_file() for src in moves):
            raise LorafitError(f"lm-evaluation-harness did not write its results under {out_dir} (see its warnings above); "
                               "free space or fix the permissions, then run again.")
        for src, dst in sorted(moves.items(), key=lambda m: m[1].suffix == ".json"):  # the results file last
            with saving(f"{dst}", "Free space or fix the permissions, then run again."):
                os.replace(src, dst)
                note_written(out_dir.parent, dst)
        keep = {dst.name for dst in moves.values()}
        for old in out_dir.glob(f"lm_eval_{side}_samples_*.jsonl"):  # samples of tasks this run did not have
            if old.name not in keep:
                old.unlink()
        return json.loads((out_dir / results_file(side)).read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def explain_failure(exc: Exception, tasks: list[str], model_args: dict, include_path: str | None, network: bool) -> Exception:
    """A failure of lm-eval as a LorafitError where it is the user's to fix (offline, a task's data); else unchanged."""
    where = {Path(f.f_code.co_filename).parent.name for f, _ in _frames(exc)}
    in_tasks = bool(where & {"tasks", "datasets", "api"}) and "models" not in where
    reason = described(exc)
    if network and not in_tasks:
        return LorafitError(
            f"lm-evaluation-harness could not load the model '{model_args['pretrained']}': not a local directory, and the "
            f"Hugging Face Hub could not provide it ({reason}).\nTo run offline, point lorafit at local files:\n"
            "  --base LOCAL_MODEL_DIR"
        )
    if network:
        return LorafitError(
            f"lm-evaluation-harness could not get the data of task(s) {', '.join(tasks)} from the Hugging Face Hub "
            f"({reason}).\n{OFFLINE_TASKS}"
        )
    if in_tasks:
        return LorafitError(
            f"lm-evaluation-harness could not load task(s) {', '.join(tasks)}"
            f"{f' (from --include-path {include_path})' if include_path else ''}: {reason}. Check the task YAML and "
            "the data files it names."
        )
    return exc


def _frames(exc: BaseException):
    seen = exc
    while seen is not None:
        yield from traceback.walk_tb(seen.__traceback__)
        seen = seen.__cause__ or seen.__context__


# ---------------------------------------------------------------- the comparison


def show_task_table(rows: list[dict]) -> None:
    table = Table(title="lm-evaluation-harness: base vs base + adapter",
                  caption="difference = adapter - base; stderr: base / adapter; ↑/↓: higher/lower is better")
    for column in ("task", "metric", "base", "adapter", "difference", "stderr"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right", no_wrap=column != "task")
    for r in rows:
        arrow = {True: " ↑", False: " ↓"}.get(r["higher_is_better"], "")
        table.add_row(r["task"], r["metric"] + arrow, fmt(r["base"]), fmt(r["adapter"]),
                      fmt(r["difference"], "+.4f"), stderr_cell(r))
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 120  # a log file has no width: room for long task and metric names
    console.print(table)
