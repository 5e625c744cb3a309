"""Processes that train as one, on torch.distributed: rank, world size, device, the process group,
each rank's share of a step, and the reductions.

Started by `torchrun` or `accelerate launch` (RANK, WORLD_SIZE, LOCAL_RANK in the environment),
lorafit trains data parallel: every rank takes a disjoint, token-balanced share of each optimizer
step's examples, DDP all-reduces the gradients, and the loss is normalised by the step's global
number of target tokens, so N ranks make the update one process makes with the same
`batch_size x grad_accum`. On one process every helper here is the identity.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

TIMEOUT = timedelta(minutes=30)  # a rank that stops answering ends the job instead of hanging it


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


_world = World()


def world() -> World:
    return _world


def from_environment() -> World:
    """The world torchrun / accelerate launch describe in the environment (one process without them)."""
    env = os.environ
    if "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) <= 1:
        return World()
    return World(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))


def init() -> World:
    """Join the process group when launched as several processes: nccl on GPUs, gloo on CPU."""
    global _world
    found = from_environment()
    if found.parallel and not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(found.local_rank)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    _world = found
    return _world


def shutdown() -> None:
    global _world
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _world = World()


def device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on a GPU host, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", _world.local_rank)
    return torch.device("cpu")


def shares(lengths: np.ndarray, size: int) -> list[np.ndarray]:
    """Positions 0..n-1 split into `size` disjoint shares of about equal total length: longest first,
    each to the lightest share (ties to the lowest rank), each share kept in its original order."""
    loads, picked = np.zeros(size, dtype=np.int64), [[] for _ in range(size)]
    for i in np.argsort(-lengths, kind="stable"):
        r = int(np.argmin(loads))
        picked[r].append(int(i))
        loads[r] += int(lengths[i])
    return [np.array(sorted(p), dtype=np.int64) for p in picked]


def my_share(indices: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """This rank's share of `indices` (lengths: of those examples)."""
    if not _world.parallel:
        return indices
    return indices[shares(lengths, _world.size)[_world.rank]]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place (the identity on one process)."""
    if _world.parallel:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if _world.parallel:
        torch.distributed.barrier()


def agree(ok: bool) -> bool:
    """True on every rank only when `ok` is true on every rank: a failure on one stops all of them."""
    if not _world.parallel:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=_comm_device())
    all_reduce_sum(flag)
    return int(flag.item()) == 0


def _comm_device() -> torch.device:
    return device() if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def broadcast_arrays(arrays: dict[str, np.ndarray] | None, meta: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Rank 0's arrays (and a small JSON-able `meta`) on every rank, sent as tensors: what rank 0 read and
    tokenised, the others receive instead of reading it again. No pickle goes over the wire."""
    if not _world.parallel:
        return arrays, meta
    dev = _comm_device()
    header = None
    if _world.is_main:
        header = json.dumps({"meta": meta, "arrays": {k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()}})
    header = json.loads(_broadcast_bytes(header.encode() if header else None, dev).decode())
    out = {}
    for name, (dtype, shape) in header["arrays"].items():
        t = torch.from_numpy(np.ascontiguousarray(arrays[name])).to(dev) if _world.is_main else torch.empty(
            shape, dtype=getattr(torch, np.dtype(dtype).name if dtype != "bool" else "bool"), device=dev)
        torch.distributed.broadcast(t, src=0)
        out[name] = t.cpu().numpy()
    return out, header["meta"]


def _broadcast_bytes(data: bytes | None, dev: torch.device) -> bytes:
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=dev)
    torch.distributed.broadcast(size, src=0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if data is not None else torch.empty(
        int(size.item()), dtype=torch.uint8, device=dev)
    torch.distributed.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy().tobytes())


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. builds a cache); the others wait, then run it."""
    if _world.is_main:
        yield
        barrier()
    else:
        barrier()
        yield
