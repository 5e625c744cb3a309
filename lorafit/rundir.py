"""The run directory and safe file writing.

Layout:  adapter/  config.yaml  metrics.jsonl  summary.json  loss.png  README.md  checkpoints/
Every file and directory is written to a temporary name and renamed into place, so a crash or a
full disk never leaves a half-written file where a complete one was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

from lorafit.errors import LorafitError

ADAPTER_DIR = "adapter"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOSS_PLOT = "loss.png"
SOURCE_PLOT = "eval_by_source.png"
MODEL_CARD = "README.md"
CHECKPOINTS_DIR = "checkpoints"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary directory; on success it replaces `final` in one rename."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(obj) -> str:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None  # JSON has no NaN/inf; null says "not available"
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), default=_json_default, indent=None)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def file(self, name: str) -> Path:
        return self.path / name

    @staticmethod
    def check_new_run(path: Path, resume: bool, overwrite: bool) -> None:
        """Refuse to clobber an existing run unless told to; check it is writable. Changes nothing."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise LorafitError(f"output_dir '{path}' exists and is a file; choose another output_dir.")
        has_content = path.is_dir() and any(path.iterdir())
        if has_content and not (resume or overwrite):
            raise LorafitError(
                f"output_dir '{path}' already holds a run. Add --resume to continue it, --overwrite to "
                "replace it, or choose another output_dir=..."
            )
        probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
        if not os.access(probe, os.W_OK | os.X_OK):
            raise LorafitError(f"output_dir '{path}' is not writable ('{probe}' denies writing); choose another.")

    def create(self, overwrite: bool) -> None:
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    def append_metrics(self, record: dict) -> None:
        with open(self.file(METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(to_json(record) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        path = self.file(METRICS_FILE)
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash is dropped
                records.append(json.loads(line))
        return records

    def truncate_metrics(self, last_step: int) -> None:
        """Drop records past `last_step` (logged after the checkpoint a resume starts from)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= last_step]
        atomic_write_text(self.file(METRICS_FILE), "".join(to_json(r) + "\n" for r in kept))

    def write_json(self, name: str, obj: dict) -> None:
        atomic_write_text(self.file(name), json.dumps(json.loads(to_json(obj)), indent=2) + "\n")
