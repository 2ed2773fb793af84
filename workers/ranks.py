"""A run over several devices: the worker that claimed it starts torchrun, which starts one
process per device running this module (`python -m workers.ranks <run id> <fence>`).

    Celery worker (claims the run, holds the lease, samples the system)
      └─ torchrun --standalone --nproc-per-node N   (its own process group)
           ├─ rank 0: trains its share; writes log, metrics, checkpoints, the adapter and the
           │          run's end under the fence; sees a cancel in its heartbeats
           └─ rank 1…N−1: train their shares (peft_core.distributed), write nothing

Every rank loads the same base, adapter initialisation and checkpoint (read back verified),
so all resume from the same step. The worker kills the whole group when its lease is lost
(the run went to another worker) and, when the group dies without rank 0 recording an end
(a rank killed, a machine fault), lets the lease lapse: the reaper marks the run lost and
sends it again, and the next attempt resumes from the last checkpoint, as after a kill -9
of a one-device worker.
"""

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

from peft_core.train import Callbacks
from workers import drain

logger = logging.getLogger(__name__)

POLL_S = 0.5


class Quiet(Callbacks):
    """A helper rank's callbacks: it reports nothing (rank 0 does)."""

    memory = None
    fence = 0

    def flush(self) -> None:
        pass

    def share_cores(self) -> None:
        pass  # torchrun starts a helper rank at one thread, its share already


def train_on_ranks(run, callbacks) -> str:
    """Train `run` on run.devices processes; returns what happened, as execute_run does."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={run.devices}", "-m", "workers.ranks",
        str(run.id), str(callbacks.fence),
    ]  # fmt: skip
    from workers.models import weights_directory, weights_of

    # A bundled model is converted into the cache here, once, not by every rank at once.
    weights_directory(weights_of(run.base_model, run.base_weights))
    callbacks.on_log(f"training on {run.devices} processes (torchrun, data parallel)")
    callbacks.flush()
    with tempfile.TemporaryFile(mode="w+") as output:
        group = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while group.poll() is None:
                if callbacks.lease is not None and callbacks.lease.lost:
                    if not _ended_by_rank_0(run, callbacks.fence):
                        _kill(group)  # another worker has the run now
                        return "stale"
                    _wait_or_kill(group, timeout=60)  # rank 0 ended it: the ranks are exiting
                time.sleep(POLL_S)
        except BaseException:  # the worker itself is stopping: take the ranks with it
            _kill(group)
            raise
        output.seek(0)
        tail = output.read()[-3000:]
    run.refresh_from_db(fields=["status", "fence"])
    if run.fence != callbacks.fence:
        return "released" if drain.DRAINING.is_set() else "stale"
    if run.is_finished:
        return run.status
    logger.warning(
        "run %s: the ranks exited with %s before the run ended; its lease will lapse and the "
        "reaper will send it again\n%s",
        run.id,
        group.returncode,
        tail,
    )
    if callbacks.lease is not None:
        callbacks.lease.stop()  # no more heartbeats: lost after one lease
    return "lost"


def _ended_by_rank_0(run, fence: int) -> bool:
    """Whether the lease was lost because rank 0 ended the run under our fence."""
    run.refresh_from_db(fields=["status", "fence"])
    return run.fence == fence and run.is_finished


def _wait_or_kill(group: subprocess.Popen, *, timeout: float) -> None:
    try:
        group.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(group)


def _kill(group: subprocess.Popen) -> None:
    try:
        os.killpg(group.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    group.wait()


def _peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank went away (gloo's
    "Connection closed by peer", an NCCL error): a fault of the machine, not of the run."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(mark in text for mark in ("Connection closed by peer", "gloo", "NCCL"))


def main(run_id: int, fence: int) -> int:
    """One rank: join the group, then train as the one-device path does."""
    import django

    django.setup()
    import torch

    from peft_core import distributed
    from webapp.experiments.leases import StaleFenceError
    from webapp.experiments.models import Run
    from workers import training

    drain.listen()  # SIGUSR2 from the worker shutting down: rank 0 checkpoints and releases
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = distributed.init_from_torchrun(device_type)
    training.DEVICE = str(device)
    here = distributed.world()
    try:
        run = Run.objects.select_related("dataset").get(id=run_id)
        if not here.is_main:
            training.train_run_body(run, Quiet())
            return 0
        callbacks = training.RunCallbacks(run_id, fence)
        try:
            training.train_run_body(run, callbacks)
        except StaleFenceError:
            logger.warning("run %s: no longer ours; rank 0 stops", run_id)
            return 1
        except Exception as exc:
            if _peer_lost(exc):  # another rank died: the run is lost, not failed
                logger.warning("run %s: a rank is gone (%s); rank 0 stops", run_id, exc)
                return 1
            logger.exception("run %s failed on rank 0", run_id)
            training.record_failure(callbacks, exc)
            return 1
        return 0
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
