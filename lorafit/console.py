"""One voice for the whole job: status lines on stderr, from rank 0 only, above any progress bar."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    from lorafit import distributed as dist  # lazy: the CLI logs before torch loads (distributed imports it)

    if dist.world().is_main:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)  # above a progress bar, not into it
        sys.stderr.flush()
