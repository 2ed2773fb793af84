"""The work the web side hands to workers, by name: it never imports `workers`.

Each task is declared in `workers/tasks.py` with one of these names; the web enqueues it
with `app.send_task` once its transaction commits, so a worker never sees a row that a
rolled-back request wrote. Which queue a name goes to is `route`'s answer (settings point
Celery's task_routes at it): a run to the training workers, a playground prompt and a
merged export to the lighter workers that load a model for a moment.
"""

from functools import partial

from django.db import transaction

from webapp.celery import app

TRAIN_RUN = "peftlab.train_run"
PLAYGROUND_ANSWER = "peftlab.playground_answer"
MERGED_EXPORT = "peftlab.merged_export"
MODEL_INSPECT = "peftlab.model_inspect"

TRAINING_QUEUE = "gpu"
# A model's inspection builds it on the meta device (seconds, no weights): the light queue.
QUEUES = {
    TRAIN_RUN: TRAINING_QUEUE,
    PLAYGROUND_ANSWER: "playground",
    MERGED_EXPORT: "export",
    MODEL_INSPECT: "playground",
}


def route(name: str, *args, **kwargs) -> dict | None:
    """Celery's router: the queue of a task by its name (None: Celery's default queue)."""
    queue = QUEUES.get(name)
    return {"queue": queue} if queue else None


def enqueue(name: str, object_id: int) -> None:
    """Send the task now: the reaper's resend of a run already committed."""
    app.send_task(name, args=(object_id,))


def enqueue_on_commit(name: str, object_id: int) -> None:
    """Send the task once the current transaction commits (at once outside one)."""
    transaction.on_commit(partial(enqueue, name, object_id))
