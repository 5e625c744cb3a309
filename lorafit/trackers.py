"""Experiment trackers (`train.report_to`): the records of metrics.jsonl, and the resolved config, sent on.

Each backend is an optional extra, imported only when a run asks for it; a missing one is refused before any
model loads, naming its `pip install`. Rank 0 alone reports: it is the process that writes metrics.jsonl, and
`RunDir.append_metrics` hands every record it writes to the trackers (`opened`), so a tracker shows exactly
what the file holds.

- tensorboard: event files in RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`)
- wandb: a wandb run (project "lorafit"; offline with WANDB_MODE=offline, synced later by `wandb sync`)
- mlflow: an MLflow run (MLFLOW_TRACKING_URI, else MLflow's local default store)
- trackio: a local trackio project "lorafit" (`trackio show`)
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from pathlib import Path

import yaml

from lorafit.errors import LorafitError
from lorafit.rundir import TRACKER_DIRS

# backend -> (the module it needs, the pip extra that installs it)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
PROJECT = "lorafit"


def check_available(names: list[str]) -> None:
    """Refuse a tracker whose package is not installed (without importing it: this runs before torch loads)."""
    missing = [n for n in names if n in BACKENDS and importlib.util.find_spec(BACKENDS[n][0]) is None]
    if missing:
        installs = " and ".join(f'pip install -e ".[{BACKENDS[n][1]}]"' for n in missing)
        raise LorafitError(f"train.report_to names {', '.join(missing)}, which is not installed: {installs} "
                           f"(or remove it from train.report_to).")


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record, nested ones by path (val_by_source/quotes/val_loss); `step` is the x axis."""
    out = {}
    for key, value in record.items():
        if key == "step" and not prefix:
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class TensorBoard:
    def __init__(self, run_dir: Path, name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter  # optional extra: [tensorboard]
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TRACKER_DIRS[0]))
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        if isinstance(record.get("sample"), str):
            self.writer.add_text("sample", record["sample"], record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Scalars:
    """A backend with a `log(numbers, step=)` call and one call that ends its run (wandb, MLflow, trackio)."""

    def __init__(self, log, finish):
        self._log, self._finish = log, finish

    def log(self, record: dict) -> None:
        self._log(scalars(record), step=record["step"])

    def close(self) -> None:
        self._finish()


def wandb_run(run_dir: Path, name: str, config: dict) -> Scalars:
    import wandb  # optional extra: [wandb]

    run = wandb.init(project=PROJECT, name=name, dir=str(run_dir), config=config)  # writes RUN/wandb/
    return Scalars(run.log, run.finish)


def mlflow_run(run_dir: Path, name: str, config: dict) -> Scalars:
    import mlflow  # optional extra: [mlflow]

    mlflow.set_experiment(PROJECT)
    mlflow.start_run(run_name=name)
    mlflow.log_params({k: v[:500] for k, v in flat_config(config).items()})  # MLflow caps a value's length
    return Scalars(mlflow.log_metrics, mlflow.end_run)


def trackio_run(run_dir: Path, name: str, config: dict) -> Scalars:
    import trackio  # optional extra: [trackio]

    trackio.init(project=PROJECT, name=name, config=config)
    return Scalars(trackio.log, trackio.finish)


FACTORIES = {"tensorboard": TensorBoard, "wandb": wandb_run, "mlflow": mlflow_run, "trackio": trackio_run}


@contextlib.contextmanager
def opened(names: list[str], run, config: dict, factories: dict | None = None):
    """Open each tracker with the resolved config, hand it every record `run.append_metrics` writes while the
    block runs, and close it at the end (also when training stops early)."""
    factories = factories or FACTORIES
    check_available([n for n in names if factories is FACTORIES])
    trackers = []
    try:
        for name in names:
            trackers.append(factories[name](run.path, run.path.name, config))
        for tracker in trackers:
            run.listeners.append(tracker.log)
        yield trackers
    finally:
        for tracker in trackers:
            with contextlib.suppress(ValueError):
                run.listeners.remove(tracker.log)
            tracker.close()
