"""Celery tasks: thin. A task takes ids, never objects; PostgreSQL decides who trains."""

import os

from celery import shared_task

from workers.training import execute_run


@shared_task(name="peftlab.train_run", ignore_result=True, bind=True)
def train_run(self, run_id: int) -> str:
    worker = f"{self.request.hostname or 'local'}:{os.getpid()}"
    return execute_run(run_id, worker=worker)


@shared_task(name="peftlab.playground_answer", ignore_result=True)
def playground_answer(prompt_id: int) -> str:
    from workers.playground import answer_prompt

    return answer_prompt(prompt_id)
