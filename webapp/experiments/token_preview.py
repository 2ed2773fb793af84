"""One dataset row as a model will train on it: its tokens, and which of them the loss learns.

The row goes through `peft_core.data.tokenize_rows` with the model's own tokenizer, exactly
as a worker does: the model's chat template where it has one (the prompt as the user's turn,
the completion as the assistant's), the prompt tokens masked out of the loss (label -100),
eos after the completion, truncation at max_length. So a person sees what the model learns
from before a GPU is spent on it.

Like the estimates (architecture.py), this loads transformers (and so torch) in the web
process on first use only; tokenizers are kept per directory. A bundled GGUF model that was
never converted has no tokenizer files yet: the preview says so.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from peft_core.catalogue import CATALOGUE, load_tokenizer, package_dir
from peft_core.data import IGNORE_INDEX, label_names, tokenize_rows
from webapp.experiments.heavy import transformers_ready
from webapp.experiments.models import Dataset
from webapp.experiments.selectors import dataset_preview
from webapp.registry.models import BaseModel, ModelSource
from webapp.registry.selectors import model_directory

MAX_LENGTH = 256


@dataclass(frozen=True)
class Token:
    text: str
    learned: bool  # the loss is computed on it


@dataclass(frozen=True)
class TokenPreview:
    tokens: list[Token]
    chat_template: bool
    task: str
    label: str = ""  # seq-cls: the class the example is labelled with

    @property
    def learned(self) -> int:
        return sum(token.learned for token in self.tokens)


class NoTokenizer(Exception):
    """The model's tokenizer files are not on this server yet."""


def tokenizer_directory(model: BaseModel) -> Path:
    """Where the model's tokenizer files are (NoTokenizer when nowhere yet)."""
    if model.source != ModelSource.CATALOGUE:
        directory = model_directory(model)
    else:
        spec = CATALOGUE[model.location]
        if spec.source_kind == "hf-package":
            found = package_dir(spec.source_detail)
            directory = found / "model" if found else None
        elif spec.source_kind == "tiny":
            from peft_core.catalogue import model_dir

            directory = model_dir(spec.key, cache_dir=settings.MODEL_CACHE_DIR)  # ~1 s, once
        else:
            directory = Path(settings.MODEL_CACHE_DIR) / "models" / spec.key
    if directory is None or not (directory / "tokenizer_config.json").is_file():
        raise NoTokenizer(model.name)
    return directory


@functools.lru_cache(maxsize=8)
def _tokenizer(directory: str, mtime_ns: int):
    transformers_ready()
    return load_tokenizer(Path(directory))


def token_preview(*, dataset: Dataset, model: BaseModel, max_length: int = MAX_LENGTH):
    directory = tokenizer_directory(model)
    mtime = (directory / "tokenizer_config.json").stat().st_mtime_ns
    tokenizer = _tokenizer(str(directory), mtime)
    rows = dataset_preview(dataset=dataset, limit=20)
    labels = dataset.label_names or (label_names(rows) if dataset.task == "seq-cls" else None)
    example = tokenize_rows(
        rows[:1], tokenizer, task=dataset.task, max_length=max_length, labels=labels
    )[0]
    if isinstance(example.labels, int):  # seq-cls: every token is read, the head learns
        tokens = [Token(tokenizer.decode([i]), False) for i in example.input_ids]
        return TokenPreview(tokens, False, dataset.task, label=str(labels[example.labels]))
    tokens = [
        Token(tokenizer.decode([token_id]), label != IGNORE_INDEX)
        for token_id, label in zip(example.input_ids, example.labels, strict=True)
    ]
    chat = bool(getattr(tokenizer, "chat_template", None)) and "prompt" in rows[0]
    return TokenPreview(tokens, chat, dataset.task)
