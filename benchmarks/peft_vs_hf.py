"""Training step of peft_core vs HF PEFT, and vs the frozen floor.

    .venv/bin/python benchmarks/peft_vs_hf.py [--model small|smollm2] [--rounds 10]
        [--batch 8 --seq 128] [--dtype fp32|bf16] [--autocast] [--device cpu|cuda] [--method NAME]
        [--json] [--dropout 0 --dropout 0.05]

LoRA and DoRA run once per --dropout (default: 0 and the product's default, 0.05; the same
lora_dropout on both sides), so the rows at the defaults people train with sit beside the
dropout-0 rows, named "lora all-linear d=0.05". Both sides draw nn.Dropout's masks in the
same order from one seed, so their first losses agree with dropout too (`loss_diff` ~0).
`--dtype bf16` puts the base in bf16 (adapters stay fp32 on both sides); `--autocast` also
runs the forward under autocast to bf16, as train.py does for precision bf16.

For every method both libraries have (LoRA, DoRA, IA3, prompt and prefix tuning)
peft_core and HF PEFT adapt copies of the same base model with the same config,
start from the same adapter weights (HF's init, copied into ours) and train on the
same batch. Bottleneck adapters and MAM, which HF PEFT lacks, are set against the
floor only.

One step = forward with labels (causal-LM loss on the whole batch), backward,
AdamW.step() over the trainable parameters, zero_grad(set_to_none=True).
The floor is the frozen base model with the embeddings' output requiring grad:
forward and backward through every layer, no weight gradient, no optimizer. It is
what any adapter that touches every layer must pay at least.

Timing: all variants run in one process, one step each per round, the order reversed
every other round (benchmarks/_timing.py); ms are medians over rounds, `ratio` is the
median over rounds of ours/HF (both steps ran back to back), `floor_ratio` and
`hf_floor_ratio` the same against the floor. Peak memory: each variant's two steps in a
fresh child process, above what is resident before them (see _timing.peak_mb).
`loss_diff` is |ours − HF| of the first step's loss (same init: ~0).
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import PEAK_ENV, interleaved_times, paired_ratio, peak_mb, spread  # noqa: E402

SMALL = {"hidden": 384, "layers": 4, "heads": 6, "kv_heads": 2, "ffn": 1024, "vocab": 4096}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QV = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Case:
    name: str
    ours: Callable[[], Any]  # -> a peft_core config
    hf: Callable[[], Any] | None  # -> a peft config, None where HF PEFT has no such method


DEFAULT_DROPOUTS = (0.0, 0.05)  # off (the same work as HF's default) and the product's default


def cases(dropouts: tuple[float, ...] = DEFAULT_DROPOUTS) -> list[Case]:
    import peft

    import peft_core as pc

    # The same lora_dropout on both sides (HF PEFT's default is 0, ours 0.05).
    def hf_lora(targets, dropout, dora=False):
        return lambda: peft.LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=dropout,
            target_modules=targets, use_dora=dora,
        )  # fmt: skip

    def low_rank(name, config_cls, targets, dora):
        return [
            Case(
                name if not dropout else f"{name} d={dropout:g}",
                lambda d=dropout: config_cls(r=8, alpha=16, dropout=d, target_modules=targets),
                hf_lora(targets, dropout, dora),
            )
            for dropout in dropouts
        ]

    return [
        *low_rank("lora q,v", pc.LoraConfig, QV, False),
        *low_rank("lora all-linear", pc.LoraConfig, "all-linear", False),
        *low_rank("dora q,v", pc.DoraConfig, QV, True),
        *low_rank("dora all-linear", pc.DoraConfig, "all-linear", True),
        Case("ia3", pc.IA3Config, lambda: peft.IA3Config(task_type="CAUSAL_LM")),
        Case(
            "prefix 20",
            lambda: pc.PrefixTuningConfig(num_virtual_tokens=20),
            lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        ),
        Case(
            "prompt 20",
            lambda: pc.PromptTuningConfig(num_virtual_tokens=20),
            lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        ),
        Case("houlsby", lambda: pc.BottleneckConfig(placement="houlsby"), None),
        Case("pfeiffer", lambda: pc.BottleneckConfig(placement="pfeiffer"), None),
        Case("parallel", lambda: pc.BottleneckConfig(placement="parallel"), None),
        Case("mam", pc.MAMConfig, None),
    ]


# ---------------------------------------------------------------- models and steps


def build_base(args: argparse.Namespace) -> nn.Module:
    if args.model == "smollm2":
        from peft_core.catalogue import load_model

        model = load_model("smollm2-135m-instruct", "causal-lm")[0]
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            vocab_size=SMALL["vocab"],
            hidden_size=SMALL["hidden"],
            intermediate_size=SMALL["ffn"],
            num_hidden_layers=SMALL["layers"],
            num_attention_heads=SMALL["heads"],
            num_key_value_heads=SMALL["kv_heads"],
            max_position_embeddings=max(512, args.seq + 64),
            tie_word_embeddings=False,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(device=args.device, dtype=DTYPES[args.dtype]).train()


def make_batch(model: nn.Module, args: argparse.Namespace) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (args.batch, args.seq), generator=generator)
    return ids.to(args.device)


def build_floor(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base).requires_grad_(False)
    embeddings = model.get_input_embeddings()
    embeddings.register_forward_hook(lambda _m, _in, out: out.requires_grad_())
    return model


def build_hf(base: nn.Module, case: Case) -> nn.Module:
    import peft

    return peft.get_peft_model(copy.deepcopy(base), case.hf()).train()


def build_ours(base: nn.Module, case: Case, hf_model: nn.Module | None) -> nn.Module:
    """peft_core's adapter on a copy of `base`, starting from HF's init where there is one."""
    import peft

    import peft_core
    from peft_core.model import load_adapter_tensors

    model = peft_core.apply(copy.deepcopy(base), case.ours())
    if hf_model is not None:
        state = peft.get_peft_model_state_dict(hf_model)
        load_adapter_tensors(model, {k: v.to(torch.float32) for k, v in state.items()})
    return model.train()


def make_step(model: nn.Module, ids: torch.Tensor, autocast: bool = False) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    dtype = next(model.parameters()).dtype  # the base's: bf16 where autocast is asked

    def step() -> float:
        with torch.autocast(ids.device.type, dtype=dtype, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- timing


def build_all(args: argparse.Namespace, selected: list[Case]):
    """{variant name: step} for the floor and every side of every case, and their losses."""
    base = build_base(args)
    ids = make_batch(base, args)
    steps = {"floor": make_step(build_floor(base), ids, args.autocast)}
    for case in selected:
        hf_model = build_hf(base, case) if case.hf is not None else None
        ours = build_ours(base, case, hf_model)
        steps[f"ours {case.name}"] = make_step(ours, ids, args.autocast)
        if hf_model is not None:
            if trainable(ours) != trainable(hf_model):
                print(
                    f"# {case.name}: trainable {trainable(ours)} ours vs {trainable(hf_model)} HF"
                )
            steps[f"hf {case.name}"] = make_step(hf_model, ids, args.autocast)
    return steps


def first_losses(steps: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Step 1 of every variant, each from the same seed: the same dropout masks on both sides."""
    losses = {}
    for name, step in steps.items():
        torch.manual_seed(0)
        losses[name] = step()
    return losses


def sync_for(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else lambda: None


def time_all(args: argparse.Namespace, selected: list[Case]):
    steps = build_all(args, selected)
    losses = first_losses(steps)  # step 1 of every variant: same init, same loss
    times = interleaved_times(steps, args.rounds, args.warmup, sync_for(args.device))
    return times, losses


# ---------------------------------------------------------------- peak memory


def peak_child(args: argparse.Namespace, selected: list[Case]) -> None:
    """In a fresh process: each variant's peak over two steps, one JSON line on stdout."""
    base = build_base(args)
    ids = make_batch(base, args)
    device = torch.device(args.device)
    autocast = args.autocast
    peaks = {"floor": _peak(build_floor(base), ids, device, autocast)}
    for case in selected:
        if case.hf is not None:
            hf_model = build_hf(base, case)
            peaks[f"hf {case.name}"] = _peak(hf_model, ids, device, autocast)
            del hf_model
        peaks[f"ours {case.name}"] = _peak(build_ours(base, case, None), ids, device, autocast)
    print(json.dumps(peaks))


def _peak(model: nn.Module, ids: torch.Tensor, device: torch.device, autocast: bool) -> float:
    step = make_step(model, ids, autocast)  # optimizer state is created by the first step: counted

    def two_steps() -> None:
        step()
        step()

    return peak_mb(two_steps, device)


def measure_peaks(args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--peak-child", *_forwarded(args)]
    env = {**os.environ, **PEAK_ENV}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _forwarded(args: argparse.Namespace) -> list[str]:
    flags = ["--model", args.model, "--dtype", args.dtype, "--device", args.device]
    flags += ["--autocast"] if args.autocast else []
    flags += ["--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    flags += [flag for value in args.dropouts or () for flag in ("--dropout", str(value))]
    return flags + [flag for name in args.methods or () for flag in ("--method", name)]


# ---------------------------------------------------------------- report


def summarise(times, losses, peaks, selected: list[Case]) -> list[dict[str, Any]]:
    floor = times["floor"]
    rows = []
    for case in selected:
        ours = times[f"ours {case.name}"]
        hf = times.get(f"hf {case.name}")
        rows.append(
            {
                "method": case.name,
                "ours_ms": 1000 * statistics.median(ours),
                "hf_ms": None if hf is None else 1000 * statistics.median(hf),
                "floor_ms": 1000 * statistics.median(floor),
                "ratio": None if hf is None else paired_ratio(ours, hf),
                "floor_ratio": paired_ratio(ours, floor),
                "hf_floor_ratio": None if hf is None else paired_ratio(hf, floor),
                "ours_peak_mb": peaks.get(f"ours {case.name}"),
                "hf_peak_mb": peaks.get(f"hf {case.name}"),
                "loss_diff": None
                if hf is None
                else abs(losses[f"ours {case.name}"] - losses[f"hf {case.name}"]),
            }
        )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]], times: dict[str, list[float]], args) -> None:
    print(
        f"# model {args.model}, {args.dtype}{' + autocast' if args.autocast else ''} on "
        f"{args.device}, batch {args.batch}x{args.seq}, "
        f"{args.rounds} rounds (+{args.warmup} warm-up), {torch.get_num_threads()} threads"
    )
    head = f"{'method':<22}{'ours ms':>9}{'HF ms':>9}{'floor ms':>9}{'ours/HF':>9}"
    print(head + f"{'ours/fl':>9}{'HF/fl':>9}{'ours MB':>9}{'HF MB':>9}{'|dloss|':>9}")
    for r in rows:
        print(
            f"{r['method']:<22}{r['ours_ms']:>9.1f}{_fmt(r['hf_ms'], '.1f'):>9}"
            f"{r['floor_ms']:>9.1f}{_fmt(r['ratio'], '.3f'):>9}{r['floor_ratio']:>9.3f}"
            f"{_fmt(r['hf_floor_ratio'], '.3f'):>9}{_fmt(r['ours_peak_mb'], '.1f'):>9}"
            f"{_fmt(r['hf_peak_mb'], '.1f'):>9}{_fmt(r['loss_diff'], '.1e'):>9}"
        )
    if args.rounds >= 2:
        noise = statistics.median(spread(values) for values in times.values())
        print(f"# noise: median relative IQR of a variant's step times {noise:.1%}")
    print_goals(rows)


# Issue 14's goals at the product's defaults (dropout 0.05), in fp32 and on a bf16 base.
GOALS = {"lora all-linear d=0.05": 0.90, "dora all-linear d=0.05": 0.80}


def print_goals(rows: list[dict[str, Any]]) -> None:
    """One line per goal row present: met, or missed by how much (docs/BENCHMARKS.md: why)."""
    for row in rows:
        goal = GOALS.get(row["method"])
        if goal is None or row["ratio"] is None:
            continue
        ratio = row["ratio"]
        verdict = "met" if ratio <= goal else f"missed by {ratio - goal:.3f}"
        print(f"goal: {row['method']} ≤ {goal} × HF PEFT: {ratio:.3f}, {verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("small", "smollm2"), default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument(
        "--autocast",
        action="store_true",
        help="forward under autocast to --dtype (train.py's bf16)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared box)"
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--method", action="append", dest="methods", help="run only this one (repeatable)"
    )
    parser.add_argument(
        "--dropout",
        action="append",
        type=float,
        dest="dropouts",
        help="LoRA/DoRA dropout, repeatable (default: 0 and 0.05)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--peak-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def select(args: argparse.Namespace) -> list[Case]:
    every = cases(tuple(args.dropouts or DEFAULT_DROPOUTS))
    if not args.methods:
        return every
    wanted = args.methods
    unknown = set(wanted) - {case.name for case in every}
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {[c.name for c in every]}")
    return [case for case in every if case.name in wanted]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.autocast and args.dtype == "fp32":
        raise SystemExit("--autocast needs a half --dtype (bf16)")
    torch.set_num_threads(args.threads)
    selected = select(args)
    if args.peak_child:
        peak_child(args, selected)
        return
    peaks = {} if args.no_memory else measure_peaks(args)
    times, losses = time_all(args, selected)
    rows = summarise(times, losses, peaks, selected)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows, times, args)


if __name__ == "__main__":
    main()
