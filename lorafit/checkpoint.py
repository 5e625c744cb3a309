"""Training checkpoints: everything needed to continue a run bit for bit.

checkpoints/step-N/
    adapter_model.safetensors   LoRA weights (safetensors: no pickle)
    optimizer.pt, scheduler.pt  state dicts, loaded with weights_only=True
    rng.pt                      torch (and CUDA) generator states, weights_only
    state.json                  step, logging window, Python and NumPy RNG states

The data position is a pure function of (seed, step), so the step is all a resume needs to
continue mid-epoch. A checkpoint directory appears only complete (atomic rename).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorafit.errors import LorafitError
from lorafit.rundir import atomic_dir

WEIGHTS = "adapter_model.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"
STATE = "state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


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


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    final = Path(directory) / f"step-{step}"
    json_rng, tensor_rng = rng_state()
    with atomic_dir(final) as tmp:
        save_file(trainable_state(model), str(tmp / WEIGHTS))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
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


def prune(directory: Path, keep: int) -> None:
    for _, path in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    path = Path(path)
    weights = load_file(str(path / WEIGHTS))
    params = dict(model.named_parameters())
    missing = sorted(k for k, p in params.items() if p.requires_grad and k not in weights)
    unexpected = sorted(k for k in weights if k not in params)
    if missing or unexpected:
        raise LorafitError(
            f"Checkpoint {path} does not match this run's model: missing {missing[:3]}, unexpected {unexpected[:3]}. "
            "Was the config changed since the run started?"
        )
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    optimizer.load_state_dict(torch.load(path / OPTIMIZER, weights_only=True))
    scheduler.load_state_dict(torch.load(path / SCHEDULER, weights_only=True))
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    set_rng_state(state.pop("rng"), torch.load(path / RNG, weights_only=True))
    return state
