"""Where a source's path points: below the config (which checks recipes' paths) and the readers alike."""

from __future__ import annotations

from pathlib import Path

# A path ending so is read as a local file, not a Hub dataset id (data/sources.is_local, config's rebasing).
LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt", ".parquet")


def resolve_path(path: str, root: str | None) -> Path:
    """`path` with `~` expanded, relative to `root` (data.root) when one is given and the path is relative."""
    p = Path(path).expanduser()
    if root is not None and not p.is_absolute():
        p = Path(root).expanduser() / p
    return p


def is_local(src, root: str | None) -> bool:
    """A source is local when its format says so, the path exists, or it looks like a file path."""
    if src.format not in ("auto", "hub"):
        return True
    if src.format == "hub":
        return False
    path = resolve_path(src.path, root)
    return path.exists() or src.path.lower().endswith(LOCAL_SUFFIXES) or src.path.startswith((".", "/", "~"))
