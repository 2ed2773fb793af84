"""Peak memory of one LoRA training step: peft_core vs HF PEFT (and HF PEFT in the Trainer).

    .venv/bin/python benchmarks/memory.py [--model smollm2|small] [--batch 8 --seq 512]
        [--setting fp32 --setting bf16+ckpt ...] [--device cpu|cuda] [--no-trainer] [--json]

Every side trains the same base with the same LoRA (peft_core's defaults: r 8, alpha 16,
dropout 0.05 on the architecture's default layers; HF PEFT is given the same values and
layers) on the same batch of `batch × seq` random tokens, all of them supervised:

    ours      peft_core.apply + the product's step (peft_core.train.prepare_model,
              train_loss under the run's autocast: chunked cross-entropy, hand-written
              LoRA steps), backward, gradient clipping, AdamW
    hf        peft.get_peft_model + model(**batch, labels=…).loss, the same backward,
              clipping and AdamW
    trainer   peft.get_peft_model inside transformers.Trainer (max_steps 1, the same
              precision and checkpointing flags), as a TRL / Axolotl user runs it

Settings (each a column of "equal settings"): fp32, fp32+ckpt, bf16, bf16+ckpt,
nf4+ckpt (bitsandbytes NF4 base, bf16 compute). `ckpt` is transformers' non-reentrant
gradient checkpointing, on both sides.

Each (setting, side) runs in a fresh child process: load the base, adapt it, then one step.
Reported: `loaded` (memory the loaded, adapted model holds before the step; on CPU a
memory-mapped safetensors file counts only once its pages are read) and `step` (the
high-water mark of the step above that), in MiB, and `peak` = loaded + step, what the device
must have. On CUDA these are torch.cuda.memory_allocated / max_memory_allocated; on CPU the
resident set size and its high-water mark (VmHWM, reset before the step; glibc is told to
return every freed block over 64 KiB, see benchmarks/_timing.py). The goal (issue 14):
ours ≤ 0.6 × HF PEFT's peak at equal settings.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import PEAK_ENV, _status_kib, peak_mb  # noqa: E402

SETTINGS = {  # name -> (precision, quantize, gradient checkpointing)
    "fp32": ("fp32", "none", False),
    "fp32+ckpt": ("fp32", "none", True),
    "bf16": ("bf16", "none", False),
    "bf16+ckpt": ("bf16", "none", True),
    "nf4+ckpt": ("bf16", "nf4", True),
}
SIDES = ("ours", "hf", "trainer")
GOAL = 0.6


# ---------------------------------------------------------------- one child


def base_directory(model: str) -> Path:
    """An HF directory of the base: the bundled SmolLM2, or a small random Llama."""
    from peft_core import catalogue

    key = "smollm2-135m-instruct" if model == "smollm2" else "tiny-llama"
    return catalogue.model_dir(key)


def load_base(args: argparse.Namespace, precision: str, quantize: str) -> nn.Module:
    from peft_core.pretrained import load_directory

    dtype = "bfloat16" if precision == "bf16" else "float32"
    model, _ = load_directory(
        base_directory(args.model), "causal-lm", dtype=dtype, quantize=quantize, device=args.device
    )
    return model.to(args.device) if quantize == "none" else model


def batch_for(model: nn.Module, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=generator)
    ids = ids.to(args.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def lora_configs(model: nn.Module):
    """peft_core's default LoRA and HF PEFT's LoraConfig with the same values and layers."""
    import peft

    import peft_core as pc
    from peft_core.lora import to_hf_config

    ours = pc.LoraConfig()
    probe = pc.apply(_meta_copy(model), ours)
    hf = to_hf_config(probe, ours)
    theirs = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=hf["r"],
        lora_alpha=hf["lora_alpha"],
        lora_dropout=hf["lora_dropout"],
        target_modules=hf["target_modules"],
    )
    return ours, theirs


def _meta_copy(model: nn.Module) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model.config)


def child(args: argparse.Namespace) -> dict[str, float]:
    from peft_core.configs import TrainConfig
    from peft_core.train import prepare_model, train_loss

    precision, quantize, ckpt = SETTINGS[args.settings[0]]
    device = torch.device(args.device)
    import peft  # noqa: F401  (every library in memory before the baseline)
    import transformers  # noqa: F401

    import peft_core  # noqa: F401

    if quantize != "none":
        import bitsandbytes  # noqa: F401
    before = _allocated(device)
    model = load_base(args, precision, quantize)
    ours, theirs = lora_configs(model)
    batch = batch_for(model, args)
    config = TrainConfig(
        precision=precision, quantize=quantize, gradient_checkpointing=ckpt, steps=1
    )
    if args.side == "ours":
        import peft_core as pc

        model = pc.apply(model, ours).train()
        prepare_model(model, config)
        loss_of = train_loss
    else:
        import peft

        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model = peft.get_peft_model(model, theirs).train()

        def loss_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return model(**batch).loss

    weights = _allocated(device) - before
    if args.side == "trainer":
        step = _trainer_step(model, batch, precision, ckpt, device)
    else:
        step = _loop_step(model, batch, config, device, loss_of)
    return {"weights": weights, "step": peak_mb(step, device)}


def _loop_step(model, batch, config, device, loss_of):
    from peft_core.train import autocast

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        with autocast(config, device):
            loss = loss_of(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _trainer_step(model, batch, precision, ckpt, device):
    from transformers import Trainer, TrainingArguments

    rows = [{k: v[i].cpu() for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
    arguments = TrainingArguments(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "peftlab-memory-bench"),
        per_device_train_batch_size=len(rows),
        max_steps=1,
        bf16=precision == "bf16",
        gradient_checkpointing=ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_grad_norm=1.0,
        learning_rate=1e-4,
        optim="adamw_torch",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=rows)
    return trainer.train


def _allocated(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_kib("VmRSS") / 1024


# ---------------------------------------------------------------- the parent


def measure(args: argparse.Namespace, setting: str, side: str) -> dict[str, float] | str:
    command = [sys.executable, __file__, "--child", "--setting", setting, "--side", side]
    command += ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq)]
    command += ["--device", args.device, "--threads", str(args.threads)]
    done = subprocess.run(command, env={**os.environ, **PEAK_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return
    sides = [s for s in SIDES if not (s == "trainer" and args.no_trainer)]
    rows = []
    for setting in args.settings or list(SETTINGS):
        row = {"setting": setting}
        for side in sides:
            result = measure(args, setting, side)
            if isinstance(result, str):
                row[f"{side}_error"] = result
                continue
            row[f"{side}_weights"] = result["weights"]
            row[f"{side}_step"] = result["step"]
            row[f"{side}_peak"] = result["weights"] + result["step"]
        for side in sides[1:]:
            if "ours_peak" in row and f"{side}_peak" in row:
                row[f"vs_{side}"] = row["ours_peak"] / row[f"{side}_peak"]
        rows.append(row)
        if not args.json:
            _print_row(row, sides)
    if args.json:
        print(json.dumps(rows))
    else:
        _print_goal(rows)


def _print_row(row: dict, sides: list[str]) -> None:
    cells = [f"{row['setting']:<10}"]
    for side in sides:
        if f"{side}_peak" in row:
            cells.append(
                f"{side} {row[f'{side}_peak']:7.0f} MiB "
                f"(loaded {row[f'{side}_weights']:5.0f} + step {row[f'{side}_step']:6.0f})"
            )
        else:
            cells.append(f"{side} failed: {row.get(f'{side}_error')}")
    ratios = [f"ours/{s} {row[f'vs_{s}']:.2f}" for s in sides[1:] if f"vs_{s}" in row]
    print(" | ".join(cells + ratios), flush=True)


def _print_goal(rows: list[dict]) -> None:
    for row in rows:
        ratio = row.get("vs_hf")
        if ratio is None:
            print(f"{row['setting']}: no ratio (a side failed)")
            continue
        verdict = "met" if ratio <= GOAL else f"missed by {ratio - GOAL:.2f}"
        print(f"{row['setting']}: ours / HF PEFT peak {ratio:.2f} (goal ≤ {GOAL}): {verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("smollm2", "small"), default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--setting", dest="settings", action="append", choices=list(SETTINGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-trainer", action="store_true", help="skip the Trainer side")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
