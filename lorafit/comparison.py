"""Base vs base + adapter: the rows of lm-eval's results compared, and how a figure is written in a table.

Shared by the terminal tables (`lorafit eval --data/--tasks`: forgetting, lm_eval_bridge) and the model card
(report), so each writes the same figures the same way.
"""

from __future__ import annotations

NOT_METRICS = ("alias", "name", "sample_len", "samples")  # keys of a task's lm-eval results that are no metric


def metric_values(results: dict, task: str) -> dict[str, tuple[float | None, float | None]]:
    """{metric: (value, stderr)} of one task in lm-eval's results; a filter other than `none` stays in the name."""
    out = {}
    for key, value in results.get("results", {}).get(task, {}).items():
        if key in NOT_METRICS or "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        stderr = results["results"][task].get(f"{metric}_stderr,{filt}")
        out[metric if filt == "none" else key] = (_number(value), _number(stderr))
    return out


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def compare(base: dict, adapter: dict) -> list[dict]:
    """One row per task and metric: base, adapter, difference (adapter - base) and both standard errors."""
    rows = []
    for task in adapter.get("results", {}):
        higher = adapter.get("higher_is_better", {}).get(task, {})
        b_values = metric_values(base, task)
        for metric, (a, a_err) in metric_values(adapter, task).items():
            b, b_err = b_values.get(metric, (None, None))
            rows.append({
                "task": task, "metric": metric, "base": b, "adapter": a,
                "difference": a - b if a is not None and b is not None else None,
                "base_stderr": b_err, "adapter_stderr": a_err,
                "higher_is_better": higher.get(metric.split(",")[0]),
            })
    return rows


def fmt(value: float | None, spec: str = ".4f") -> str:
    """4 decimals; large figures (word perplexities of a weak model) with 1, and thousands separated."""
    if value is None:
        return "n/a"
    return format(value, spec.replace(".4f", ",.1f")) if abs(value) >= 1000 else format(value, spec)


def stderr_cell(row: dict) -> str:
    """The standard errors lm-eval gives, base / adapter (n/a where it gives none, as for perplexities)."""
    b, a = row["base_stderr"], row["adapter_stderr"]
    if b is None and a is None:
        return "n/a"
    return f"{fmt(b)} / {fmt(a)}"
