"""The reference of DPO and IPO: what the policy's log-probabilities are compared with.

With LoRA the reference costs no second model. It is the model as training starts: the base with the
adapter switched off (a new adapter), or the adapter a run continues (`model.adapter`, e.g. an SFT run),
which the policy starts as a copy of. Its log-probabilities are computed once, before training, in one
no-grad pass over the training and validation sequences (data parallel: each rank scores its share), and
kept with the tokenised data (`TokenizedSplit.ref_logps`), so a step is one forward and backward of the
policy only.

They are saved in the run (`reference_logps.npz`, in its file manifest), each split's array under a key of
everything it depends on: that split's tokens and scored positions, the base's fingerprint, the sha256 of the
starting adapter, the precision and the device. A --resume and `lorafit eval RUN` read a split's values back
when its key matches exactly, and compute them again (saying why, in one line) when it does not. Under
torch.distributed rank 0 reads the file and sends what it holds to the other ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafit import distributed as dist
from lorafit.atomic import atomic_path
from lorafit.config import RunConfig
from lorafit.console import log
from lorafit.data.tokenize import TokenizedSplit
from lorafit.evaluate import Scoring
from lorafit.generate import resolve_adapter_dir
from lorafit.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, loaded_fingerprint
from lorafit.measure import device_name
from lorafit.modeling import Precision
from lorafit.objectives import uses_reference
from lorafit.preference import sequence_logps
from lorafit.rundir import REFERENCE_FILE, RunDir

KEYS = "keys"  # in the file: a JSON object {split: its key}, beside one float64 array per split
VERSION = 1  # of what a key holds; a file of another version is computed again


def tokens_fingerprint(split: TokenizedSplit) -> str:
    """sha256 of what a split's log-probabilities sum over: its tokens, where each sequence starts, which are scored."""
    h = hashlib.sha256()
    for array in (split.ids, split.offsets, split.scored):
        h.update(b"-" if array is None else str(array.dtype).encode() + np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def adapter_sha256(adapter: str | Path) -> str:
    """sha256 of a saved adapter's weights and config (a run directory: its adapter/)."""
    directory = resolve_adapter_dir(adapter)
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update(name.encode() + b"\0" + hashlib.sha256((directory / name).read_bytes()).digest())
    return h.hexdigest()


def common_key(cfg: RunConfig, model, precision: Precision, device) -> dict:
    """What every split's reference depends on besides its tokens."""
    return {
        "version": VERSION,
        "base": loaded_fingerprint(model),
        "adapter": adapter_sha256(cfg.model.adapter) if cfg.model.adapter else None,
        "precision": [str(precision.weights), str(precision.autocast)],
        "device": device_name(device),
    }


# What differs, in words, for the log line of a recomputation (the first key that differs).
_WHAT = {"tokens": "other tokens", "base": "another base", "adapter": "another starting adapter (model.adapter)",
         "precision": "another precision", "device": "another device", "version": "an older lorafit"}


@dataclass
class Reference:
    """The reference values of a run's splits and their keys; `computed`: the splits computed here (not read)."""

    keys: dict[str, dict]
    computed: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the computation's (0 when every split was read)


def read(path: Path, keys: dict[str, dict]) -> tuple[dict[str, np.ndarray], str | None]:
    """The stored arrays whose key equals `keys`' (rank 0 reads, every rank gets them), and why the others
    could not be used (None: all read, or no file to read)."""
    arrays, why = {}, None
    if dist.world().is_main and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                stored = json.loads(str(f[KEYS]))
                for name, key in keys.items():
                    if stored.get(name) == key and name in f.files:
                        arrays[name] = np.asarray(f[name], dtype=np.float64)
                    elif why is None:
                        differ = [k for k in key if not isinstance(stored.get(name), dict) or stored[name].get(k) != key[k]]
                        why = f"{name} split: {_WHAT.get(differ[0], differ[0]) if differ else 'not stored'}"
        except (OSError, ValueError, KeyError, AttributeError, RecursionError) as exc:
            arrays, why = {}, f"unreadable ({type(exc).__name__})"
    arrays, why = dist.broadcast_arrays(arrays, why)
    return arrays, why


def write(run: RunDir, reference: Reference, splits: dict[str, TokenizedSplit]) -> None:
    """Save the splits' values under their keys, atomically, and list the file in the run's manifest (rank 0)."""
    with atomic_path(run.file(REFERENCE_FILE)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{KEYS: np.array(json.dumps(reference.keys, sort_keys=True))},
                     **{name: np.asarray(split.ref_logps, dtype=np.float64) for name, split in splits.items()})
    run.wrote(REFERENCE_FILE)


@contextlib.contextmanager
def as_reference(model, cfg: RunConfig, policy_is_start: bool):
    """The model switched to the reference: the adapter off, or the starting adapter (already the policy before
    training; else loaded beside the run's, as `lorafit eval` does)."""
    if cfg.model.adapter is None:
        with model.disable_adapter():
            yield
    elif policy_is_start:
        yield
    else:
        load_adapter(model, resolve_adapter_dir(cfg.model.adapter), cfg.model.name, adapter_name="reference")
        model.set_adapter("reference")
        try:
            yield
        finally:
            model.set_adapter("default")
            model.delete_adapter("reference")


def compute(model, cfg: RunConfig, split: TokenizedSplit, scoring: Scoring, policy_is_start: bool) -> np.ndarray:
    """The reference's log-probability of each sequence of `split` (float64): one no-grad pass, eval mode."""
    with as_reference(model, cfg, policy_is_start):
        return sequence_logps(model, split, scoring)


def attach(cfg: RunConfig, model, splits: dict[str, TokenizedSplit], scoring: Scoring, precision: Precision,
           stored: Path | None = None, policy_is_start: bool = True) -> Reference | None:
    """Set each split's `ref_logps` (DPO, IPO; None for the other objectives): read from `stored` where its key
    matches, else computed. `policy_is_start`: the model is still as training starts (set-up, before a
    checkpoint is restored); else it carries the trained adapter (`lorafit eval`)."""
    if not uses_reference(cfg.train.objective):
        return None
    common = common_key(cfg, model, precision, scoring.device)
    reference = Reference({name: {**common, "tokens": tokens_fingerprint(split)} for name, split in splits.items()})
    arrays, why = read(stored, reference.keys) if stored is not None else ({}, None)
    if why:
        log(f"{stored} holds the reference of {why}: its log-probabilities are computed again")
    start = time.perf_counter()
    for name, split in splits.items():
        if name in arrays and len(arrays[name]) == len(split):
            split.ref_logps = arrays[name]
        else:
            split.ref_logps = compute(model, cfg, split, scoring, policy_is_start)
            reference.computed.append(name)
    which = "the base, adapter off" if cfg.model.adapter is None else "the adapter " + str(cfg.model.adapter)
    n = sum(len(s) for s in splits.values())
    if reference.computed:
        reference.seconds = time.perf_counter() - start
        log(f"reference log-probabilities of {n:,} sequences in {reference.seconds:.1f} s ({which})")
    else:
        log(f"reference log-probabilities of {n:,} sequences read from {stored} ({which})")
    return reference
