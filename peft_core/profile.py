"""Measure what a trained adapter costs and gives: the numbers behind the trade-off table.

inference_latency(model, batch)   ms of a forward pass: base (adapter disabled), adapter
                                  unmerged, merged where the method merges; interleaved
                                  rounds, ratios with their spread, impossible ones flagged
merged_privately(model)           the adapter merged into private copies of the base
                                  weights: the model's own weights are never written
MemoryTracker                     a training's peak memory: CUDA's counter on a GPU, the C
                                  allocator's bytes in use on a CPU
sample_generations(...)           greedy answers of the base model and of the adapter
"""

import ctypes
import inspect
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import psutil
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peft_core import model as peft_model
from peft_core.data import prompt_ids
from peft_core.decoding import greedy_completions

# Interleaved rounds of the latency figures: quick (after every run) and full (on request).
LATENCY_REPEATS = 9
FULL_LATENCY_REPEATS = 31
# Sample answers: new tokens beyond the longest expected answer (answer_budget).
ANSWER_MARGIN = 4
# Timings whose rounds spread by more than this (interquartile range over the median) were
# taken on a busy machine: shown, but flagged.
NOISY_SPREAD = 0.25


def _forward_ms(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    _synchronize()
    started = time.perf_counter()
    model(**batch)
    _synchronize()
    return (time.perf_counter() - started) * 1000.0


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def half_iqr(values: Sequence[float]) -> float:
    """Half the interquartile range: the ± a median is quoted with (half the range when
    there are too few values for quartiles)."""
    if len(values) < 4:
        return (max(values) - min(values)) / 2
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2


@contextmanager
def as_base(model: nn.Module, base: nn.Module | None = None) -> Iterator[nn.Module]:
    """The module to call for the base model's behaviour: `model` with its adapter disabled,
    or `base`, another copy of the base, for a model without an adapter to switch off (full
    fine-tuning)."""
    if base is not None:
        yield base
        return
    with peft_model.disabled(model):
        yield model


@torch.no_grad()
def inference_latency(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    repeats: int = LATENCY_REPEATS,
    base: nn.Module | None = None,
) -> dict:
    """Forward latency of the base (adapter disabled, or `base` for a fully fine-tuned
    model), the adapter unmerged, and merged where the method merges, measured in interleaved
    rounds (each round times every variant back to back, in a rotating order), so a change of
    load moves them together. The ratios to the base are medians of the per-round ratios,
    with half their interquartile range:

        base_ms, adapter_ms, merged_ms       medians of the rounds
        overhead ± overhead_spread           adapter / base
        merged_overhead ± merged_spread      merged / base (mergeable methods only)
        latency_spread                       the base's rounds: IQR over median
        latency_flags                        figures that cannot be true (latency_flags())
        same_architecture                    True for a fully fine-tuned model: the base's
                                             architecture with other weights (no adapter)

    The adapter is merged once, into private copies of the weights it touches, before the
    rounds; a merged round switches to those copies without moving a weight (_merged_switch).
    One untimed forward of the adapter first warms up what every variant runs (allocations,
    kernels chosen for the batch's shape): the base and the merged model run a subset of it.
    """
    was_training = model.training
    model.eval()
    if base is not None:
        base.eval()
    # A quantised base cannot take a merge (its weights are packed): no merged timing.
    quantized = bool(getattr(model, "is_quantized", False))
    mergeable = peft_model.method_of(model).mergeable and not quantized and base is None
    variants = ["base_ms", "adapter_ms"] + (["merged_ms"] if mergeable else [])
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    with _merged_switch(model) if mergeable else nullcontext(None) as use_merged:
        _forward_ms(model, batch)  # the warm-up
        for index in range(repeats):
            for name in variants[index % len(variants) :] + variants[: index % len(variants)]:
                if use_merged is not None:
                    use_merged(name == "merged_ms")
                if name == "base_ms":
                    with as_base(model, base) as plain:
                        rounds[name].append(_forward_ms(plain, batch))
                else:
                    rounds[name].append(_forward_ms(model, batch))
    model.train(was_training)
    figures: dict = {name: statistics.median(values) for name, values in rounds.items()}
    ratios = [a / b for a, b in zip(rounds["adapter_ms"], rounds["base_ms"], strict=True)]
    figures |= {"overhead": statistics.median(ratios), "overhead_spread": half_iqr(ratios)}
    if mergeable:
        merged = [a / b for a, b in zip(rounds["merged_ms"], rounds["base_ms"], strict=True)]
        figures |= {
            "merged_overhead": statistics.median(merged),
            "merged_spread": half_iqr(merged),
        }
    base_rounds = rounds["base_ms"]
    figures["latency_spread"] = 2 * half_iqr(base_rounds) / statistics.median(base_rounds)
    figures["latency_rounds"] = repeats
    if base is not None:
        figures["same_architecture"] = True
    figures["latency_flags"] = latency_flags(figures)
    return figures


@contextmanager
def _merged_switch(model: nn.Module) -> Iterator[Callable[[bool], None]]:
    """The adapter merged once into private copies of the weights it touches
    (merged_privately), and a switch, `use(merged)`, between the merged and the unmerged
    model that copies nothing: each adapter layer gets the base parameters and the `merged`
    flag of one side (the layer contract of peft_core.methods: a merged layer runs its base
    layer alone). The block starts unmerged; on exit merged_privately undoes its merge."""
    method = peft_model.method_of(model)
    layers = [m for m in model.modules() if isinstance(m, method.layer_types)]

    def parameters() -> list[dict[str, nn.Parameter]]:
        return [dict(layer.base_layer.named_parameters(recurse=False)) for layer in layers]

    unmerged = parameters()
    with merged_privately(model):
        merged, flags = parameters(), [layer.merged for layer in layers]

        def use(is_merged: bool) -> None:
            for layer, params, flag in zip(
                layers, merged if is_merged else unmerged, flags, strict=True
            ):
                for name, param in params.items():
                    setattr(layer.base_layer, name, param)
                layer.merged = flag and is_merged

        use(False)
        try:
            yield use
        finally:
            use(True)  # the state merged_privately made, for it to undo


def latency_flags(figures: dict) -> list[str]:
    """The latency figures that cannot be true as measured, each said in a sentence.

    An adapter computes more than its base, never less, so one measured faster beyond the
    spread was timed under a changing load. A merged model is the base model's architecture
    with other weights, so it runs at the base's speed: a difference beyond the spread (and
    2 %) is the machine's, not the method's."""
    flags = []
    overhead, spread = figures.get("overhead"), figures.get("overhead_spread", 0.0)
    if figures.get("same_architecture"):
        if overhead is not None and abs(overhead - 1.0) > spread + 0.02:
            flags.append(
                f"The fully fine-tuned model measured {overhead:.2f}× the base (± {spread:.2f}); "
                "it is the base model's architecture with other weights and runs at its "
                "speed. The machine's load moved the timings."
            )
    elif overhead is not None and overhead + spread < 1.0:
        flags.append(
            f"The adapter measured faster than the base ({overhead:.2f}× ± {spread:.2f}), "
            "which it cannot be: it computes more. The machine's load moved the timings."
        )
    merged, merged_spread = figures.get("merged_overhead"), figures.get("merged_spread", 0.0)
    if merged is not None and abs(merged - 1.0) > merged_spread + 0.02:
        flags.append(
            f"The merged model measured {merged:.2f}× the base (± {merged_spread:.2f}); a merged "
            "model is the base model's architecture and runs at its speed. The machine's load "
            "moved the timings."
        )
    if figures.get("latency_spread", 0.0) > NOISY_SPREAD:
        flags.append(
            f"The rounds spread by {figures['latency_spread']:.0%} of their median: the "
            "machine was busy while they ran."
        )
    return flags


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


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _heap_counter() -> Callable[[], int] | None:
    """Bytes the C allocator has handed out and not taken back (glibc's mallinfo2: small
    blocks in use plus mmapped blocks), or None where there is no such count. torch's CPU
    tensors are allocated through it, so this counts them as they come and go, unlike the
    resident size, which keeps freed memory the allocator holds on to."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2
    mallinfo2.argtypes = []

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class MemoryTracker:
    """Peak memory of a training, above what its process held when it began (the loaded
    model): CUDA's own peak counter on a GPU; on a CPU the C allocator's bytes in use
    (`_heap_counter`), sampled every SAMPLE_S by a thread and at every step. The resident
    size (RSS) is the fallback where the allocator has no count; it misses memory a
    long-lived worker freed earlier and reuses, so its kind says "rss"."""

    SAMPLE_S = 0.05  # mallinfo2 walks the arenas: 20 times a second costs the training little

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.process = psutil.Process()
        self._heap = None if self.cuda else _heap_counter()
        self.kind = "cuda" if self.cuda else "heap" if self._heap else "rss"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.start_bytes = self._current()
        self.peak_bytes = self.start_bytes
        self._stop = threading.Event()
        self._thread = None
        if not self.cuda:
            self._thread = threading.Thread(target=self._watch, name="memory-peak", daemon=True)
            self._thread.start()

    def _current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        if self._heap is not None:
            return self._heap()
        return self.process.memory_info().rss

    def _watch(self) -> None:
        while not self._stop.wait(self.SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._current())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def peak_mb(self) -> float:
        """Peak above the starting point, in MiB (on CUDA the peak allocated tensor memory,
        the model included); the sampling thread stops."""
        self.stop()
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        self.sample()
        return (self.peak_bytes - self.start_bytes) / 2**20


def prefill_batch(model: nn.Module, input_ids: torch.Tensor) -> dict:
    """A batch to time a forward with: the ids and their mask and, for a causal LM whose
    forward takes it, logits_to_keep=1, the prefill as generation runs it (the vocabulary
    projected for the last position alone, not for every token of the row)."""
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    forward = getattr(model, "forward", None)
    if forward is not None and "logits_to_keep" in inspect.signature(forward).parameters:
        batch["logits_to_keep"] = 1
    return batch


def answer_budget(
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict],
    cap: int,
    margin: int = ANSWER_MARGIN,
) -> int:
    """New tokens for the sample answers to `rows`: the longest expected completion, in
    tokens, plus `margin` (room to show what a model says after the answer), at most `cap`;
    `cap` when a row has no expected completion. A greedy step costs as much as the model's
    weights take to read, so answers no longer than the task's are most of what the quick
    measurement saves on short-answer tasks."""
    expected = [row.get("completion") for row in rows]
    if not expected or any(not text for text in expected):
        return cap
    longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in expected)
    return max(1, min(cap, longest + margin))


@torch.no_grad()
def sample_generations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict],
    *,
    max_new_tokens: int = 32,
    base: nn.Module | None = None,
    base_answers: Sequence[str] | None = None,
) -> list[dict[str, str]]:
    """For a few prompts: the expected completion, the base model's and the adapter's answer
    (the base's from `base` when given: a fully fine-tuned model has no adapter to switch off).
    Each side answers all prompts as one greedy batch (decoding.greedy_completions): a
    decoding step costs about as much for a few rows as for one. `base_answers`, when given
    for every row (kept with the base model's evaluation), are not generated again."""
    prompts = [row.get("prompt") or row.get("text", "") for row in rows]
    if base_answers is None or len(base_answers) != len(prompts):
        with as_base(model, base) as plain:
            base_answers = greedy_completions(
                plain, tokenizer, prompts, max_new_tokens=max_new_tokens
            )
    adapted = greedy_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return [
        {"prompt": prompt, "expected": row.get("completion", ""), "base": b, "adapter": a}
        for prompt, row, b, a in zip(prompts, rows, base_answers, adapted, strict=True)
    ]


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
