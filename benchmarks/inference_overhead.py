"""Inference overhead per method: the adapted model's forward against the base model's.

    .venv/bin/python benchmarks/inference_overhead.py [--model smollm2-135m-instruct]
        [--batch 4 --seq 128] [--rounds 7] [--threads 1] [--clock cpu|wall] [--only lora,prompt]

One forward = model(input_ids, attention_mask) under torch.no_grad(), eval mode, on a
(batch, seq) batch of random token ids: logits for every real position, as serving does.
Every variant adapts its own structural copy of the one loaded base model (the weights are
shared, workers.cache.shared_copy); merged variants are merged into private clones of the
weights they touch (peft_core.profile.merged_privately), so no variant writes the base.

Timing: per round, each variant's forward runs right after a base forward (round-robin);
`ratio` is the median over rounds of adapter / base of the pair. The clock is, by default,
the CPU time of the one torch thread (time.thread_time): on a shared machine a preempted
forward's wall time says more about the neighbours than about the method (measured here,
wall-clock forwards spread by 80 % with two threads under load; CPU time by a few %).
`--clock wall --threads N` measures wall time instead.
Goals (issue 6, part 4): merged LoRA, DoRA, IA3 <= 1.01; prefix (20) <= 1.03; prompt (20)
<= 1.08. Bottleneck and MAM cannot merge and are reported; HF PEFT's prompt tuning is the
comparison (it also computes vocabulary logits for the virtual tokens).
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._timing import paired_ratio, spread  # noqa: E402

P = 20  # virtual tokens of prompt and prefix tuning


@dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[], object]  # -> a peft_core config, or an HF PEFT one (hf=True)
    merged: bool = False
    goal: float | None = None
    hf: bool = False


def variants() -> list[Variant]:
    import peft

    import peft_core as pc

    return [
        Variant("LoRA r8 merged", lambda: pc.LoraConfig(r=8, alpha=16), merged=True, goal=1.01),
        Variant("DoRA r8 merged", lambda: pc.DoraConfig(r=8, alpha=16), merged=True, goal=1.01),
        Variant("IA3 merged", lambda: pc.IA3Config(), merged=True, goal=1.01),
        Variant(f"prefix {P}", lambda: pc.PrefixTuningConfig(num_virtual_tokens=P), goal=1.03),
        Variant(f"prompt {P}", lambda: pc.PromptTuningConfig(num_virtual_tokens=P), goal=1.08),
        Variant("bottleneck (houlsby)", lambda: pc.BottleneckConfig()),
        Variant(f"MAM (prefix {P})", lambda: pc.MAMConfig(num_virtual_tokens=P)),
        Variant(
            f"HF PEFT prompt {P}",
            lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
            hf=True,
        ),
    ]


def adapted(base: nn.Module, variant: Variant, stack: contextlib.ExitStack) -> nn.Module:
    import peft

    import peft_core
    from peft_core.profile import merged_privately
    from workers.cache import shared_copy

    model = shared_copy(base)
    if variant.hf:
        return peft.get_peft_model(model, variant.build()).eval()
    torch.manual_seed(0)
    model = peft_core.apply(model, variant.build()).eval()
    if variant.merged:
        stack.enter_context(merged_privately(model))
    return model


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(**batch)

    return run


def interleaved_times(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Seconds (of `clock`) of each call of each step, the steps alternated call by call."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cache-dir", default=str(ROOT / "var" / "cache"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--only", default=None, help="comma-separated name prefixes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu times the calling thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    from peft_core.catalogue import load_model

    base, tokenizer = load_model(args.model, "causal-lm", cache_dir=args.cache_dir)
    base.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tokenizer.vocab_size, (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    chosen = [v for v in variants() if _selected(v.name, args.only)]

    with contextlib.ExitStack() as stack:
        steps: dict[str, Callable[[], None]] = {}
        for variant in chosen:
            steps[f"base/{variant.name}"] = forward(base, batch)
            steps[variant.name] = forward(adapted(base, variant, stack), batch)
        times = interleaved_times(steps, args.rounds, args.warmup, clock)
    report(args, chosen, times)


def _selected(name: str, only: str | None) -> bool:
    return only is None or any(name.lower().startswith(o.strip().lower()) for o in only.split(","))


def report(args, chosen: list[Variant], times: dict[str, list[float]]) -> None:
    base_all = [t for v in chosen for t in times[f"base/{v.name}"]]
    print(
        f"{args.model}, batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock, {args.rounds} rounds; "
        f"base forward {statistics.median(base_all) * 1000:.0f} ms "
        f"(spread {spread(base_all):.0%} over all base calls)"
    )
    print(f"{'variant':24} {'base ms':>8} {'adapter ms':>10} {'ratio':>6} {'goal':>6}  {'spread'}")
    for v in chosen:
        ours, base = times[v.name], times[f"base/{v.name}"]
        ratio = paired_ratio(ours, base)
        goal = f"{v.goal:.2f}" if v.goal else "-"
        verdict = "" if v.goal is None else ("ok" if ratio <= v.goal else "MISSED")
        ratios = [a / b for a, b in zip(ours, base, strict=True)]
        print(
            f"{v.name:24} {statistics.median(base) * 1000:8.0f} "
            f"{statistics.median(ours) * 1000:10.0f} {ratio:6.3f} {goal:>6}  "
            f"{spread(ratios):.1%} {verdict}"
        )


if __name__ == "__main__":
    main()
