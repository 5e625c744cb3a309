"""The run directory and safe file writing.

Layout:  adapter/  config.yaml  metrics.jsonl  summary.json  loss.png  README.md  checkpoints/
         reference_logps.npz (DPO, IPO: lorafit/reference.py)
         .lorafit-run.json (the marker: lorafit made this directory for a run)  .lorafit.lock (while in use)
Every file and directory is written to a temporary name and renamed into place (lorafit/atomic.py),
so a crash or a full disk never leaves a half-written file where a complete one was. Temporaries
are removed when a run is resumed. `summary.json` is written last: its presence means the run finished.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl  # flock, POSIX only: lorafit runs on Linux and macOS, not on Windows
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lorafit.atomic import atomic_write_text, is_temporary
from lorafit.errors import LorafitError, first_line

ADAPTER_DIR = "adapter"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOSS_PLOT = "loss.png"
SOURCE_PLOT = "eval_by_source.png"
MODEL_CARD = "README.md"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
LOCK_FILE = ".lorafit.lock"
MARKER_FILE = ".lorafit-run.json"  # written when lorafit creates a run directory: only such a directory may be deleted
MANIFEST_FILE = ".lorafit-files.json"  # every file lorafit wrote into the run: all --overwrite may delete
REFERENCE_FILE = "reference_logps.npz"  # DPO, IPO: the reference's log-probabilities, read again on --resume and eval
TRACKER_DIRS = ("tensorboard", "wandb")  # what train.report_to's trackers write into the run (lorafit/trackers.py)
# Everything a run directory may hold; --overwrite refuses a directory holding anything else.
RUN_ENTRIES = frozenset({
    ADAPTER_DIR, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, LOSS_PLOT, SOURCE_PLOT, MODEL_CARD, CHECKPOINTS_DIR, EVAL_DIR,
    REFERENCE_FILE, LOCK_FILE, MARKER_FILE, MANIFEST_FILE, *TRACKER_DIRS,
})
SHOWN_FOREIGN = 10  # --overwrite's refusal names at most this many entries


def remove_temporaries(directory: Path) -> None:
    """Delete what an interrupted atomic write left behind in `directory`."""
    if not Path(directory).is_dir():
        return
    for p in Path(directory).iterdir():
        if is_temporary(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


# Writers in Rust (safetensors, tokenizers) raise their own exception types for a failed write; the
# OS error is only in the message ("No space left on device (os error 28)", "Os { code: 28, ...").
_RUST_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")
# torch.save writes through a C++ stream that reports a failed write as a RuntimeError with no errno at all:
# "basic_ios::clear: iostream error", "PytorchStreamWriter failed writing file ...: file write failed",
# "[enforce fail at inline_container.cc] . unexpected pos 64 vs 0". A full disk is by far the usual cause.
_TORCH_WRITE_FAILURE = re.compile(r"basic_ios::clear|PytorchStreamWriter failed writing|file write failed|"
                                  r"unexpected pos \d+ vs \d+")
TORCH_WRITE_FAILED = "the file could not be written (torch names no cause; most often the disk is full)"


def _write_failure(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write, also when a Rust writer or torch reported it as a plain exception."""
    if isinstance(exc, OSError):
        return exc
    m = _RUST_OS_ERROR.search(str(exc))
    if m is not None:
        code = int(m.group(1) or m.group(2))
        return OSError(code, os.strerror(code))
    if isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(exc)):
        return OSError(None, TORCH_WRITE_FAILED)
    return None


def write_error(exc: BaseException, what: str, advice: str) -> LorafitError | None:
    """The one message for a failed write of `what` (disk full, permissions...), or None when `exc` is no
    failed write (a bug, which keeps its traceback). Every writer's failure comes through here."""
    failure = None if isinstance(exc, LorafitError) else _write_failure(exc)
    if failure is None:
        return None
    full = failure.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "the disk is full" if full else failure.strerror or str(failure)
    where = f" ({failure.filename})" if failure.filename else ""
    return LorafitError(f"Could not write {what}: {reason}{where}. {advice}")


@contextlib.contextmanager
def saving(what: str, advice: str | Callable[[], str]):
    """Turn a failed write (disk full, permissions...) into one clear LorafitError; `advice` may be worked
    out when it is needed (e.g. naming the newest checkpoint at that moment)."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, LorafitError) or _write_failure(exc) is None:
            raise  # not a failed write: a bug keeps its traceback, lorafit's own errors pass as they are
        raise write_error(exc, what, advice() if callable(advice) else advice) from None


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


def forbidden_output_dir(value: str) -> str | None:
    """Why `value` can never be a run directory (None when it may be): lorafit may one day delete it."""
    if not str(value).strip():
        return "it is empty (that would be the current directory)"
    path = Path(value).expanduser()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
        return f"it cannot be resolved ({exc})"
    home, cwd = Path.home().resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the root of the file system"
    if resolved == home or resolved in home.parents:
        return "it is your home directory" if resolved == home else "it holds your home directory"
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current directory" if resolved == cwd else "it holds the current directory"
    return None


def check_output_path(path, what: str, replaces: bool = True) -> Path:
    """Refuse an output of lorafit's (`what`: "the merged model", "the GGUF file", ...) that would land inside
    a file or directory lorafit manages in a run (adapter/, checkpoints/, eval/, ...), since a later --resume
    or --overwrite replaces or deletes those: the output would be lost without a word. `replaces`: the output
    is created or replaced as a whole (merge, export), so a symbolic link there is refused rather than
    replaced. Also refuses what can never be an output directory (forbidden_output_dir). Returns the path."""
    out = Path(path).expanduser()
    why = forbidden_output_dir(str(out))
    if why:
        raise LorafitError(f"'{out}' cannot take {what}: {why}. Choose a new directory.")
    if replaces and out.is_symlink():
        raise LorafitError(
            f"'{out}' is a symbolic link; lorafit does not replace a link with {what} (nor write through it). "
            "Give the directory it points to, or a new path."
        )
    try:
        resolved = out.resolve()
    except (OSError, RuntimeError) as exc:
        raise LorafitError(f"'{out}' cannot take {what}: it cannot be resolved ({exc}).") from None
    for run in resolved.parents:
        if RunDir(run).is_run():
            inside = resolved.relative_to(run).parts[0]
            if inside in RUN_ENTRIES:
                raise LorafitError(
                    f"'{out}' is inside '{run / inside}', which lorafit manages for the run in '{run}' and replaces or "
                    f"deletes on --resume or --overwrite: {what} would be lost there. Choose a path outside the "
                    f"run's {inside}, e.g. '{run.parent / (run.name + '-' + Path(out).name)}'."
                )
    return out


def note_written(run: Path, *paths: Path) -> None:
    """Add files written into a run from outside training (eval/) to its manifest; a directory that is no run
    of lorafit's (a bare adapter directory) keeps none."""
    run_dir = RunDir(run)
    if run_dir.has_marker():
        root = Path(run).resolve()
        run_dir.wrote(*(Path(p).resolve().relative_to(root).as_posix() for p in paths))


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


def _same_file(handle, path: Path) -> bool:
    """Is the open file `handle` still the one at `path`?"""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def eval_dir(run: Path) -> Path:
    """RUN/eval/, made if missing: where `lorafit eval --data/--tasks` save their results."""
    path = Path(run) / EVAL_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path).expanduser()
        # Records in metrics.jsonl, counted as they are kept and appended (a run starts with
        # keep_metrics), so a checkpoint need not re-read the log to know where it stands.
        self.metrics_records = 0
        self.listeners: list[Callable[[dict], None]] = []  # each gets every record written (lorafit/trackers.py)

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def file(self, name: str) -> Path:
        return self.path / name

    def has_marker(self) -> bool:
        return self.file(MARKER_FILE).is_file()

    def is_run(self) -> bool:
        return self.has_marker() or self.file(CONFIG_FILE).is_file()  # config.yaml alone: a run of an older lorafit

    def is_finished(self) -> bool:
        return self.file(SUMMARY_FILE).is_file()

    def content(self) -> list[Path]:
        """What the directory holds besides lorafit's own lock, marker and manifest."""
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if p.name not in (LOCK_FILE, MARKER_FILE, MANIFEST_FILE)]

    # -- the manifest: what lorafit wrote, so that --overwrite deletes nothing else
    def written(self) -> set[str] | None:
        """Paths (relative, '/'-separated) of the files lorafit wrote into the run; None when the run has no
        readable manifest (made by an older lorafit, or damaged)."""
        try:
            files = json.loads(self.file(MANIFEST_FILE).read_text(encoding="utf-8")).get("files")
        except (OSError, ValueError, AttributeError, RecursionError):
            return None
        return {f for f in files if isinstance(f, str)} if isinstance(files, list) else None

    def wrote(self, *entries: str) -> None:
        """Add files lorafit just wrote to the manifest (a directory: every file now in it). Written atomically."""
        files = self.written() or set()
        before = len(files)
        for entry in entries:
            path = self.path / entry
            if path.is_dir() and not path.is_symlink():
                files.update(p.relative_to(self.path).as_posix() for p in path.rglob("*") if p.is_file())
            else:
                files.add(Path(entry).as_posix())
        if len(files) != before or not self.file(MANIFEST_FILE).is_file():
            atomic_write_text(self.file(MANIFEST_FILE), json.dumps({"files": sorted(files)}, indent=0) + "\n")

    def foreign_entries(self) -> list[str]:
        """Files and directories lorafit did not write (per the manifest; temporaries and the trackers' own
        directories excepted): the reason --overwrite would refuse to delete the directory."""
        written = self.written() or set()
        holders = {"/".join(Path(f).parts[:i]) for f in written for i in range(1, len(Path(f).parts))}
        foreign: list[str] = []

        def walk(directory: Path) -> None:
            for p in sorted(directory.iterdir()):
                rel = p.relative_to(self.path).as_posix()
                if is_temporary(p.name) or rel in (LOCK_FILE, MARKER_FILE, MANIFEST_FILE) or rel in TRACKER_DIRS:
                    continue  # the trackers write their own directories (tensorboard/, wandb/) as they please
                if p.is_dir() and not p.is_symlink():
                    walk(p) if rel in holders or rel in RUN_ENTRIES else foreign.append(rel + "/")
                elif rel not in written:
                    foreign.append(rel)

        if self.path.is_dir():
            walk(self.path)
        return foreign

    def check_new_run(self, resume: bool, overwrite: bool, locked: bool = False) -> None:
        """Refuse to clobber an existing run (or any other directory) unless told to, and to delete anything that
        is not recognisably a lorafit run even when told to; check writability. Changes nothing."""
        path = self.path
        why = forbidden_output_dir(str(path))
        if why:
            raise LorafitError(f"output_dir '{path}' can never hold a run: {why}. Give a directory of its own.")
        if path.exists() and not path.is_dir():
            raise LorafitError(f"output_dir '{path}' exists and is a file; choose another output_dir.")
        if not self.content():
            _check_writable(path)
            return
        if not self.is_run():
            raise LorafitError(
                f"output_dir '{path}' is not empty and holds no lorafit run; lorafit never writes into or deletes "
                "such a directory. Choose a new or empty output_dir."
            )
        if not (resume or overwrite):
            raise LorafitError(
                f"output_dir '{path}' already holds a run. Add --resume to continue it, --overwrite to "
                "replace it, or choose another output_dir=..."
            )
        if not locked:
            self._check_not_in_use()
        if overwrite and not resume:
            foreign = self.foreign_entries() if self.has_marker() and self.written() is not None else []
            shown = ", ".join(foreign[:SHOWN_FOREIGN]) + (f" (and {len(foreign) - SHOWN_FOREIGN} more)"
                                                          if len(foreign) > SHOWN_FOREIGN else "")
            why = (f"it has no {MARKER_FILE} (the mark lorafit leaves in a directory it made for a run)"
                   if not self.has_marker() else
                   f"it has no {MANIFEST_FILE} (the list of the files lorafit wrote; a run of an older lorafit)"
                   if self.written() is None else
                   f"it also holds {shown}, which no run writes (not in its {MANIFEST_FILE})" if foreign else "")
            if why:
                raise LorafitError(
                    f"--overwrite refused: output_dir '{path}' is not recognisably a lorafit run directory: {why}. "
                    "lorafit deletes only directories it made that hold nothing but the files it wrote there. Move "
                    "your files out, delete the directory yourself if it can go, or choose another output_dir."
                )
        _check_writable(path)

    def _check_not_in_use(self) -> None:
        """Fail early (before minutes of set-up) when another process holds the run; claim() decides for good."""
        try:
            with open(self.path / LOCK_FILE, "rb") as probe:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when the file is closed
        except FileNotFoundError:
            return
        except BlockingIOError:
            raise self._in_use() from None

    def _in_use(self) -> LorafitError:
        return LorafitError(
            f"Another lorafit process is using '{self.path}'. Wait for it to finish (or stop it), then retry."
        )

    @contextlib.contextmanager
    def claim(self, resume: bool = False, overwrite: bool = False):
        """Hold the directory for this process (created if need be), decide again under the lock whether this
        run may go there, empty it with `overwrite`, and mark it as a run directory.

        The lock comes first: a run in progress is never deleted, and two runs started together cannot both
        pass the checks. It is an flock: the OS releases it when the process ends, even on SIGKILL.
        """
        lock_path = self.path / LOCK_FILE
        with saving(f"the run directory {self.path}", "Choose another output_dir, or free space."):
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(lock_path, "a")
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._in_use() from None
            # The holder removes the file when it is done (below). A process that opened it just before then holds
            # a file no longer at lock_path: its lock guards nothing, so it counts as "in use" and the user retries.
            if not _same_file(lock, lock_path):
                raise self._in_use()
            try:
                self.check_new_run(resume, overwrite, locked=True)  # again: another process may have written a run meanwhile
                with saving(f"the run directory {self.path}", "Choose another output_dir, or free space."):
                    if overwrite and not resume:
                        for p in self.content():
                            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                        self.file(MARKER_FILE).unlink(missing_ok=True)
                        self.file(MANIFEST_FILE).unlink(missing_ok=True)
                    remove_temporaries(self.path)
                    remove_temporaries(self.checkpoints)
                    if not self.has_marker():
                        self.write_json(MARKER_FILE, {"lorafit_run": 1, "created": _now(), "resumes": []})
                    if self.written() is None:  # a new run, or one of an older lorafit: its files from now on
                        self.wrote()
                yield self
            finally:
                with contextlib.suppress(OSError):
                    lock_path.unlink()  # still holding the lock: no other process can hold this file now

    def record_resume(self, step: int, changed: dict) -> None:
        """Note in the marker that the run was resumed at `step` with these settings changed ({key: [old, new]})."""
        try:
            marker = self.read_json(MARKER_FILE)
        except (OSError, ValueError):
            marker = {"lorafit_run": 1}
        if not isinstance(marker, dict):
            marker = {"lorafit_run": 1}
        resumes = marker.get("resumes") if isinstance(marker.get("resumes"), list) else []
        marker["resumes"] = [*resumes, {"time": _now(), "step": step, "changed": changed}]
        self.write_json(MARKER_FILE, marker)

    def append_metrics(self, record: dict) -> None:
        with open(self.file(METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(to_json(record) + "\n")
        self.metrics_records += 1
        for listener in self.listeners:
            listener(record)

    def read_metrics(self) -> list[dict]:
        path = self.file(METRICS_FILE)
        if not path.is_file():
            return []
        records = []
        # A line cut by a crash is dropped, and so is anything else that is not a record (damaged bytes included).
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError, RecursionError):
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
        return records

    def keep_metrics(self, n: int) -> None:
        """Keep the first `n` records: those a checkpoint had seen; later ones are redone after a resume."""
        kept = self.read_metrics()[:n]
        atomic_write_text(self.file(METRICS_FILE), "".join(to_json(r) + "\n" for r in kept))
        self.wrote(METRICS_FILE)
        self.metrics_records = len(kept)

    def write_model_card(self, text: str) -> None:
        """The model card, in the run and in adapter/ (where it replaces PEFT's placeholder: the adapter
        directory alone, e.g. uploaded to the Hub, says what it is)."""
        atomic_write_text(self.file(MODEL_CARD), text)
        self.wrote(MODEL_CARD)
        if self.adapter.is_dir():
            atomic_write_text(self.adapter / MODEL_CARD, text)
            self.wrote(f"{ADAPTER_DIR}/{MODEL_CARD}")

    def write_json(self, name: str, obj: dict) -> None:
        atomic_write_text(self.file(name), json.dumps(json.loads(to_json(obj)), indent=2) + "\n")
        if name != MARKER_FILE:
            self.wrote(name)

    def read_json(self, name: str) -> dict:
        return json.loads(self.file(name).read_text(encoding="utf-8"))

    def read_summary(self) -> dict:
        """summary.json of a finished run; a damaged one is an error that says how to write it again."""
        try:
            summary = self.read_json(SUMMARY_FILE)
            if not isinstance(summary, dict):
                raise ValueError(f"it holds a {type(summary).__name__}, not an object")
            return summary
        except (OSError, ValueError, RecursionError) as exc:
            raise LorafitError(
                f"{self.file(SUMMARY_FILE)} is unreadable ({first_line(exc, 200)}). Delete it and run the same command with "
                "--resume: the final evaluation, adapter and reports are written again from the last checkpoint."
            ) from None
