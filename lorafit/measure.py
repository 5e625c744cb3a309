"""Honest timing and memory readings on CPU and GPU, shared by training and the benchmarks."""

from __future__ import annotations

import resource

import torch


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def sync(device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets VmHWM, so the next peak covers what follows, not earlier work
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # falls back to the process-lifetime peak


def peak_memory_bytes(device) -> int:
    """CUDA: max allocated; CPU: the process's peak resident set (since the last reset, on Linux)."""
    if _is_cuda(device):
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def device_name(device) -> str:
    """`cpu`, or the GPU's model name: what summary.json and the bench record."""
    return torch.cuda.get_device_name(device) if _is_cuda(device) else str(device)
