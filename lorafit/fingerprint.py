"""A base model's identity, so an adapter or checkpoint is never used on other weights of the same shape.

The fingerprint is the Hub commit a model was loaded from (`{"revision": SHA}`), or for a local directory
the sha256 of its safetensors files (`{"sha256": HEX}`). Hashing a 500 MB base takes seconds, so each file's
hash is cached by (resolved path, size, mtime) in the user's cache directory: a changed file is hashed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from lorafit.atomic import atomic_write_text

CACHE_FILE = "base-fingerprints.json"
FINGERPRINT_KEY = "base_fingerprint"  # in lorafit_base.json and a checkpoint's state.json
CHUNK = 1 << 20


def user_cache_dir() -> Path:
    """lorafit's cache: $LORAFIT_CACHE, else $XDG_CACHE_HOME/lorafit, else ~/.cache/lorafit."""
    if os.environ.get("LORAFIT_CACHE"):
        return Path(os.environ["LORAFIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lorafit"


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}  # no cache, or a damaged one: hash again


def file_sha256(path: Path, cache: dict) -> str:
    """sha256 of one file, from `cache` when its path, size and mtime are unchanged (`cache` is updated)."""
    stat = path.stat()
    key = str(path.resolve())
    seen = cache.get(key)
    if isinstance(seen, dict) and seen.get("size") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns:
        return str(seen.get("sha256"))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": h.hexdigest()}
    return h.hexdigest()


def local_fingerprint(directory: Path) -> dict | None:
    """{"sha256": ...} over the safetensors files of a model directory (names and contents), or None."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    cache_path = user_cache_dir() / CACHE_FILE
    cache = _read_cache(cache_path)
    before = json.dumps(cache, sort_keys=True)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f, cache)}\0".encode())
    if json.dumps(cache, sort_keys=True) != before:
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs time next load
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_path, json.dumps(cache, indent=1))
    return {"sha256": h.hexdigest()}


def base_fingerprint(name: str, config) -> dict | None:
    """The identity of the base `name` as loaded with `config` (its transformers config): the local
    directory's safetensors hash, else the Hub commit transformers resolved (None when neither is known)."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local_fingerprint(local)
    commit = getattr(config, "_commit_hash", None)
    return {"revision": commit} if commit else None


def differs(recorded, current) -> str | None:
    """How two fingerprints differ (None when they agree, or when either is unknown: nothing to compare)."""
    if not isinstance(recorded, dict) or not isinstance(current, dict):
        return None
    for kind in ("sha256", "revision"):
        if kind in recorded and kind in current:
            if recorded[kind] != current[kind]:
                what = "weights (sha256 of its safetensors)" if kind == "sha256" else "Hub revision"
                return f"its {what} {str(recorded[kind])[:12]} vs {str(current[kind])[:12]}"
            return None
    return None
