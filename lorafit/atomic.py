"""Files and directories written whole or not at all.

    with atomic_path(path) as tmp:   # write tmp (any writer; the suffix is kept)
        np.savez(tmp, ...)
    atomic_write_text(path, text)
    with atomic_dir(final) as tmp:   # fill a directory, then swap it in
        model.save_pretrained(tmp)

Everything is written to a temporary name next to its target and renamed into place, so a crash or
a full disk never leaves a half-written file where a complete one was (or where a reader looks, as
in the data caches). Temporaries are named `.NAME.tmp-PID` (`.NAME.old-PID` for a directory being
replaced); `is_temporary` recognises what an interrupted write left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

TEMP_MARKERS = (".tmp-", ".old-")


def is_temporary(name: str) -> bool:
    return name.startswith(".") and any(m in name for m in TEMP_MARKERS)


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
def atomic_dir(final: Path, keep: tuple[str, ...] = ()):
    """Yield a temporary directory; on success it replaces `final` by renames. `keep`: entries of the old
    `final` (relative paths; files or directories that are not the writer's) copied into the new one first, so
    replacing a directory never deletes them; a name the writer also wrote stays the writer's."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for entry in keep:  # copied, not moved: until the swap below the old directory keeps them whole
            src, dst = final / entry, tmp / entry
            if dst.exists() or not (src.exists() or src.is_symlink()):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir() and not src.is_symlink():
                shutil.copytree(src, dst, symlinks=True)
            else:
                shutil.copy2(src, dst, follow_symlinks=False)
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
