"""Celery tasks: thin. A task takes ids, never objects; PostgreSQL decides who trains.

Each is declared under the name the web side sends (webapp.experiments.queue): the web
never imports this module, and the arrow points one way, from workers to webapp services.
"""

import logging
import os

from celery import shared_task

from webapp.experiments import leases, queue
from workers.training import execute_run

logger = logging.getLogger(__name__)
MAX_TURN_TRIES = 20  # runs another worker claimed first, before this message is spent


@shared_task(name=queue.TRAIN_RUN, ignore_result=True, bind=True)
def train_run(self, run_id: int) -> str:
    """Train the run that goes next in the fair order of the message's queue: the message
    is a turn of that queue, not a claim on run `run_id` (whose turn comes with another)."""
    worker = f"{self.request.hostname or 'local'}:{os.getpid()}"
    run_queue = (self.request.delivery_info or {}).get("routing_key") or ""
    if queue.run_queue_parts(run_queue) is None:  # sent outside a run queue (eager, tests)
        return execute_run(run_id, worker=worker)
    tried: list[int] = []
    while len(tried) < MAX_TURN_TRIES:
        chosen = leases.run_next_fair(queue=run_queue, exclude=tried)
        if chosen is None:
            logger.info(
                "run %s is not waiting for a worker (a duplicate, a cancel) or its team is at "
                "its device limit; no other run of %s may start now",
                run_id,
                run_queue,
            )
            return "nothing waiting"
        status = execute_run(chosen, worker=worker)
        if status != "skipped":  # not taken by another worker in between: trained
            _send_held(chosen)
            return status
        tried.append(chosen)
    return "skipped"


def _send_held(run_id: int) -> None:
    """A turn for the team's next run, if its device limit held that run back."""
    held = leases.run_held_after(run_id=run_id)
    if held is not None:
        queue.enqueue_run(*held)


@shared_task(name=queue.PLAYGROUND_ANSWER, ignore_result=True)
def playground_answer(prompt_id: int) -> str:
    from workers.playground import answer_prompt

    return answer_prompt(prompt_id)


@shared_task(name=queue.MERGED_EXPORT, ignore_result=True)
def merged_export(export_id: int) -> str:
    from workers.exports import build_merged_export

    return build_merged_export(export_id)


@shared_task(name=queue.MODEL_INSPECT, ignore_result=True)
def model_inspect(model_id: int) -> str:
    from workers.inspection import inspect_registered_model

    return inspect_registered_model(model_id)
