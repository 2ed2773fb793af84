"""A CPU host's cores shared among the runs training on it (workers/cpu_share.py)."""

import socket

import pytest
import torch

from webapp.experiments.models import Run, RunStatus
from workers.cpu_share import SHARE_EVERY_S, CpuShare, host_of, threads_for, training_here


def test_a_share_is_the_cores_over_the_processes_within_bounds():
    assert threads_for(16, 1, 16) == 16
    assert threads_for(16, 2, 16) == 8
    assert threads_for(16, 3, 16) == 5
    assert threads_for(2, 3, 2) == 1  # never none
    assert threads_for(16, 2, 1) == 1  # never more than the process started with (torchrun)
    assert threads_for(16, 0, 16) == 16


def test_the_host_of_a_worker_is_its_celery_node_s():
    assert host_of("worker@gpu-box-3:4121") == "gpu-box-3"
    assert host_of("worker2@vm:77") == "vm"


@pytest.mark.django_db
def test_the_share_follows_the_runs_training_on_this_host(cast):
    here = socket.gethostname()

    def running(name, worker, devices=1):
        return Run.objects.create(
            project=cast.acme_project, name=name, created_by=cast.alice,
            base_model="tiny-llama", dataset=cast.datasets["sample-instructions"],
            method="lora", status=RunStatus.RUNNING, worker=worker, devices=devices,
        )  # fmt: skip

    before = torch.get_num_threads()
    share = CpuShare(cores=8)
    share.ceiling = 8  # as on an 8-core host, whatever this one has
    try:
        first = running("first", f"worker@{here}:1")
        running("elsewhere", "worker@another-host:1", devices=4)  # not this host's cores
        assert training_here() == (1, 1)
        assert share.update(now=0.0) == 8 == torch.get_num_threads()
        running("ranks", f"worker@{here}:2", devices=3)  # torchrun: a process per device
        assert training_here() == (2, 4)
        assert share.update(now=1.0) == 8  # read again only every SHARE_EVERY_S
        assert share.update(now=SHARE_EVERY_S) == 2 == torch.get_num_threads()
        first.status = RunStatus.SUCCEEDED
        first.save()
        assert share.update(now=2 * SHARE_EVERY_S) == 2  # 8 cores over the 3 ranks
        share.restore()
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)
