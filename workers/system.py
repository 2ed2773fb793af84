"""System metrics and lineage of a training run, taken on the worker that trains it.

`SystemSampler` is a thread beside the lease thread. Every SYSTEM_METRICS_EVERY_S it samples
the training process tree (this worker process and its descendants: torchrun and its ranks
when a run spans several GPUs) for CPU % and RSS, and each GPU the run uses, where NVML
answers, for utilisation, memory used and power. The figures are stored as the run's metrics
(`sys/cpu_percent`, `sys/rss_mib`, `sys/gpu<i>/util_percent`, `…/mem_mib`, `…/power_w`)
through `metrics_record`, under the run's fence, keyed by the training step reached. A series
keeps one point per step (MetricPoint is unique on run, key, step), so a sample is taken only
once the step has moved: a load or an evaluation longer than the period is one sample whose
CPU % is the average over all of it, never a point dropped as a duplicate.

`run_lineage` is what the run records when a worker claims it: package versions, CUDA and the
driver, the code's git commit, the GPUs, the host, the seed and the hashes of its base model
and dataset (the keys: webapp/experiments/lineage.py).
"""

import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection

from peft_core.catalogue import CATALOGUE
from peft_core.train import TrainConfig
from webapp.experiments import metrics, selectors
from webapp.experiments.leases import StaleFenceError
from webapp.experiments.metrics import Point
from webapp.experiments.models import Dataset, Run
from workers.models import CATALOGUE_SOURCE, weights_of

logger = logging.getLogger(__name__)

MIB = 2**20
MIN_CPU_WINDOW_S = 0.1  # a CPU % over a shorter interval says nothing; it is left out
# The first sample comes this soon (while the model loads), so that a run shorter than the
# period, or one whose last step only another process sees (torchrun's rank 0), has one.
FIRST_SAMPLE_S = 2.0
DB_DOWN = (OperationalError, InterfaceError)


class ProcessTree:
    """CPU % and RSS of a process and all its descendants, from one sample to the next.

    CPU % is CPU seconds over wall seconds since the previous sample, summed over the tree
    (100 = one core busy, as top counts). A process born since then counts all its CPU time;
    one that ended since then loses its last interval's. RSS is summed as well, so pages that
    processes share count once per process.
    """

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self._cpu, _ = self._read()
        self._at = time.monotonic()

    def _read(self) -> tuple[dict[tuple[int, float], float], int]:
        cpu, rss = {}, 0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    cpu[(process.pid, process.create_time())] = times.user + times.system
                    rss += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # ended while the tree was read (a zombie too), or not ours to read
        return cpu, rss

    def sample(self) -> dict[str, float]:
        cpu, rss = self._read()
        now = time.monotonic()
        figures = {"sys/rss_mib": rss / MIB}
        if now - self._at >= MIN_CPU_WINDOW_S:
            used = sum(seconds - self._cpu.get(key, 0.0) for key, seconds in cpu.items())
            figures["sys/cpu_percent"] = 100.0 * max(used, 0.0) / (now - self._at)
            self._cpu, self._at = cpu, now
        return figures


@functools.cache
def _nvml():
    """pynvml, initialised once per process; None where NVML is absent (no NVIDIA driver
    here, or the package missing): then there are no GPU figures, and nothing fails."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, …
        logger.debug("no NVML: %s", exc)
        return None
    return pynvml


def gpu_handles(limit: int | None = None) -> list:
    """NVML handles of the GPUs this worker's runs use, in CUDA's order: CUDA_VISIBLE_DEVICES
    (indices or GPU-… UUIDs) when set, else every GPU; at most `limit` of them."""
    nvml = _nvml()
    if nvml is None:
        return []
    visible = settings.CUDA_VISIBLE_DEVICES
    try:
        if visible is None:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        else:
            handles = _visible_handles(nvml, visible)
    except nvml.NVMLError as exc:
        logger.warning("NVML could not list the GPUs: %s", exc)
        return []
    return handles[:limit]


def _visible_handles(nvml, visible: str) -> list:
    """CUDA_VISIBLE_DEVICES read as CUDA reads it: up to the first entry it cannot use. An
    index is NVML's, in PCI bus order: CUDA's too with CUDA_DEVICE_ORDER=PCI_BUS_ID, and on a
    host of one GPU model either way; UUIDs name a GPU whatever the order."""
    handles = []
    for entry in (part.strip() for part in visible.split(",")):
        try:
            if entry.isdigit():
                handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
            elif entry.startswith("GPU-"):
                handles.append(nvml.nvmlDeviceGetHandleByUUID(entry))
            else:
                break  # "-1", "" or a MIG instance: none (more) that NVML names this way
        except nvml.NVMLError:
            break
    return handles


def gpu_sample(handles: list) -> dict[str, float]:
    """Utilisation %, memory used (MiB) and power (W) of each GPU; a figure a board does not
    report (power on some, utilisation under MIG) is left out."""
    nvml = _nvml()
    figures: dict[str, float] = {}
    for index, handle in enumerate(handles):
        readings = (
            ("util_percent", nvml.nvmlDeviceGetUtilizationRates, lambda r: r.gpu),
            ("mem_mib", nvml.nvmlDeviceGetMemoryInfo, lambda r: r.used / MIB),
            ("power_w", nvml.nvmlDeviceGetPowerUsage, lambda r: r / 1000.0),  # mW
        )
        for name, read, value in readings:
            try:
                figures[f"sys/gpu{index}/{name}"] = float(value(read(handle)))
            except nvml.NVMLError:
                continue
    return figures


class SystemSampler(threading.Thread):
    """Samples the system every `every_s` and stores the figures under the run's fence.

    It has its own database connection (as the lease thread has) and keeps its samples while
    the database is away; once the run is no longer this worker's it stops. `stop()` takes a
    last sample, at the step the run ended on, while the run is still ours.
    """

    def __init__(
        self, run_id: int, fence: int, every_s: float, step_of: Callable[[], int], gpus: int = 8
    ) -> None:
        super().__init__(name=f"system-run-{run_id}", daemon=True)
        self.run_id, self.fence, self.every_s, self.step_of = run_id, fence, every_s, step_of
        self.tree = ProcessTree(os.getpid())
        self.gpus = gpu_handles(limit=gpus)
        self.points: list[Point] = []
        self.last_step: int | None = None
        self.lost = False
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # the thread's samples and stop()'s last one

    def run(self) -> None:
        wait_s = min(self.every_s, FIRST_SAMPLE_S)
        try:
            while not self._stopped.wait(wait_s) and self._take_safely():
                wait_s = self.every_s
        finally:
            connection.close()

    def _take_safely(self) -> bool:
        """take(), where a failure to sample ends the sampling, never the run."""
        try:
            return self.take()
        except Exception:
            logger.exception("run %s: system metrics stopped", self.run_id)
            return False

    def take(self) -> bool:
        """Sample if the step moved, then store what is kept; False once the run is not ours."""
        with self._lock:
            step = max(self.step_of(), self._stored_step())
            if step != self.last_step:
                self.last_step, now = step, time.time()
                figures = self.tree.sample() | gpu_sample(self.gpus)
                self.points += [Point(key, step, value, now) for key, value in figures.items()]
            if not self.points:
                return True
            try:
                metrics.metrics_record(run_id=self.run_id, fence=self.fence, points=self.points)
            except StaleFenceError:
                self.lost = True
                return False
            except DB_DOWN as exc:
                logger.warning("run %s: system metrics kept, database away: %s", self.run_id, exc)
                reset_connection()
                return True
            self.points = []
            return True

    def _stored_step(self) -> int:
        """The step the run's row records: where the training loop reports to the database
        from another process (rank 0 of a torchrun group), this process's count stays 0."""
        try:
            return Run.objects.filter(id=self.run_id).values_list("step", flat=True).first() or 0
        except DB_DOWN:
            return 0  # the sample is kept with the step known here, written later

    def stop(self) -> None:
        """End the sampling with a last sample; a second call does nothing."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.is_alive():
            self.join(timeout=30)
        if not self.lost:
            self._take_safely()


def sampler_start(run: Run, fence: int, step_of: Callable[[], int]) -> SystemSampler:
    """A started SystemSampler for the run (its devices' GPUs), every SYSTEM_METRICS_EVERY_S."""
    every_s = settings.SYSTEM_METRICS_EVERY_S
    sampler = SystemSampler(run.id, fence, every_s, step_of, gpus=run.devices)
    sampler.start()
    return sampler


def reset_connection() -> None:
    """Drop a broken connection so that the next query opens a new one."""
    try:
        connection.close()
    except DB_DOWN:
        pass


# ---- lineage -------------------------------------------------------------------------------


def run_lineage(run: Run) -> dict:
    """What the run trains with, as this worker finds it at claim."""
    return (
        software_versions()
        | gpu_lineage(run.devices)
        | {"git_sha": git_sha(), "host": socket.gethostname(), "devices": run.devices}
        | {"seed": _seed(run.train_config)}
        | base_model_lineage(run)
        | dataset_lineage(run.dataset)
    )


def software_versions() -> dict:
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "peft_core": _package_version("peftlab"),
    }
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def gpu_lineage(devices: int) -> dict:
    """The GPUs the run uses (the first `devices` this worker sees), or "cpu"."""
    handles = gpu_handles(limit=devices)
    if not handles:
        if torch.cuda.is_available():  # CUDA without NVML: nothing to name them by
            return {
                "gpu": "unknown (no NVML)",
                "gpu_count": min(devices, torch.cuda.device_count()),
            }
        return {"gpu": "cpu", "gpu_count": 0}
    nvml = _nvml()
    lineage = {"gpu": "unknown", "gpu_count": len(handles)}
    try:
        names = [_text(nvml.nvmlDeviceGetName(handle)) for handle in handles]
        lineage["gpu"] = ", ".join(dict.fromkeys(names))
        lineage["driver"] = _text(nvml.nvmlSystemGetDriverVersion())
    except nvml.NVMLError as exc:
        logger.warning("NVML could not name the GPUs or the driver: %s", exc)
    return lineage


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@functools.cache
def git_sha() -> str:
    """The code's commit: PEFTLAB_GIT_SHA, else git's HEAD when BASE_DIR is a checkout, else
    "unknown". Asked once per process, as the code it runs was read when it started."""
    if settings.GIT_SHA:
        return settings.GIT_SHA
    if not (Path(settings.BASE_DIR) / ".git").exists():
        return "unknown"
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=settings.BASE_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return found.stdout.strip() or "unknown"


def _seed(train_config: dict) -> int | None:
    try:
        return TrainConfig(**train_config).seed  # the default when the run names none
    except (TypeError, ValueError):
        return train_config.get("seed")


def base_model_lineage(run: Run) -> dict:
    """Where the base model's weights come from: a registered model's commit and content
    hash; a bundled one's source and its package's version."""
    weights = weights_of(run.base_model, run.base_weights)
    lineage = {"base_model": weights.get("name") or run.base_model}
    if weights["source"] != CATALOGUE_SOURCE:
        lineage["base_source"] = f"{weights['source']}:{weights['location']}"
        revision = weights.get("commit") or weights.get("revision")
        if revision:
            lineage["base_revision"] = revision
        if weights.get("content_sha256"):
            lineage["base_sha256"] = weights["content_sha256"]
        return lineage
    spec = CATALOGUE.get(weights["location"])
    if spec is None:
        return lineage | {"base_source": weights["location"]}
    lineage["base_source"] = spec.source
    if spec.source_kind != "tiny":  # a package's files: its version names them
        lineage["base_revision"] = f"{spec.source_detail} {_package_version(spec.source_detail)}"
    return lineage


def dataset_lineage(dataset: Dataset) -> dict:
    """An upload's sha256 (of the file as uploaded, and of its stored rows); a built-in's is
    that of its rows as JSON lines, the bytes its download gives."""
    if dataset.is_builtin:
        rows = selectors.dataset_jsonl(dataset=dataset)
        return {"dataset_sha256": hashlib.sha256(rows).hexdigest()}
    return {"dataset_sha256": dataset.sha256, "dataset_file_sha256": dataset.file_sha256}
