"""The playground's answers: one prompt through the base model and each chosen adapter.

Each adapter is loaded into its own copy of the cached base model from the run's stored
files, so the answers are what a person gets who downloads the adapter. Greedy decoding, so
the same prompt gives the same answers again.
"""

import logging
import tempfile
from pathlib import Path

import torch

import peft_core
from peft_core.data import label_names
from peft_core.pretrained import load_directory
from peft_core.profile import greedy_answer
from peft_core.registry import whole_model
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
            model, tokenizer = _trained(weights, run, prompt.task, 2)
            answers[str(run.id)] = {"text": _generate(model, tokenizer, prompt)}
        return answers
    # Classification: the base model has no trained head, so only the adapters answer.
    answers = {}
    for run in runs:
        labels = run.dataset.label_names or label_names(dataset_rows(run.dataset)[0])
        model, tokenizer = _trained(weights, run, prompt.task, len(labels))
        answers[str(run.id)] = _classify(model, tokenizer, prompt.text, labels)
    return answers


def _trained(weights: dict, run: Run, task: str, num_labels: int):
    """The run's trained model on this worker's device, from its stored (checked) files: the
    adapter on a copy of the cached base, or a fully fine-tuned run's whole model."""
    files = artifacts.artifact_files(run_id=run.id, kind=ArtifactKind.ADAPTER)
    if whole_model(run.method):
        with tempfile.TemporaryDirectory(prefix="peftlab-model-") as tmp:
            for name, data in files.items():
                (Path(tmp) / Path(name).name).write_bytes(data)
            model, tokenizer = load_directory(tmp, task, num_labels=num_labels)
        return model.to(DEVICE), tokenizer
    model, tokenizer = base_model_copy(weights, task, num_labels)
    return peft_core.load_adapter_files(model, files).to(DEVICE), tokenizer


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
