"""What a run shows a person: loss curves, per-source bars, the model card."""

from __future__ import annotations

from pathlib import Path

from lorafit.config import RunConfig


def plot_losses(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in metrics if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax.set_title("lorafit: loss per scored token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_by_source(before: dict, after: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(after)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4.2), dpi=120)
    if before:
        ax.bar(x - 0.2, [before.get(n, {}).get("val_loss", np.nan) for n in names], 0.4, label="before training")
    ax.bar(x + (0.2 if before else 0), [after[n]["val_loss"] for n in names], 0.4, label="after training")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title("Validation loss by source")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(cfg: RunConfig, summary: dict) -> str:
    lo = cfg.lora
    sources = "\n".join(
        f"| {name} | `{s.path}` | {s.text_field} | {s.max_examples or 'all'} |" for name, s in cfg.data.sources.items()
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

Trained with [lorafit](https://github.com/) recipe `{cfg.recipe or 'custom'}`.

## LoRA settings
r = {lo.r}, alpha = {lo.alpha:g}, dropout = {lo.dropout:g}, bias = {lo.bias}, targets = {', '.join(lo.targets)}
({summary.get('trainable_params', 0):,} trainable of {summary.get('total_params', 0):,} parameters).

## Data
| source | path | text field | cap |
|---|---|---|---|
{sources}

{summary.get('train_examples', 0):,} training and {summary.get('val_examples', 0):,} validation examples
(held out {cfg.data.val_fraction:.0%}, seed {cfg.data.split_seed}); at most {cfg.data.seq_len} tokens an
example ({cfg.data.long_examples} beyond), EOS appended. Loss is the mean over real target tokens
(padding is never computed or scored).

## Training
{summary.get('optimizer_steps', 0):,} optimizer steps, {cfg.train.batch_size * cfg.train.grad_accum} examples each,
lr {cfg.train.lr:g} ({cfg.train.schedule}, warm-up {cfg.train.warmup_steps}), weight decay {cfg.train.weight_decay:g},
seed {cfg.train.seed}; {f('train_seconds', '.1f')} s, {f('train_tokens_per_second', ',.0f')} tokens/s on {summary.get('device', '?')}.

## Results (validation)
| metric | value |
|---|---|
| loss (nats/token) | {f('val_loss')} |
| perplexity | {f('val_ppl', '.3f')} |
| bits per token | {f('val_bits_per_token')} |
| bits per byte | {f('val_bits_per_byte')} |
| final training loss | {f('final_train_loss')} |

{"| source | loss | PPL | bits/byte | tokens |" + chr(10) + "|---|---|---|---|---|" + chr(10) + source_rows if len(by_source) > 1 else ""}

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
