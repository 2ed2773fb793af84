"""Timing and peak-memory helpers for the training-step benchmarks.

Timing: callables are run round-robin, one call each per round (forward order, then
reverse order), so a neighbour's load moves every side alike; each side's figure is
the median of its rounds.

Peak memory of a training step, measured above what is resident before it:
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), less
  memory_allocated() before the step (the caching allocator's own high-water mark).
- CPU: the kernel's resident high-water mark (VmHWM in /proc/self/status), reset
  by writing 5 to /proc/self/clear_refs, less VmRSS before the step. glibc keeps
  freed small blocks in its heap, so the process that measures runs with
  MALLOC_MMAP_THRESHOLD_ set (PEAK_ENV): every tensor over 64 KiB is its own
  mmap, returned to the kernel when freed, and RSS follows live tensors.
"""

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def interleaved_times(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds of each call of each step, the steps alternated call by call over `rounds`;
    every other round runs them in reverse order, so no step always follows the same one."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(rounds):
        order = list(steps.items())
        for name, step in order[::-1] if round_ % 2 else order:
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median of the per-round ratios: each pair ran back to back, under the same load."""
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def spread(values: list[float]) -> float:
    """Relative interquartile range of a set of timings: how noisy the machine was."""
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / statistics.median(values)


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in {_STATUS}")


def peak_mb(run: Callable[[], None], device: torch.device) -> float:
    """MiB allocated at the peak of `run()` above what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = _status_kib("VmRSS")
    _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
    run()
    return (_status_kib("VmHWM") - before) / 1024
