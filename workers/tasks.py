"""Celery tasks: thin. A task takes ids, never objects; PostgreSQL decides who trains.

Each is declared under the name the web side sends (webapp.experiments.queue): the web
never imports this module, and the arrow points one way, from workers to webapp services.
"""

import os

from celery import shared_task

from webapp.experiments import queue
from workers.training import execute_run


@shared_task(name=queue.TRAIN_RUN, ignore_result=True, bind=True)
def train_run(self, run_id: int) -> str:
    worker = f"{self.request.hostname or 'local'}:{os.getpid()}"
    return execute_run(run_id, worker=worker)


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
