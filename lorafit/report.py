"""What a run shows a person: loss curves, per-source bars, the model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lorafit.comparison import compare, fmt, stderr_cell
from lorafit.config import RunConfig
from lorafit.data.templates import describe_source


def _pyplot():
    """matplotlib's pyplot, drawing into files (the Agg backend: no display needed)."""
    # start-up: matplotlib (a few tenths of a second) loads only when a run draws its plots, not for every command
    # that reads or writes a model card (`lorafit eval`)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: as matplotlib above

    return plt


def plot_losses(metrics: list[dict], path: Path) -> None:
    plt = _pyplot()

    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r and r.get("loss") is not None]
    # a preference run: the objective's validation loss, like its training loss (the chosen NLL is in the card)
    val = [(r["step"], (r.get("val_preference") or {}).get("loss", r["val_loss"])) for r in metrics
           if r.get("val_loss") is not None]
    accuracy = [(r["step"], r["rewards/accuracies"]) for r in metrics if r.get("rewards/accuracies") is not None]
    held_out = [(r["step"], r["val_preference"]["accuracy"]) for r in metrics if r.get("val_preference")]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if accuracy or held_out:  # a preference run: its accuracies on a second axis
        acc = ax.twinx()
        if accuracy:
            acc.plot(*zip(*accuracy), label="training preference accuracy", color="tab:green", linewidth=1.0, alpha=0.7)
        if held_out:
            acc.plot(*zip(*held_out), "s--", label="validation preference accuracy", color="tab:red", linewidth=1.2)
        acc.set_ylim(0, 1.05)
        acc.set_ylabel("preference accuracy")
        acc.legend(loc="lower right")
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange", linewidth=1.5)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax.set_title("lorafit: loss per scored token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_by_source(before: dict, after: dict, path: Path) -> None:
    """Bars of each source's validation loss before and after training, plus the token-weighted
    overall loss; each pair is labelled with the loss after training and its change."""
    plt = _pyplot()

    def loss(metrics: dict, name: str) -> float:
        value = (metrics.get(name) or {}).get("val_loss")
        return float("nan") if value is None else float(value)

    def overall(metrics: dict) -> float:  # token-weighted, as the overall val_loss is
        pairs = [(loss(metrics, n), (metrics.get(n) or {}).get("tokens") or 0) for n in after]
        tokens = sum(t for v, t in pairs if np.isfinite(v))
        return sum(v * t for v, t in pairs if np.isfinite(v)) / tokens if tokens else float("nan")

    names = list(after)
    labels = [f"{n}\n{(after[n] or {}).get('tokens') or 0:,} tok" for n in names] + ["all sources\n(token-weighted)"]
    after_v = np.array([loss(after, n) for n in names] + [overall(after)])
    before_v = np.array([loss(before, n) for n in names] + [overall(before)]) if before else None
    x = np.arange(len(labels), dtype=float)
    x[-1] += 0.5  # set the overall pair apart
    width = 0.4 if before_v is not None else 0.6
    fig, ax = plt.subplots(figsize=(max(6.5, 1.15 * len(labels) + 2), 4.6), dpi=120)
    if before_v is not None:
        ax.bar(x - width / 2, before_v, width, label="before training", color="tab:gray")
        ax.bar(x + width / 2, after_v, width, label="after training", color="tab:orange")
    else:
        ax.bar(x, after_v, width, label="after training", color="tab:orange")
    top = np.nanmax(np.concatenate([after_v, before_v if before_v is not None else []])) if np.isfinite(after_v).any() else 1.0
    for i in range(len(labels)):
        if not np.isfinite(after_v[i]):
            continue
        text = f"{after_v[i]:.3f}"
        if before_v is not None and np.isfinite(before_v[i]):
            text += f"\n({after_v[i] - before_v[i]:+.3f})"
        ax.text(x[i] + (width / 2 if before_v is not None else 0), after_v[i] + 0.01 * top, text,
                ha="center", va="bottom", fontsize=7.5)
    ax.set_ylim(0, top * 1.28)  # room for the labels and the legend above the bars
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title("Validation loss by source (lower is better)" + ("; labels: after training, and the change" if before_v is not None else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cell(text: str) -> str:
    """A markdown table cell: a '|' would end the cell, even inside backticks."""
    return str(text).replace("|", "\\|")


def _text_label(src) -> str:
    """What a source's examples are, as its kind has them: a text's field(s) (or a text file's lines or pieces);
    a prompt_completion or chat source's fields, template and what is scored."""
    about = describe_source(src)
    fields = lambda v: " + ".join(f"`{f}`" for f in ([v] if isinstance(v, str) else v))  # noqa: E731
    if about["kind"] == "text":
        return about["text"] if "text" in about else fields(about["text_field"])
    if about["kind"] == "preference":
        given = (f"labelled {fields(about['pair_by_label']['text_field'])} by `{about['pair_by_label']['field']}`, "
                 f"{about['pair_by_label']['chosen']} over {about['pair_by_label']['rejected']}" if "pair_by_label" in about
                 else f"{fields(about['prompt_field'])} -> {fields(about['chosen_field'])} over "
                      f"{fields(about['rejected_field'])}")
    else:
        given = fields(about["messages_field"]) if about["kind"] == "chat" else \
            f"{fields(about['prompt_field'])} -> {fields(about['completion_field'])}"
    return f"{about['kind']}: {given}, template {about['template']}, scored: {about['scored']}"


def _targets(asked: str | list[str], resolved: list[str] | None) -> str:
    """The modules LoRA wraps, and the choice that named them when it was `auto` or `all-linear`."""
    names = ", ".join(f"`{t}`" for t in (resolved or ([asked] if isinstance(asked, str) else asked)))
    return f"{names} (lora.targets={asked})" if isinstance(asked, str) and resolved else names


def read_evaluations(eval_dir: Path) -> dict:
    """The latest `lorafit eval --data/--tasks` results in RUN/eval/ (absent files are skipped)."""
    found = {}
    for key, name in (("forgetting", "forgetting.json"), ("lm_eval_base", "lm_eval_base.json"),
                      ("lm_eval_adapter", "lm_eval_adapter.json"), ("exports", "exports.json")):
        path = Path(eval_dir) / name
        if path.is_file():
            try:
                found[key] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                pass  # a damaged file leaves its section out; the next evaluation rewrites it
    return found


def evaluation_section(evaluations: dict) -> str:
    """'Did it forget?': base vs base + adapter on other text (lorafit's evaluator) and on lm-eval tasks."""
    parts = []
    forgetting = evaluations.get("forgetting")
    if forgetting and forgetting.get("data"):
        rows = []
        for source, r in forgetting["data"].items():
            for key, label in (("loss", "loss"), ("ppl", "perplexity"), ("bits_per_byte", "bits/byte")):
                b, a, d = (r[side].get(key) for side in ("base", "adapter", "difference"))
                if None not in (b, a, d):
                    rows.append(f"| {_cell(f'`{source}`')} | {label} | {fmt(b)} | {fmt(a)} | {fmt(d, '+.4f')} |")
        parts.append(
            f"Scored with lorafit's evaluator ({forgetting.get('date', '')}; at most {forgetting.get('seq_len')} tokens an "
            "example, EOS appended; lower is better):\n\n| data | metric | base | adapter | difference |\n|---|---|---|---|---|\n"
            + "\n".join(rows)
        )
    base, adapter = evaluations.get("lm_eval_base"), evaluations.get("lm_eval_adapter")
    if base and adapter:
        config = adapter.get("config") or {}
        shots = ", ".join(f"{t} {n}-shot" for t, n in (adapter.get("n-shot") or {}).items())
        limit = f", limit {config['limit']:g} a task" if config.get("limit") else ""
        rows = [f"| {_cell(r['task'])} | {_cell(r['metric'])} | {fmt(r['base'])} | {fmt(r['adapter'])} | "
                f"{fmt(r['difference'], '+.4f')} | {stderr_cell(r)} |" for r in compare(base, adapter)]
        parts.append(
            f"lm-evaluation-harness {adapter.get('lm_eval_version', '')} ({shots}{limit}), "
            "the adapter loaded with `peft=`:\n\n| task | metric | base | adapter | difference | stderr (base / adapter) |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows)
        )
    if not parts:
        return ""
    return "\n## Did it forget? (base vs base + adapter)\n" + "\n\n".join(parts) + "\n"


PREFERENCE_ROWS = (("loss", "objective loss", ".4f"), ("accuracy", "preference accuracy", ".3f"),
                   ("margin", "mean reward margin", ".4f"), ("chosen_logp", "chosen log-probability (mean)", ".2f"),
                   ("rejected_logp", "rejected log-probability (mean)", ".2f"),
                   ("chosen_nll", "chosen NLL (nats/token)", ".4f"), ("chosen_bits_per_byte", "chosen bits per byte", ".4f"))


def preference_section(cfg: RunConfig, summary: dict) -> str:
    """A preference run's held-out pairs before and after training (summary.json's val_preference); the
    validation table above is then of the chosen responses."""
    after, before = summary.get("val_preference"), summary.get("val_before_training") or {}
    if not after:
        return ""
    cell = lambda d, k, fmt: format(d[k], fmt) if isinstance(d.get(k), int | float) else "n/a"  # noqa: E731
    rows = "\n".join(f"| {label} | {cell(before, k, fmt)} | {cell(after, k, fmt)} |" for k, label, fmt in PREFERENCE_ROWS)
    reference = "the base (adapter off)" if cfg.model.adapter is None else f"the adapter `{cfg.model.adapter}`"
    return (f"## Preference ({cfg.train.objective}, {after['pairs']:,} held-out pairs; reference: {reference})\n"
            f"| metric | before training | after |\n|---|---|---|\n{rows}\n")


def _split_line(cfg: RunConfig, summary: dict) -> str:
    """Training and validation counts: how many were held out, and how many of them were evaluated."""
    held, evaluated = summary.get("val_held_out"), summary.get("val_examples", 0)
    line = f"{summary.get('train_examples', 0):,} training examples; "
    if held is not None and held != evaluated:
        return line + (f"{held:,} held out for validation ({cfg.data.val_fraction:.0%}, seed {cfg.data.split_seed}), "
                       f"{evaluated:,} of them evaluated (eval.max_examples={cfg.eval.max_examples})")
    return line + f"{evaluated:,} validation examples (held out {cfg.data.val_fraction:.0%}, seed {cfg.data.split_seed})"


def _scored_line(cfg: RunConfig) -> str:
    if all(s.kind == "text" or s.train_on == "all" for s in cfg.data.sources.values()):
        return "real target tokens"
    return "scored target tokens (a prompt_completion or chat source's prompt is context, not scored: see the table)"


def _speed_line(summary: dict) -> str:
    """Scored tokens/s, and the tokens processed when they differ (a prompt is computed but not scored)."""
    scored, processed = summary.get("train_tokens_per_second"), summary.get("train_processed_tokens_per_second")
    if not isinstance(scored, int | float):
        return "n/a tokens/s"
    if isinstance(processed, int | float) and round(processed) != round(scored):
        return f"{processed:,.0f} tokens/s processed, {scored:,.0f} of them scored"
    return f"{scored:,.0f} tokens/s (every processed token scored)"


def exports_section(exports: dict | None) -> str:
    """The files `lorafit export` wrote (eval/exports.json), each with its sha256."""
    files = (exports or {}).get("files") or []
    if not files:
        return ""
    rows = "\n".join(f"| {_cell('`' + Path(f['path']).name + '`')} | {_cell(f['kind'])} | {f.get('quant') or ''} | "
                     f"{f['bytes']:,} | `{f['sha256']}` |" for f in files)
    return ("\n## Exported files\nWritten by `lorafit export` (llama.cpp's converter; see the README's \"Run it in "
            "llama.cpp / Ollama\"):\n\n| file | what | type | bytes | sha256 |\n|---|---|---|---|---|\n" + rows + "\n")


def model_card(cfg: RunConfig, summary: dict, evaluations: dict | None = None) -> str:
    lo = cfg.lora
    weighted = any(s.weight != 1.0 for s in cfg.data.sources.values())
    sources = "\n".join(
        f"| {_cell(name)} | {_cell(f'`{s.path}`')}{f' ({s.config})' if s.config else ''} | {_cell(_text_label(s))} | {f'{s.max_examples:,}' if s.max_examples else 'all'} |"
        + (f" {s.weight:g} |" if weighted else "")
        for name, s in cfg.data.sources.items()
    )

    def f(key: str, fmt: str = ".4f") -> str:
        v = summary.get(key)
        return format(v, fmt) if isinstance(v, int | float) else "n/a"

    by_source = summary.get("val_by_source") or {}
    source_rows = "\n".join(
        f"| {n} | {m['val_loss']:.4f} | {m['val_ppl']:.2f} | {m['val_bits_per_byte']:.4f} | {m['tokens']:,} |"
        for n, m in by_source.items()
        if m.get("val_loss") is not None
    )
    return f"""---
library_name: peft
base_model: {cfg.model.name}
tags: [lora, lorafit]
---

# LoRA adapter for `{cfg.model.name}`

Trained with lorafit, recipe `{cfg.recipe or 'custom'}`.

## LoRA settings
r = {lo.r}, alpha = {lo.alpha:g}, dropout = {lo.dropout:g}, bias = {lo.bias}, targets = {_targets(lo.targets, summary.get('lora_targets'))}
({summary.get('trainable_params', 0):,} trainable of {summary.get('total_params', 0):,} parameters).

## Data
| source | path | text | cap |{" weight |" if weighted else ""}
|---|---|---|---|{"---|" if weighted else ""}
{sources}

{_split_line(cfg, summary)}; at most {cfg.data.seq_len} tokens an
example ({cfg.data.long_examples} beyond), EOS appended. Loss is the mean over {_scored_line(cfg)}
(padding is never computed or scored).

## Training
{summary.get('optimizer_steps', 0):,} optimizer steps, {cfg.train.batch_size * cfg.train.grad_accum} examples each,
lr {cfg.train.lr:g} ({cfg.train.schedule}, warm-up {cfg.train.warmup_steps}), weight decay {cfg.train.weight_decay:g},
seed {cfg.train.seed}; {f('train_seconds', '.1f')} s on {summary.get('device', '?')}, {_speed_line(summary)}.

## Results (validation)
| metric | value |
|---|---|
| loss (nats/token) | {f('val_loss')} |
| perplexity | {f('val_ppl', '.3f')} |
| bits per token | {f('val_bits_per_token')} |
| bits per byte | {f('val_bits_per_byte')} |
| final training loss | {f('final_train_loss')} |

{"| source | loss | PPL | bits/byte | tokens |" + chr(10) + "|---|---|---|---|---|" + chr(10) + source_rows if len(by_source) > 1 else ""}
{preference_section(cfg, summary)}
{evaluation_section(evaluations or {})}{exports_section((evaluations or {}).get("exports"))}
## Use
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained("{cfg.model.name}")
model = PeftModel.from_pretrained(base, "path/to/this/run/adapter")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/run/adapter")
```
or `lorafit generate path/to/this/run "Your prompt" --compare-base`.
"""
