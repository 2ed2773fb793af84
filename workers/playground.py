"""The playground's answers: one prompt through the base model and each chosen adapter.

Each adapter is loaded into its own copy of the cached base model from the run's stored
files, so the answers are what a person gets who downloads the adapter. Greedy decoding, so
the same prompt gives the same answers again.
"""

import logging

import torch

import peft_core
from peft_core.data import label_names
from peft_core.profile import greedy_answer
from webapp.experiments import artifacts, services
from webapp.experiments.models import ArtifactKind, PlaygroundPrompt, Run
from workers.cache import base_model_copy
from workers.models import weights_of
from workers.training import DEVICE, dataset_rows

logger = logging.getLogger(__name__)


def answer_prompt(prompt_id: int) -> str:
    if not services.playground_claim(prompt_id=prompt_id):
        return "skipped"
    prompt = PlaygroundPrompt.objects.get(id=prompt_id)
    try:
        answers = _answers(prompt)
    except Exception as exc:
        logger.exception("playground prompt %s failed", prompt_id)
        services.playground_finish(prompt_id=prompt_id, error=f"{type(exc).__name__}: {exc}")
        return "failed"
    services.playground_finish(prompt_id=prompt_id, answers=answers)
    return "done"


def _answers(prompt: PlaygroundPrompt) -> dict[str, dict]:
    runs = list(prompt.runs.select_related("dataset").order_by("id"))
    # The prompt's runs share one base model (playground_create); they recorded its weights.
    weights = weights_of(prompt.base_model, runs[0].base_weights if runs else None)
    if prompt.task == "causal-lm":
        base, tokenizer = base_model_copy(weights, prompt.task, 2)
        answers = {"base": {"text": _generate(base.to(DEVICE), tokenizer, prompt)}}
        for run in runs:
            model, tokenizer = base_model_copy(weights, prompt.task, 2)
            model = _with_adapter(model, run).to(DEVICE)
            answers[str(run.id)] = {"text": _generate(model, tokenizer, prompt)}
        return answers
    # Classification: the base model has no trained head, so only the adapters answer.
    answers = {}
    for run in runs:
        labels = run.dataset.label_names or label_names(dataset_rows(run.dataset)[0])
        model, tokenizer = base_model_copy(weights, prompt.task, len(labels))
        model = _with_adapter(model, run).to(DEVICE)
        answers[str(run.id)] = _classify(model, tokenizer, prompt.text, labels)
    return answers


def _with_adapter(model, run: Run):
    files = artifacts.artifact_files(run_id=run.id, kind=ArtifactKind.ADAPTER)
    return peft_core.load_adapter_files(model, files)


def _generate(model, tokenizer, prompt: PlaygroundPrompt) -> str:
    model.eval()
    return greedy_answer(model, tokenizer, prompt.text, max_new_tokens=prompt.max_new_tokens)


@torch.no_grad()
def _classify(model, tokenizer, text: str, labels: list[str]) -> dict:
    model.eval()
    inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=512).to(DEVICE)
    probabilities = model(**inputs).logits[0].float().softmax(-1).tolist()
    scores = dict(zip(labels, probabilities, strict=True))
    return {"label": max(scores, key=scores.get), "scores": scores}
