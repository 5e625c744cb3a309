"""What is wrong with a local path, said in words, and when a name is a local path rather than a Hub id.

A leaf: the early checks (lorafit/preflight.py), templates and readers ask it, so a FIFO, a device or a typo is
named the same way everywhere.
"""

from __future__ import annotations

import errno
import stat
from pathlib import Path

LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")


MISSING = "does not exist"


def path_problem(path: Path, want: str = "file") -> str | None:
    """None when `path` is what is wanted ("file": a regular file, or a link to one; "dir": a directory), else why
    not, to follow the path in a sentence: "does not exist" (MISSING), "is a FIFO (named pipe), not a regular file", "is a
    symbolic link loop", ... Never opens the path (a FIFO would block)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode  # follows links
    except FileNotFoundError:
        return f"is a broken symbolic link (to {path.readlink()})" if path.is_symlink() else MISSING
    except OSError as exc:  # a link loop, a permission on a parent, a name too long
        return "is a symbolic link loop" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror or exc})"
    if want == "dir":
        return None if stat.S_ISDIR(mode) else "is not a directory"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    return f"is {special_kind(mode)}, not a regular file"


def special_kind(mode: int) -> str:
    """What a path that is not a regular file or a directory is, from its st_mode."""
    return ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode) else
            "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")


def describe_problem(key: str, path: Path, why: str, want: str = "file") -> str:
    """`key: file not found: PATH` for a missing path, else `key: PATH is ...`."""
    if why == MISSING:
        return f"{key}: {'no such directory' if want == 'dir' else 'file not found'}: {path}"
    return f"{key}: {path} {why}"


def looks_like_a_path(name: str) -> bool:
    """Is a model name meant as a local directory rather than a Hub id? Yes when it starts with ./ ../ / or ~, or
    when it exists, or when its first component exists here (`models/gpt2-quotse` with a models/ directory: a typo
    in a local path, not a Hub repository). A Hub id (`gpt2`, `org/name`) whose first part is no local name stays a
    Hub id."""
    if name.startswith(LOCAL_PREFIXES) or name in (".", ".."):
        return True
    path = Path(name).expanduser()
    if path.exists():
        return True
    first = Path(name).parts[0] if Path(name).parts else ""
    return len(Path(name).parts) > 1 and Path(first).exists()
