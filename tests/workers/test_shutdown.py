"""A worker told to stop (SIGTERM, as docker stop and Kubernetes do) checkpoints its run
after the step in flight and hands it back; another worker resumes it there. And a run on
two ranks survives a kill -9 of one rank: lost, sent again, resumed, nothing duplicated."""

import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.workers.test_faults import (
    RUN_QUEUE,
    Processes,
    _assert_complete_once,
    _queued_run,
    _status,
    _wait_for,
)
from webapp.celery import app as celery_app
from webapp.experiments import queue
from webapp.experiments.models import Artifact, Run, RunStatus

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def processes(tmp_path):
    started = Processes(tmp_path)
    yield started
    started.stop_all()


@pytest.fixture(autouse=True)
def _empty_queues():
    with celery_app.connection_for_write() as conn:
        for name in (RUN_QUEUE, queue.run_queue("any", 2)):
            conn.default_channel.queue_declare(name, durable=True, auto_delete=False)
            conn.default_channel.queue_purge(name)


def _send(run: Run) -> None:
    queue.enqueue_run(run.id, queue.run_queue(run.gpu_class, run.devices))


def test_sigterm_checkpoints_the_run_and_another_worker_resumes_it(cast, processes):
    steps = 300
    run = _queued_run(cast, steps=steps, checkpoint_every=1000)  # no periodic checkpoint
    worker = processes.worker()
    _send(run)
    _wait_for(lambda: _status(run).step >= 30, "step 30", processes)
    asked = time.monotonic()
    os.kill(worker.pid, signal.SIGTERM)  # the main process, as docker stop does
    worker.wait(timeout=60)
    drained_s = time.monotonic() - asked
    assert drained_s < 30, processes.logs()
    run = _status(run)
    assert run.status == RunStatus.LOST and "shut down" in run.error, processes.logs()
    stopped_at = int(re.search(r"after step (\d+)", run.error).group(1))
    assert Artifact.objects.filter(run=run, kind="checkpoint").exists()

    restarted = processes.worker(name="restarted")
    _wait_for(lambda: _status(run).is_finished, "the resumed run to finish", processes)
    _assert_complete_once(run, steps)
    assert run.attempt == 2
    resumed = re.findall(r"resumed from step (\d+)", Path(restarted.log_path).read_text())
    assert resumed == [str(stopped_at)], processes.logs()
    print(f"\nSIGTERM at step ~{stopped_at}: drained in {drained_s:.1f} s, resumed there")


def test_kill_9_of_one_rank_loses_the_run_and_it_resumes(cast, processes):
    steps = 200
    run = _queued_run(cast, steps=steps, checkpoint_every=20)
    Run.objects.filter(id=run.id).update(
        devices=2, train_config={**run.train_config, "batch_size": 4}
    )
    run.refresh_from_db()
    queues = ",".join(queue.worker_queues("any", 2))  # a worker with two devices
    command = ["-m", "celery", "-A", "webapp", "worker", "-Q", queues, "--concurrency", "1"]
    command += ["--prefetch-multiplier", "1", "--without-gossip", "--without-mingle"]
    worker = processes.start("worker", [*command, "-n", "two@%h", "-l", "info"], {})
    processes.reaper()
    _send(run)
    _wait_for(
        lambda: _status(run).step >= 30 and Artifact.objects.filter(run=run, kind="checkpoint"),
        "a checkpoint on two ranks",
        processes,
    )
    commands = {
        p: " ".join(p.cmdline()) for p in psutil.Process(worker.pid).children(recursive=True)
    }
    ranks = [
        p
        for p, line in commands.items()
        if "workers.ranks" in line and "torch.distributed" not in line
    ]
    assert len(ranks) == 2, processes.logs()
    ranks[-1].kill()
    # Lost once its lease lapses, sent again, resumed: the LOST spell may be too short to
    # poll, so the log and the attempt count tell it.
    _wait_for(lambda: _status(run).is_finished, "the resumed run to finish", processes)
    _assert_complete_once(run, steps)
    assert run.attempt == 2 and "lost: worker" in run.log, processes.logs()
    assert "resumed from step" in run.log, processes.logs()
