"""User-facing errors.

A `LorafitError` is a problem with the user's input or environment. The CLI prints its message
(what was wrong, where, what to do) without a traceback and exits with code 2. Anything else is
a bug in lorafit and keeps its traceback. `Stopped` is a run stopped on request, resumable.
"""

from __future__ import annotations

import os

EXIT_USER_ERROR = 2


# Every error message that quotes an exception quotes it through one of these three, so each says why the same way.
def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when it has none), at most `limit` characters:
    enough to say why."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit] if limit else line


def described(exc: BaseException, limit: int | None = None) -> str:
    """`Type: first line of the message` (the type alone when there is no message)."""
    return f"{type(exc).__name__}: {first_line(exc, limit)}" if str(exc).strip() else type(exc).__name__


def one_line(exc: BaseException, limit: int = 400) -> str:
    """The whole message on one line (a first line alone can stop mid-sentence, at a colon), cut at `limit`."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def not_utf8(text: str) -> str | None:
    """Why `text` (from argv or a file read with surrogateescape) is not valid UTF-8, or None. Python hands bytes
    that are not UTF-8 on the command line over as lone surrogates (U+DC80-U+DCFF stand for bytes 0x80-0xFF)."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            byte = f"byte 0x{ord(ch) - 0xDC00:02x}" if ord(ch) >= 0xDC80 else f"a lone surrogate U+{ord(ch):04X}"
            return f"{byte} at character {i + 1} is not valid UTF-8"
    return None


def shorten(text: str, limit: int = 120) -> str:
    """`text` cut in its middle to at most about `limit` characters: a path of 10,000 characters must not flood
    the one line that names it, and its start and end say which it was."""
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]} ({len(text):,} characters)"


OFFLINE_REASON = "LORAFIT_OFFLINE_REASON"  # set by the CLI when it switched to offline mode itself


def offline_note() -> str:
    """Why the Hub was not asked, when lorafit found it unreachable and went offline (else nothing)."""
    reason = os.environ.get(OFFLINE_REASON)
    return f"\n({reason})" if reason else ""


class LorafitError(Exception):
    """An error the user can fix; its message says what, where, and what to do."""


class ConfigError(LorafitError):
    """One or more problems in a run configuration, all reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{len(self.problems)} {noun} in the configuration:\n{lines}")


class DataError(LorafitError):
    """Input data that cannot be read or used (missing file, bad record, absent field...)."""


class Stopped(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the exit code is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        self.exit_code = 128 + signum
        super().__init__(message)
