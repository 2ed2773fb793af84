"""A CPU host's cores shared among the runs training on it.

torch gives every process as many threads as the host has cores. Two training workers on one
CPU host then run twice as many threads as there are cores, and OpenMP's threads wait on each
other at every barrier: on a 2-core machine two SmolLM2 runs at once each took 160-172 s for
30 steps that take 23-27 s alone (docs/BENCHMARKS.md, "Two runs at once on a CPU").

A run on a CPU instead takes its share: the host's cores divided by the processes training on
it (each running run whose worker is on this host counts its devices: a torchrun run has a
process per device), never more than the process started with (torchrun starts its ranks at
one thread). The share is read again every SHARE_EVERY_S, so a run that started alone gives
cores back when a second one starts, and takes them again when it ends. It is set from the
training thread: OpenMP's thread count belongs to the thread that sets it.
"""

import logging
import os
import socket
import time

import torch

from webapp.experiments.models import Run, RunStatus
from workers.system import DB_DOWN, reset_connection

logger = logging.getLogger(__name__)

SHARE_EVERY_S = 5.0


def host_of(worker: str) -> str:
    """The host of a run's worker, "gpu@host:pid" (a Celery node name and a process)."""
    return worker.rpartition(":")[0].rpartition("@")[2]


def training_here() -> tuple[int, int]:
    """The runs training on this host and their processes (a run counts its devices)."""
    here = socket.gethostname()
    running = Run.objects.filter(status=RunStatus.RUNNING).values_list("worker", "devices")
    mine = [devices for worker, devices in running if host_of(worker) == here]
    return len(mine), sum(max(1, devices) for devices in mine)


def threads_for(cores: int, processes: int, ceiling: int) -> int:
    """One process's share of `cores` among `processes`, at least 1, at most `ceiling`."""
    return max(1, min(ceiling, cores // max(1, processes)))


class CpuShare:
    """Keeps this process's torch threads at its share of the host (module docstring).

    `update()` from the training thread, as often as wanted (it reads the database every
    SHARE_EVERY_S at most); `restore()` when the run ends, for the worker's next run."""

    def __init__(self, cores: int | None = None) -> None:
        self.cores = cores or os.cpu_count() or 1
        self.ceiling = torch.get_num_threads()
        self._read_at = -float("inf")

    def update(self, *, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        if now - self._read_at < SHARE_EVERY_S:
            return torch.get_num_threads()
        self._read_at = now
        try:
            _, processes = training_here()
        except DB_DOWN as exc:  # keep the share it has: a thread count never fails a run
            logger.warning("CPU share not read, database away: %s", exc)
            reset_connection()
            return torch.get_num_threads()
        threads = threads_for(self.cores, processes, self.ceiling)
        if threads != torch.get_num_threads():
            logger.info(
                "%d process(es) training on this host's %d cores: %d thread(s) for this run",
                processes, self.cores, threads,
            )  # fmt: skip
            torch.set_num_threads(threads)
        return threads

    def restore(self) -> None:
        if torch.get_num_threads() != self.ceiling:
            torch.set_num_threads(self.ceiling)
