"""Training checkpoints: everything needed to continue a run bit for bit.

checkpoints/step-N/
    adapter_model.safetensors   LoRA weights (safetensors: no pickle)
    optimizer.pt, scheduler.pt  state dicts, loaded with weights_only=True
    rng.pt                      torch (and CUDA) generator states, weights_only
    state.json                  step, logging window, counters, Python and NumPy RNG states

The data position is a pure function of (seed, step), so the step is all a resume needs to
continue mid-epoch. A checkpoint directory appears only complete (written under a temporary
name, then renamed), and an old one disappears by a rename before it is deleted.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorafit.errors import LorafitError, described
from lorafit.lora import key_problems
from lorafit.atomic import atomic_dir
from lorafit.rundir import saving

WEIGHTS = "adapter_model.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"
STATE = "state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
UNREADABLE = (OSError, ValueError, KeyError, RuntimeError, SafetensorError, pickle.UnpicklingError)
TAMPERED = (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError)  # valid files, wrong content


def unreadable(path: Path, exc: BaseException) -> LorafitError:
    """A checkpoint (or one of its files) that cannot be used: say so, and how to go on without it."""
    path = Path(path)
    step_dir = path if STEP_DIR.match(path.name) else path.parent
    why = described(exc, 200)
    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
        why = f"{type(exc).__name__}: {refused_pickle(exc)}"
    return LorafitError(
        f"Checkpoint {step_dir} is unreadable ({path.name if path != step_dir else ''}"
        f"{': ' if path != step_dir else ''}{why}). Delete it to resume "
        "from the previous checkpoint, or start again with --overwrite."
    )


def refused_pickle(exc: BaseException) -> str:
    """torch's weights_only refusal in one line. Its first line suggests weights_only=False and only then warns
    that this can run arbitrary code: a cut message would keep the advice and lose the warning. Keep what was
    refused and the warning instead."""
    what = next((line.strip() for line in str(exc).splitlines() if "unsupported" in line.lower()), "")
    return (f"it holds objects other than tensors and plain values, which lorafit never writes"
            f"{' (' + what[:200] + ')' if what else ''}; loading it anyway could run arbitrary code, so lorafit "
            "does not")


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().contiguous() for k, p in model.named_parameters() if p.requires_grad}


def rng_state() -> tuple[dict, dict]:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    json_part = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensor_part = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensor_part["cuda"] = torch.cuda.get_rng_state_all()
    return json_part, tensor_part


def set_rng_state(json_part: dict, tensor_part: dict) -> None:
    v, s, g = json_part["python"]
    random.setstate((v, tuple(s), g))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensor_part["torch"])
    if "cuda" in tensor_part and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensor_part["cuda"])


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, state: dict, keep: int,
                    gathered: tuple[dict, dict] | None = None) -> Path:
    """Write checkpoints/step-N atomically, then drop all but the newest `keep`. `gathered`: the weights and
    optimizer state already gathered whole from a sharded model (train.fsdp); else this process's own."""
    final = Path(directory) / f"step-{step}"
    previous = newest_checkpoint(directory)
    kept = f"the newest complete checkpoint is still {previous}" if previous else "no checkpoint was saved yet"
    json_rng, tensor_rng = rng_state()
    with saving(f"checkpoint {final}", f"Nothing was lost: {kept}. Free space, then continue with --resume."):
        with atomic_dir(final) as tmp:
            weights, optimizer_state = gathered or (trainable_state(model), optimizer.state_dict())
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
            torch.save(optimizer_state, tmp / OPTIMIZER)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER)
            torch.save(tensor_rng, tmp / RNG)
            (tmp / STATE).write_text(json.dumps({"step": step, "rng": json_rng, **state}), encoding="utf-8")
    prune(directory, keep)
    return final


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary directories never match step-N)."""
    if not Path(directory).is_dir():
        return []
    found = []
    for path in Path(directory).iterdir():
        m = STEP_DIR.match(path.name)
        if m and path.is_dir() and (path / STATE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def newest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint under `directory` (None when there is none): what --resume continues from."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


CHECKPOINT_FILES = (STATE, WEIGHTS, OPTIMIZER, SCHEDULER, RNG)  # state.json first: without it, no checkpoint


def prune(directory: Path, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints. A checkpoint directory that also holds something lorafit did
    not write loses only lorafit's files, so it stops being a checkpoint and the user's files stay."""
    for _, path in list_checkpoints(directory)[:-keep]:
        if any(p.name not in CHECKPOINT_FILES for p in path.iterdir()):
            for name in CHECKPOINT_FILES:
                (path / name).unlink(missing_ok=True)
            continue
        doomed = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, doomed)  # gone from the listing at once; a crash mid-delete leaves only a temporary
        shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler, apply=None) -> dict:
    """Restore weights, optimizer, scheduler and RNGs in place; return the rest of state.json. `apply(weights,
    optimizer_state)` puts them into a sharded model instead (train.fsdp)."""
    path = Path(path)
    try:
        weights = load_file(str(path / WEIGHTS))
        optimizer_state = torch.load(path / OPTIMIZER, weights_only=True)
        scheduler_state = torch.load(path / SCHEDULER, weights_only=True)
        tensor_rng = torch.load(path / RNG, weights_only=True)
        state = read_state(path)
    except UNREADABLE as exc:
        raise unreadable(path, exc) from None
    check_weights(path, model, weights)
    try:
        if apply is not None:
            apply(weights, optimizer_state)
        else:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for k, v in weights.items():
                    params[k].copy_(v)
            optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        set_rng_state(state.pop("rng"), tensor_rng)
    except TAMPERED as exc:  # files that load but do not hold what lorafit wrote
        raise unreadable(path, exc) from None
    return state


# Counters in state.json: whole numbers from 0 (a bound far above any run keeps a tampered one from
# overflowing later arithmetic or looking like a finished run).
COUNTS = ("step", "total_steps", "train_examples", "metrics_records", "train_tokens", "nonfinite_skipped")
WINDOW_COUNTS = ("tokens", "examples", "steps")
MAX_COUNT = 2**53


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _seconds(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def read_state(path: Path) -> dict:
    """A checkpoint's state.json, its values checked: a tampered one (a negative, fractional or huge step, a
    string where a number belongs) is a ValueError, reported as an unreadable checkpoint, never used."""
    state = json.loads((Path(path) / STATE).read_text(encoding="utf-8"))
    if not isinstance(state, dict):
        raise ValueError(f"{STATE} holds a {type(state).__name__}, not an object")
    # What is there must be right; what is missing fails where it is used (a KeyError: unreadable too).
    bad = [k for k in COUNTS if (k in state or k == "step") and not _count(state.get(k))]
    window = state.get("window", {})
    if not isinstance(window, dict):
        bad.append("window")
    elif window:
        bad += [f"window.{k}" for k in WINDOW_COUNTS if not _count(window.get(k))]
        bad += [f"window.{k}" for k in ("seconds",) if not _seconds(window.get(k))]
        if not isinstance(window.get("nll"), int | float) or isinstance(window.get("nll"), bool):
            bad.append("window.nll")
    if "train_seconds" in state and not _seconds(state["train_seconds"]):
        bad.append("train_seconds")
    if bad:
        shown = ", ".join(f"{k}={_value(state, k)}" for k in bad[:4])
        raise ValueError(f"{STATE}: {shown} (not what lorafit writes)")
    if "total_steps" in state and state["step"] > state["total_steps"]:
        raise ValueError(f"{STATE}: step {state['step']} is beyond total_steps {state['total_steps']}")
    return state


def _value(state: dict, key: str) -> str:
    value = state
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_weights(path: Path, model, weights: dict[str, torch.Tensor]) -> None:
    """The checkpoint holds exactly this model's trainable tensors, with their shapes."""
    expected = {k: p.shape for k, p in model.named_parameters() if p.requires_grad}
    problems = key_problems(expected, {k: v.shape for k, v in weights.items()}, "checkpoint", "model")
    if problems:
        raise LorafitError(
            f"Checkpoint {path} does not match this run's model: {'; '.join(problems)}. "
            "Was the config changed since the run started?"
        )
