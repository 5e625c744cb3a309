"""The run directory and safe file writing.

Layout:  adapter/  config.yaml  metrics.jsonl  summary.json  loss.png  README.md  checkpoints/
Every file and directory is written to a temporary name and renamed into place, so a crash or a
full disk never leaves a half-written file where a complete one was. Temporaries are named
`.NAME.tmp-PID` (or `.NAME.old-PID` for a directory being replaced) and are removed when a run
is resumed. `summary.json` is written last: its presence means the run finished.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
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
LOCK_FILE = ".lorafit.lock"
TEMP_MARKERS = (".tmp-", ".old-")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path to write a file to; on success it replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")  # keep the suffix: writers choose formats by it
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary directory; on success it replaces `final` by renames."""
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
        if final.exists():  # two renames; a crash between them leaves no `final`, never a mixed one
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


def remove_temporaries(directory: Path) -> None:
    """Delete what an interrupted atomic write left behind in `directory`."""
    if not Path(directory).is_dir():
        return
    for p in Path(directory).iterdir():
        if p.name.startswith(".") and any(m in p.name for m in TEMP_MARKERS):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


@contextlib.contextmanager
def saving(what: str, advice: str):
    """Turn a failed write (disk full, permissions...) into one clear LorafitError."""
    try:
        yield
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = "the disk is full" if full else exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        raise LorafitError(f"Could not write {what}: {reason}{where}. {advice}") from None


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


def _check_writable(path: Path) -> None:
    """Create (and remove) a file where the run will go: the only honest test of writability."""
    probe = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not probe.is_dir():
        raise LorafitError(f"output_dir '{path}' cannot be created: '{probe}' is a file. Choose another output_dir.")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".lorafit-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise LorafitError(
            f"output_dir '{path}' is not writable ('{probe}': {exc.strerror or exc}). Choose another output_dir, "
            "or fix the permissions."
        ) from None


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        # Records in metrics.jsonl, counted as they are kept and appended (a run starts with
        # keep_metrics), so a checkpoint need not re-read the log to know where it stands.
        self.metrics_records = 0

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def file(self, name: str) -> Path:
        return self.path / name

    def is_run(self) -> bool:
        return self.file(CONFIG_FILE).is_file()

    def is_finished(self) -> bool:
        return self.file(SUMMARY_FILE).is_file()

    def check_new_run(self, resume: bool, overwrite: bool) -> None:
        """Refuse to clobber an existing run (or any other directory) unless told to; check writability.
        Changes nothing."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise LorafitError(f"output_dir '{path}' exists and is a file; choose another output_dir.")
        has_content = path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir())
        if has_content and not self.is_run():
            raise LorafitError(
                f"output_dir '{path}' is not empty and holds no lorafit run ({CONFIG_FILE} is missing); lorafit "
                "never writes into or deletes such a directory. Choose a new or empty output_dir."
            )
        if has_content and not (resume or overwrite):
            raise LorafitError(
                f"output_dir '{path}' already holds a run. Add --resume to continue it, --overwrite to "
                "replace it, or choose another output_dir=..."
            )
        _check_writable(path)

    @contextlib.contextmanager
    def claim(self, overwrite: bool):
        """Create the directory (emptied first with `overwrite`) and hold it for this process.

        The lock is an flock: the OS releases it when the process ends, even on SIGKILL.
        """
        import fcntl

        with saving(f"the run directory {self.path}", "Choose another output_dir, or free space."):
            if overwrite and self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / LOCK_FILE, "a")
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LorafitError(
                    f"Another lorafit process is using '{self.path}'. Wait for it to finish (or stop it), then retry."
                ) from None
            remove_temporaries(self.path)
            remove_temporaries(self.checkpoints)
            yield self

    def append_metrics(self, record: dict) -> None:
        with open(self.file(METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(to_json(record) + "\n")
        self.metrics_records += 1

    def read_metrics(self) -> list[dict]:
        path = self.file(METRICS_FILE)
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash is dropped
                records.append(json.loads(line))
        return records

    def keep_metrics(self, n: int) -> None:
        """Keep the first `n` records: those a checkpoint had seen; later ones are redone after a resume."""
        kept = self.read_metrics()[:n]
        atomic_write_text(self.file(METRICS_FILE), "".join(to_json(r) + "\n" for r in kept))
        self.metrics_records = len(kept)

    def write_json(self, name: str, obj: dict) -> None:
        atomic_write_text(self.file(name), json.dumps(json.loads(to_json(obj)), indent=2) + "\n")

    def read_json(self, name: str) -> dict:
        return json.loads(self.file(name).read_text(encoding="utf-8"))
