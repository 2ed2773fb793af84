"""Graceful shutdown: SIGTERM to a worker checkpoints its run and sends it back to the queue.

Celery's answer to SIGTERM (docker stop, systemd, Kubernetes) is a warm shutdown: stop taking
tasks and wait for the running ones, here a whole training. Instead:

    SIGTERM → the worker's main process (worker_shutting_down) sends SIGUSR2 to its pool
    processes and their torchrun ranks → each sets DRAINING → the training loop stops before
    its next step (peft_core: should_stop), stores a checkpoint of the last finished step
    (Callbacks.checkpoint_on_stop) → the run is released as lost under its fence
    (leases.run_release) and queued again → the process exits; the next worker resumes it
    from that step, nothing trained twice and nothing lost.

A step in flight finishes first; a checkpoint is a few MB for an adapter, so a worker drains
in seconds (tests/workers/test_faults.py measures it), inside the 30 s that Docker and
Kubernetes allow before SIGKILL. A SIGKILL is what the lease and the reaper are for.
"""

import logging
import os
import signal
import threading

import psutil
from celery.signals import worker_process_init, worker_shutting_down

logger = logging.getLogger(__name__)

DRAINING = threading.Event()


def _drain(*_args) -> None:
    DRAINING.set()


def listen() -> None:
    """Take SIGUSR2 as "drain": in a pool process, a rank, or a solo worker. (Not SIGUSR1:
    Celery's pool processes take that as the soft time limit.)"""
    signal.signal(signal.SIGUSR2, _drain)


@worker_process_init.connect
def _pool_process_started(**_kwargs) -> None:
    listen()


@worker_shutting_down.connect
def _worker_stopping(sig=None, how=None, exitcode=None, **_kwargs) -> None:
    """In the worker's main process: tell every descendant (pool processes, torchrun ranks)."""
    DRAINING.set()  # a solo pool trains in this process
    try:
        descendants = psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return
    for process in descendants:
        try:
            process.send_signal(signal.SIGUSR2)
        except psutil.Error:
            pass
    if descendants:
        logger.warning("%s: asked %d processes to checkpoint and stop", sig, len(descendants))
