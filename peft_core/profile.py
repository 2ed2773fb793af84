"""Measure what a trained adapter costs and gives: the numbers behind the trade-off table.

inference_latency(model, batch)   median ms of a forward pass: base (adapter disabled),
                                  adapter unmerged, and merged where the method merges
merged_privately(model)           the adapter merged into private copies of the base
                                  weights: the model's own weights are never written
MemoryTracker                     peak CUDA memory on a GPU, peak RSS growth on a CPU
sample_generations(...)           greedy answers of the base model and of the adapter
"""

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psutil
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peft_core import model as peft_model
from peft_core.data import prompt_ids

LATENCY_REPEATS = 5


@torch.no_grad()
def _median_forward_ms(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> float:
    model(**batch)  # warm-up: first calls allocate and pick kernels
    timings = []
    for _ in range(repeats):
        _synchronize()
        started = time.perf_counter()
        model(**batch)
        _synchronize()
        timings.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(timings)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def inference_latency(
    model: nn.Module, batch: dict[str, torch.Tensor], *, repeats: int = LATENCY_REPEATS
) -> dict[str, float]:
    """{"base_ms", "adapter_ms", "merged_ms" (mergeable methods only)}, interleaved rounds."""
    was_training = model.training
    model.eval()
    # A quantised base cannot take a merge (its weights are packed): no merged timing.
    quantized = bool(getattr(model, "is_quantized", False))
    mergeable = peft_model.method_of(model).mergeable and not quantized
    rounds: dict[str, list[float]] = {"base_ms": [], "adapter_ms": [], "merged_ms": []}
    for _ in range(repeats):
        with peft_model.disabled(model):
            rounds["base_ms"].append(_median_forward_ms(model, batch, 1))
        rounds["adapter_ms"].append(_median_forward_ms(model, batch, 1))
        if mergeable:
            with merged_privately(model):
                rounds["merged_ms"].append(_median_forward_ms(model, batch, 1))
    model.train(was_training)
    return {key: statistics.median(values) for key, values in rounds.items() if values}


@contextmanager
def merged_privately(model: nn.Module) -> Iterator[nn.Module]:
    """The adapter merged into clones of the base weights it touches, for the `with` block.

    On exit the layers get their own weight tensors back, bit for bit: merge + unmerge in
    place rounds, and the worker's base model shares its weights with the cached one
    (workers.cache), which nothing may write into.
    """
    method = peft_model.method_of(model)
    bases = [m.base_layer for m in model.modules() if isinstance(m, method.layer_types)]
    originals = [dict(base.named_parameters(recurse=False)) for base in bases]
    for base, params in zip(bases, originals, strict=True):
        for name, param in params.items():
            setattr(base, name, nn.Parameter(param.detach().clone(), requires_grad=False))
    peft_model.merge(model)
    try:
        yield model
    finally:
        peft_model.unmerge(model)  # the layers' merged flags and state
        for base, params in zip(bases, originals, strict=True):
            for name, param in params.items():
                setattr(base, name, param)


class MemoryTracker:
    """Peak memory while training: CUDA's own peak counter, or sampled RSS growth on a CPU."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.process = psutil.Process()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.start_bytes = self._current()
        self.peak_bytes = self.start_bytes

    def _current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        return self.process.memory_info().rss

    def sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._current())

    def peak_mb(self) -> float:
        """Peak above the starting point, in MiB (on CUDA the peak allocated tensor memory)."""
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        self.sample()
        return (self.peak_bytes - self.start_bytes) / 2**20


@torch.no_grad()
def sample_generations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict],
    *,
    max_new_tokens: int = 32,
) -> list[dict[str, str]]:
    """For a few prompts: the expected completion, the base model's and the adapter's answer."""
    was_training = model.training
    model.eval()
    samples = []
    for row in rows:
        prompt = row.get("prompt") or row.get("text", "")
        with peft_model.disabled(model):
            base = greedy_answer(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
        adapted = greedy_answer(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
        samples.append(
            {
                "prompt": prompt,
                "expected": row.get("completion", ""),
                "base": base,
                "adapter": adapted,
            }
        )
    model.train(was_training)
    return samples


@torch.no_grad()
def greedy_answer(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, *, max_new_tokens: int = 32
) -> str:
    """The model's greedy continuation of `prompt`, formatted as training formats prompts."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()
