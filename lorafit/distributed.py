"""Processes that train as one, on torch.distributed: rank, world size, device, the process group,
each rank's share of a step, and the reductions.

Started by `torchrun` or `accelerate launch` (RANK, WORLD_SIZE, LOCAL_RANK in the environment),
lorafit trains data parallel: every rank takes a disjoint, token-balanced share of each optimizer
step's examples, DDP all-reduces the gradients, and the loss is normalised by the step's global
number of target tokens, so N ranks make the update one process makes with the same
`batch_size x grad_accum`. On one process every helper here is the identity.
"""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import torch

from lorafit.balance import longest_first
from lorafit.ranks import World, from_environment, set_world, world

TIMEOUT = timedelta(minutes=30)  # a rank that stops answering ends the job instead of hanging it


def init() -> World:
    """Join the process group when launched as several processes: nccl on GPUs, gloo on CPU."""
    found = from_environment()
    if found.parallel and not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(found.local_rank)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    set_world(found)
    return found


def shutdown() -> None:
    global _sharded
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    set_world(World())
    _sharded = False


def device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on a GPU host, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", world().local_rank)
    return torch.device("cpu")


def shares(lengths: np.ndarray, size: int) -> list[np.ndarray]:
    """Positions 0..n-1 split into `size` disjoint shares of about equal total length: longest first,
    each to the lightest share (ties to the lowest rank), each share kept in its original order."""
    return [np.array(sorted(p), dtype=np.int64) for p in longest_first(lengths, size)]


def my_share(indices: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """This rank's share of `indices` (lengths: of those examples)."""
    if not world().parallel:
        return indices
    return indices[shares(lengths, world().size)[world().rank]]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place (the identity on one process)."""
    if world().parallel:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if world().parallel:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    return device() if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def broadcast_arrays(arrays: dict[str, np.ndarray] | None, meta: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Rank 0's arrays (and a small JSON-able `meta`) on every rank, sent as tensors: what rank 0 read and
    tokenised, the others receive instead of reading it again. No pickle goes over the wire."""
    if not world().parallel:
        return arrays, meta
    dev = _comm_device()
    header = None
    if world().is_main:
        header = json.dumps({"meta": meta, "arrays": {k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()}})
    header = json.loads(_broadcast_bytes(header.encode() if header else None, dev).decode())
    out = {}
    for name, (dtype, shape) in header["arrays"].items():
        t = torch.from_numpy(np.ascontiguousarray(arrays[name])).to(dev) if world().is_main else torch.empty(
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


# ---------------------------------------------------------------- FSDP2: the frozen base sharded over the ranks

_sharded = False


def sharded() -> bool:
    """Whether the model is sharded (train.fsdp): then every forward is a collective, which all ranks
    must make the same number of times."""
    return _sharded


def shard(base) -> None:
    """torch's FSDP2 `fully_shard` on each decoder block (the classes transformers keeps whole on one
    device, `_no_split_modules`) and on the whole model: frozen base and LoRA weights both sharded,
    gathered a block at a time in the forward; gradients reduce-scattered. `base`: the transformers model (inside
    PEFT's wrapper, lora.unwrapped)."""
    global _sharded
    # start-up: FSDP's modules take about a second to import; only train.fsdp runs use them
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(base, "_no_split_modules", None) or [])
    for module in [m for m in base.modules() if type(m).__name__ in block_names]:
        fully_shard(module)
    fully_shard(base)
    _sharded = True


def _state_options(**kw):
    # start-up: as in shard (FSDP's modules)
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **kw)


def full_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """The trainable weights (and optimizer state, keyed by parameter name) gathered whole, on rank 0's
    CPU (empty on the others). A collective: every rank calls it."""
    # start-up: as in shard (FSDP's modules)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        weights, optimizer_state = get_model_state_dict(model, options=_state_options(cpu_offload=True)), None
    else:
        weights, optimizer_state = get_state_dict(model, optimizer, options=_state_options(cpu_offload=True))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # A head tied to the frozen embeddings comes back under its own name too: keep the trainable ones only.
    return {k: v for k, v in weights.items() if k in trainable}, optimizer_state


def load_full_state(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Whole trainable weights and optimizer state (as `full_state` gave them: keyed by parameter name)
    into the sharded model: each rank keeps its own shard of every tensor. A collective."""
    # start-up: as in shard (FSDP's modules)
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters())

    def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        full = full.to(device=like.device, dtype=like.dtype)
        return distribute_tensor(full, like.device_mesh, like.placements) if hasattr(like, "device_mesh") else full

    with torch.no_grad():
        for name, full in weights.items():
            params[name].copy_(shard_like(full, params[name]))
    for name, state in optimizer_state["state"].items():
        p = params[name]
        optimizer.state[p] = {k: shard_like(v, p) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in state.items()}
    for group, saved in zip(optimizer.param_groups, optimizer_state["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})


def common_count(n: int) -> int:
    """The largest `n` over the ranks (n itself on one process)."""
    if not world().parallel:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())
