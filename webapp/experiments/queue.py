"""The work the web side hands to workers, by name: it never imports `workers`.

Each task is declared in `workers/tasks.py` with one of these names; the web enqueues it
with `app.send_task` once its transaction commits, so a worker never sees a row that a
rolled-back request wrote. Which queue a name goes to is `route`'s answer (settings point
Celery's task_routes at it): a playground prompt and a merged export to the lighter workers
that load a model for a moment. A run goes to the queue of what it needs, `run_queue`.

Run queues are named `gpu.<class>.x<devices>`: Celery sends a message to one queue, so a run
that needs 2 devices of any class goes to `gpu.any.x2`, and a worker of class a100 with 4
devices listens to every queue it can serve (`worker_queues`): `gpu.a100.x1` … `gpu.a100.x4`
and `gpu.any.x1` … `gpu.any.x4`.
"""

import re
from functools import partial

from django.db import transaction

from webapp.celery import app

TRAIN_RUN = "peftlab.train_run"
PLAYGROUND_ANSWER = "peftlab.playground_answer"
MERGED_EXPORT = "peftlab.merged_export"
MODEL_INSPECT = "peftlab.model_inspect"

ANY_CLASS = "any"
MAX_DEVICES = 8
GPU_CLASS_PATTERN = r"[a-z0-9-]{1,40}"
GPU_CLASS_RE = re.compile(rf"^{GPU_CLASS_PATTERN}$")
RUN_QUEUE_RE = re.compile(rf"^gpu\.({GPU_CLASS_PATTERN})\.x([1-8])$")
PLAYGROUND_QUEUE = "playground"
EXPORT_QUEUE = "export"
# A model's inspection builds it on the meta device (seconds, no weights): the light queue.
QUEUES = {
    PLAYGROUND_ANSWER: PLAYGROUND_QUEUE,
    MERGED_EXPORT: EXPORT_QUEUE,
    MODEL_INSPECT: PLAYGROUND_QUEUE,
}


def run_queue(gpu_class: str, devices: int) -> str:
    """The one queue a run that needs `devices` of `gpu_class` (or "any") is sent to."""
    if not GPU_CLASS_RE.match(gpu_class) or not 1 <= devices <= MAX_DEVICES:
        raise ValueError(f"no queue for {devices} devices of class {gpu_class!r}")
    return f"gpu.{gpu_class}.x{devices}"


def run_queue_parts(name: str) -> tuple[str, int] | None:
    """("a100", 4) for "gpu.a100.x4"; None for a queue that is not a run queue."""
    match = RUN_QUEUE_RE.match(name or "")
    return (match.group(1), int(match.group(2))) if match else None


def worker_queues(gpu_class: str, devices: int) -> list[str]:
    """Every run queue a worker with `devices` devices of `gpu_class` can serve: runs of its
    class or of any class, needing up to its device count."""
    classes = [gpu_class] if gpu_class == ANY_CLASS else [gpu_class, ANY_CLASS]
    return [run_queue(c, n) for c in classes for n in range(1, devices + 1)]


def route(name: str, *args, **kwargs) -> dict | None:
    """Celery's router: the queue of a task by its name (None: Celery's default queue, or
    the queue the sender named, as `enqueue_run` does)."""
    queue = QUEUES.get(name)
    return {"queue": queue} if queue else None


def enqueue(name: str, object_id: int) -> None:
    """Send the task now (a run: `enqueue_run`, its queue depends on the run)."""
    if name == TRAIN_RUN:
        raise ValueError("send a run with enqueue_run(run_id, run_queue(class, devices))")
    app.send_task(name, args=(object_id,))


def enqueue_on_commit(name: str, object_id: int) -> None:
    """Send the task once the current transaction commits (at once outside one)."""
    transaction.on_commit(partial(enqueue, name, object_id))


def enqueue_run(run_id: int, queue: str) -> None:
    """Send a run to its queue now: the reaper's resend of a run already committed."""
    app.send_task(TRAIN_RUN, args=(run_id,), queue=queue)


def enqueue_run_on_commit(run) -> None:
    """Send the run to the queue of what it needs once the current transaction commits."""
    transaction.on_commit(partial(enqueue_run, run.id, run_queue(run.gpu_class, run.devices)))
