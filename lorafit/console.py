"""One voice for the whole job: status lines on stderr, from rank 0 only, above any progress bar; and the progress
bars themselves, only where one can draw."""

from __future__ import annotations

import os
import sys

from lorafit.ranks import world


def log(msg: str) -> None:
    if world().is_main:
        from tqdm import tqdm  # start-up: tqdm (about 0.1 s); the CLI logs before any bar is drawn

        tqdm.write(msg, file=sys.stderr)  # above a progress bar, not into it
        sys.stderr.flush()


def bar_can_draw(stream=None) -> bool:
    """A bar redraws one line of a terminal: it needs a terminal, and one with a width. A terminal 0 columns wide
    (`script`, some CI runners) draws nothing, so the caller falls back to log lines instead of silence."""
    stream = stream or sys.stderr
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):  # no file descriptor (captured), or not a terminal after all
        return False


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, **options):
    """A tqdm bar on stderr from rank 0, or None when it is not wanted (--no-progress) or cannot draw."""
    if not (enabled and world().is_main and bar_can_draw()):
        return None
    from tqdm import tqdm  # start-up: as in log

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, **options)
