"""Pre-flight: a training run's peak memory from the model's shapes, before a weight is read.

The model is built from its config.json on the meta device (shapes, no memory), the method
is applied there (the exact trainable count and the adapted modules), and the peak is

    peak = weights + state + max(activations + logits, optimizer step) + workspace

per device; a run over D devices gives each ⌈b/D⌉ rows of a batch of b.

    weights      N_q·q + (N − N_q)·e             N base parameters, N_q of them in the blocks'
                                                  Linear weights, q bytes each once quantised
                                                  (nf4 ≈ 0.52: 4 bits + absmax per 64; int8 1 +
                                                  a fp32 scale per row), e = 4 (fp32) or 2
                                                  (bf16/fp16), the dtype the base is loaded in
                 (N_q/D + 2·N_q/L + N − N_q)·e    under FSDP over D devices: each holds 1/D of
                                                  the blocks, two blocks gathered at a time
                                                  (one prefetched) and the rest whole
    state        N_t·(4 + 4 + 8) (+ 2·N_t)        fp32 trainable weights (the master copy), their
                                                  gradients, AdamW's two moments (+ autocast's
                                                  half copy of them under bf16/fp16)
    activations  b·t·(L_g·a + 8·d)                what autograd keeps for the backward pass
                 b·t·(L·e·d + a + 8·d)            with gradient checkpointing: every block's
                                                  input, and one block recomputed at a time
    logits       c·V·(4 + 2·[half]) + 2·n·d·e      the chunked cross-entropy (peft_core.loss):
                                                  c = min(CHUNK_TOKENS, n) rows of fp32 logits at
                                                  a time, n = b·(t − 1) supervised tokens
                 b·t·V·(e + 12)                   a model whose logits are post-processed
                                                  (softcapped) keeps its full logits, their fp32
                                                  copy, log-softmax and gradient
    step         N_t·8                            AdamW's temporaries (foreach) while it steps
    workspace    F_dev + 2·b·t·e·max(f, d)        the framework (CPU: allocator, kernels,
                 (+ 2·b·h·t·t_k·e eager)          tokenizer; CUDA: cuBLAS and the caching
                 (+ max Linear·e quantised)       allocator's slack) and the backward's transient
                                                  gradients: two FFN-wide tensors, two attention
                                                  matrices with eager attention, one dequantised
                                                  weight on a quantised base

b batch size (one micro-batch: grad_accum divides nothing here, it only repeats), t tokens
(max_length, capped at the model's context; + p virtual tokens for prompt tuning), t_k the
keys' length (t + p for prefix tuning), d hidden width, f FFN width, h heads, L layers, L_g
the layers from the lowest adapted one up (a gradient flows no further down), V vocabulary.

One block keeps, per token, a = e·(2·d_q + 2·d_kv + k_f·f + h + extra) + 4·2·d bytes:
the attention's query, key, value and output (d_q = h·d_h, d_kv = h_kv·d_h; sdpa's
log-sum-exp per head), the FFN's saved intermediates (k_f = 3 gated: gate, its activation
and up; 2 plain), and both norms' inputs in fp32 (transformers' RMSNorm upcasts). Eager
attention adds the softmax probabilities, h·t_k per token, and a copy of the output. A frozen
Linear keeps nothing (its input gradient needs only its weight). `extra` is the method's:

    LoRA, DoRA   each adapted input once (the modules that share an input, Q/K/V or gate/up,
                 share it; O's input is sdpa's saved output) + r per adapter; with dropout
                 each adapter's bool mask too (d_in bytes). DoRA: + d_out per adapter.
    (IA)³        the scaled tensors: Σ of its vectors' lengths in a block
    prefix       keys and values at every head over t + p: 2·(d_q − d_kv) + 2·d_q·p/t
    prompt       nothing per layer; t grows by p
    bottleneck   each adapter's input and its narrow activation twice: d + 2·m
    full         the two norms' outputs, which Q/K/V and gate/up read, for their weights'
                 gradients: 2·d (O's and down's inputs are kept already). Every weight is
                 trainable, so the weights term is 0: state counts them (their fp32 copy)
                 with their gradients and moments

These were read off what autograd saves (torch.autograd.graph.saved_tensors_hooks) in
Llama blocks, and the whole is checked against peaks measured on CPU
(tests/peft_core/test_preflight.py). The framework constants F_dev are calibrated there:
on CPU the measured figure is the resident set above the process after its imports. Two
CPU effects are outside the model: a safetensors file stored in the dtype it loads in is
memory-mapped, so its pages count as resident once read (the weights term covers them, but
a quantised base loaded from a file in its own dtype keeps the file mapped beside the
packed weights); and glibc's heap keeps freed small blocks (measure with
MALLOC_MMAP_THRESHOLD_ as benchmarks/_timing.py does).

`estimate(facts, settings)` is torch-free arithmetic; `model_facts` builds the facts on the
meta device; `estimate_for_run` does both for a directory or config. `Estimate.fits(free)`
says whether it fits in `free` bytes and, when not, the cheapest changes that would, in
the CLI's words.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_core.configs import QUANTIZABLE_METHODS

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

    from peft_core.configs import TrainConfig

GIB = 2**30
MIB = 2**20
HALF = ("bf16", "fp16")
QUANT_BYTES = {"nf4": 0.5 + 1 / 64, "int8": 1.0}  # per weight; int8 adds 4 bytes per row
FRAMEWORK_BYTES = {"cpu": 120 * MIB, "cuda": 256 * MIB}  # F_dev, calibrated (module doc)
STATE_BYTES = 4 + 4 + 8  # fp32 weight, gradient, two AdamW moments
STEP_BYTES = 8  # AdamW's foreach temporaries per trainable parameter
NORM_BYTES = 4 * 2  # two norm inputs per block, kept in fp32
QUANTIZABLE = QUANTIZABLE_METHODS  # what a QLoRA base can carry: worth suggesting


class PreflightError(ValueError):
    """The run cannot fit the device: the message has the numbers and what would fit."""


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate reads from a model with its method applied (meta device)."""

    layers: int
    hidden: int  # d
    ffn: int  # f
    gated: bool  # gate·act·up FFN (Llama) rather than act(fc1)
    heads: int  # h
    kv_heads: int  # h_kv
    head_dim: int  # d_h
    vocab: int
    context: int | None  # the position limit max_length is capped at
    parameters: int  # N, the base model's (the task head included)
    quantizable: int  # N_q: the blocks' Linear weights
    largest_linear: int  # elements of the largest of them
    linear_rows: int  # output rows of the quantisable Linears (int8 keeps a scale each)
    trainable: int  # N_t
    method: str
    extra: float  # the method's elements per token per block (module doc)
    dropout_bytes: int  # LoRA with dropout: its masks, one byte per input element
    grad_layers: int  # L_g
    prompt_tokens: int = 0  # p of prompt tuning: the sequence grows
    prefix_tokens: int = 0  # p of prefix tuning: the keys grow
    chunked_logits: bool = True  # the loss never holds all logits (peft_core.loss)
    task: str = "causal-lm"


@dataclass(frozen=True)
class Settings:
    """The run's settings that move memory; precision and attn resolved for the device."""

    batch_size: int
    max_length: int
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    precision: str = "fp32"  # fp32, bf16, fp16
    quantize: str = "none"
    attn: str = "sdpa"  # sdpa, eager, flash
    device: str = "cpu"  # cpu, cuda
    lora_dropout: bool = False  # LoRA/DoRA with dropout > 0
    devices: int = 1  # processes of one run; batch_size above is one device's share
    sharded: bool = False  # FSDP: the blocks' weights split over the devices

    @property
    def e(self) -> int:
        return 2 if self.precision in HALF else 4


@dataclass(frozen=True)
class Fit:
    ok: bool
    peak: int
    free: int
    message: str  # "" when it fits

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class Estimate:
    weights: int
    state: int  # trainable weights, gradients and AdamW
    activations: int
    logits: int
    workspace: int
    step: int  # AdamW's temporaries, when activations are gone
    facts: ModelFacts
    settings: Settings

    @property
    def peak(self) -> int:
        transient = max(self.activations + self.logits, self.step)
        return self.weights + self.state + transient + self.workspace

    def parts(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "trainable+optimizer": self.state,
            "activations": self.activations,
            "logits": self.logits,
            "workspace": self.workspace,
        }

    def fits(self, free_bytes: int) -> Fit:
        """Whether the peak fits in `free_bytes`; if not, the message says what would."""
        if self.peak <= free_bytes:
            return Fit(True, self.peak, free_bytes, "")
        return Fit(False, self.peak, free_bytes, refusal(self, free_bytes))

    def summary(self) -> str:
        shown = ", ".join(f"{name} {gib(value)}" for name, value in self.parts().items())
        return f"~{gib(self.peak)} ({shown})"


def gib(nbytes: float) -> str:
    value = nbytes / GIB
    return (
        f"{value:.0f} GiB"
        if value >= 10
        else f"{value:.1f} GiB"
        if value >= 0.1
        else (f"{nbytes / MIB:.0f} MiB")
    )


# ---- the arithmetic (torch-free) -------------------------------------------------------


def estimate(facts: ModelFacts, settings: Settings) -> Estimate:
    """The module docstring's formula."""
    s, f = settings, facts
    half = s.precision in HALF
    return Estimate(
        weights=0 if f.method == "full" else _weights(f, s),  # full: state holds them
        state=f.trainable * (STATE_BYTES + (2 if half else 0)),
        activations=_activations(f, s),
        logits=_logits(f, s),
        workspace=_workspace(f, s),
        step=f.trainable * STEP_BYTES,
        facts=f,
        settings=s,
    )


def _tokens(f: ModelFacts, s: Settings) -> tuple[int, int]:
    """(t, t_k): the sequence through the blocks and the keys' length."""
    t = min(s.max_length, f.context) if f.context else s.max_length
    t += f.prompt_tokens
    return t, t + f.prefix_tokens


def _weights(f: ModelFacts, s: Settings) -> int:
    if s.sharded:  # 1/devices of the blocks, two blocks gathered (one prefetched), the rest
        blocks = f.quantizable / s.devices + 2 * f.quantizable / max(1, f.layers)
        return int((blocks + f.parameters - f.quantizable) * s.e)
    if s.quantize == "none":
        return f.parameters * s.e
    packed = f.quantizable * QUANT_BYTES[s.quantize]
    if s.quantize == "int8":
        packed += 4 * f.linear_rows
    return int(packed + (f.parameters - f.quantizable) * s.e)


def block_bytes(f: ModelFacts, s: Settings) -> float:
    """a: bytes one block keeps per token for the backward pass (module doc)."""
    t, t_k = _tokens(f, s)
    d_q, d_kv = f.heads * f.head_dim, f.kv_heads * f.head_dim
    elements = 2 * d_q + 2 * d_kv + (3 if f.gated else 2) * f.ffn + f.heads
    if s.attn == "eager":
        elements += f.heads * t_k + d_q
    if f.prefix_tokens:
        elements += 2 * (d_q - d_kv) + 2 * d_q * f.prefix_tokens / t
    elements += f.extra
    masks = f.dropout_bytes if s.lora_dropout else 0
    return s.e * elements + NORM_BYTES * f.hidden + masks


def _activations(f: ModelFacts, s: Settings) -> int:
    t, _ = _tokens(f, s)
    per_token = NORM_BYTES * f.hidden  # the embedding output and the final norm
    if s.gradient_checkpointing:
        per_token += f.grad_layers * s.e * f.hidden + block_bytes(f, s)
    else:
        per_token += f.grad_layers * block_bytes(f, s)
    return int(s.batch_size * t * per_token)


def _logits(f: ModelFacts, s: Settings) -> int:
    if f.task != "causal-lm":
        return 0
    t, _ = _tokens(f, s)
    if not f.chunked_logits:
        return s.batch_size * t * f.vocab * (s.e + 12)
    from peft_core.loss import CHUNK_TOKENS

    supervised = s.batch_size * (t - 1)
    rows = min(CHUNK_TOKENS, supervised)
    return (
        rows * f.vocab * (4 + (2 if s.precision in HALF else 0)) + 2 * supervised * f.hidden * s.e
    )


def _workspace(f: ModelFacts, s: Settings) -> int:
    t, t_k = _tokens(f, s)
    transient = 2 * s.batch_size * t * s.e * max(f.ffn, f.hidden)
    if s.attn == "eager":
        transient += 2 * s.batch_size * f.heads * t * t_k * s.e
    if s.quantize != "none":
        transient += f.largest_linear * 2  # one weight dequantised to the compute dtype
    return FRAMEWORK_BYTES.get(s.device, FRAMEWORK_BYTES["cuda"]) + transient


# ---- what would fit ------------------------------------------------------------------------


def alternatives(est: Estimate) -> list[tuple[str, Settings]]:
    """Changed settings, the least change first: the same effective batch and the same
    numbers (checkpointing, accumulation), then precision, a quantised base, shorter rows."""
    s, f = est.settings, est.facts
    options: list[tuple[str, Settings]] = []
    ckpt = not s.gradient_checkpointing
    if ckpt:
        options.append(("--gradient-checkpointing", _with(s, gradient_checkpointing=True)))
    splits = [k for k in (2, 4, 8, 16, 32, 64) if k <= s.batch_size and s.batch_size % k == 0]
    for k in splits:
        words = f"--grad-accum {s.grad_accum * k} with batch {s.batch_size // k}"
        changed = _with(s, batch_size=s.batch_size // k, grad_accum=s.grad_accum * k)
        options.append((words, changed))
        if ckpt:
            both = _with(changed, gradient_checkpointing=True)
            options.append((f"{words} and --gradient-checkpointing", both))
    if s.precision == "fp32":
        options.append(("--precision bf16", _with(s, precision="bf16")))
    if s.quantize == "none" and f.method in QUANTIZABLE:
        for kind in ("int8", "nf4"):
            options.append((f"--quantize {kind}", _with(s, quantize=kind)))
            if ckpt:
                both = _with(s, quantize=kind, gradient_checkpointing=True)
                options.append((f"--quantize {kind} and --gradient-checkpointing", both))
    length = s.max_length // 2
    while length >= 64:
        options.append((f"--max-length {length}", _with(s, max_length=length)))
        length //= 2
    return options


def _with(settings: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(settings, **changes)


def refusal(est: Estimate, free_bytes: int, most: int = 3) -> str:
    """'needs ~31 GiB, 22 GiB free: try …, or …' with the first `most` changes that fit."""
    head = f"needs ~{gib(est.peak)}, {gib(free_bytes)} free"
    fitting, seen = [], set()
    for words, changed in alternatives(est):
        peak = estimate(est.facts, changed).peak
        key = words.split()[0]  # one option per flag: the least change of each kind
        if peak <= free_bytes and key not in seen:
            seen.add(key)
            fitting.append(f"{words} (~{gib(peak)})")
        if len(fitting) == most:
            break
    if not fitting:
        return (
            f"{head}: no change of batch, checkpointing, precision or quantisation fits; "
            "use a smaller model or a device with more memory"
        )
    return f"{head}: try " + ", or ".join(fitting)


# ---- free memory -----------------------------------------------------------------------------


def free_memory(device: str) -> int:
    """Bytes free for a run: the GPU's free memory on CUDA, available RAM on CPU."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def check(est: Estimate, device: str, free_bytes: int | None = None) -> None:
    """Raise PreflightError when `est` does not fit the device's free memory."""
    free = free_memory(device) if free_bytes is None else free_bytes
    fit = est.fits(free)
    if not fit:
        raise PreflightError(f"this run would not fit in memory: {fit.message}")


# ---- the facts, from a model on the meta device ----------------------------------------------


def model_facts(
    config: PretrainedConfig, method_config: Any, *, task: str = "causal-lm", num_labels: int = 2
) -> ModelFacts:
    """The model built from `config` on the meta device, `method_config` applied: its facts."""
    import copy

    from peft_core.model import apply, trainable_parameters
    from peft_core.pretrained import meta_model
    from peft_core.registry import METHOD_CONFIGS

    config = copy.deepcopy(config)
    if task == "seq-cls":
        config.num_labels = num_labels
    model = meta_model(config, task)
    parameters = sum(p.numel() for p in model.parameters())
    quantizable, largest, rows = _linears(model)
    method = next(key for key, cls in METHOD_CONFIGS.items() if type(method_config) is cls)
    places = _places_or_none(model)
    apply(model, _countable(method_config))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    shape = _shape(text, places)
    extra, dropout_bytes, grad_layers = _method_extra(model, method, method_config, places)
    if method == "full":  # the Linears' inputs the frozen case does not keep (module doc)
        extra, grad_layers = float(2 * shape["hidden"]), shape["layers"]
    virtual = getattr(method_config, "num_virtual_tokens", 0)
    return ModelFacts(
        **shape,
        parameters=parameters,
        quantizable=quantizable,
        largest_linear=largest,
        linear_rows=rows,
        trainable=trainable_parameters(model),
        method=method,
        extra=extra,
        dropout_bytes=dropout_bytes,
        grad_layers=grad_layers or shape["layers"],
        prompt_tokens=virtual if method == "prompt" else 0,
        prefix_tokens=virtual if method in ("prefix", "mam") else 0,
        chunked_logits=not getattr(text, "final_logit_softcapping", None),
        task=task,
    )


def _countable(method_config: Any) -> Any:
    """Prompt tuning's text init needs token ids; the count does not (random init)."""
    if getattr(method_config, "init", None) == "text":
        return dataclasses.replace(
            method_config, init="random", init_text=None, init_token_ids=None
        )
    return method_config


def _places_or_none(model: nn.Module):
    from peft_core.structure import find_places

    try:
        return find_places(model)
    except ValueError:
        return None


def _linears(model: nn.Module) -> tuple[int, int, int]:
    """(weights, largest, output rows) of the Linear-likes in the blocks: what bitsandbytes
    quantises (it leaves the embeddings, norms and output head as they are)."""
    from peft_core.graph import find_blocks, in_out, linear_layers
    from peft_core.target_match import is_under

    try:
        blocks, _ = find_blocks(model)
    except ValueError:
        return 0, 0, 0
    shapes = [in_out(m) for p, m in linear_layers(model).items() if is_under(p, blocks)]
    sizes = [d_in * d_out for d_in, d_out in shapes]
    return sum(sizes), max(sizes, default=0), sum(d_out for _, d_out in shapes)


def _shape(text: Any, places: Any) -> dict[str, Any]:
    """Layers, widths, heads, vocabulary and context from the (text) config."""
    hidden = _first(text, ("hidden_size", "n_embd", "d_model"))
    heads = _first(text, ("num_attention_heads", "n_head", "num_heads"))
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if places is not None and places.kv is not None:
        kv_heads, head_dim = places.kv.kv_heads, places.kv.head_dim
    ffn = _first(text, ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"), 4 * hidden)
    return {
        "layers": _first(text, ("num_hidden_layers", "n_layer", "num_layers")),
        "hidden": hidden,
        "ffn": ffn,
        "gated": bool(places is not None and len(places.ffn_inputs) > 1)
        or "gate" in str(getattr(text, "hidden_act", "")),
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab": int(text.vocab_size),
        "context": _first(text, ("max_position_embeddings", "n_positions"), None),
    }


def _first(config: Any, names: tuple[str, ...], default: Any = ...) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if default is ...:
        raise ValueError(f"{type(config).__name__} has none of {', '.join(names)}")
    return default


def _method_extra(
    model: nn.Module, method: str, method_config: Any, places: Any
) -> tuple[float, int, int]:
    """(extra, LoRA's dropout mask bytes, L_g): the method's per token per block."""
    from peft_core.graph import find_blocks

    try:
        blocks, layers = find_blocks(model)
    except ValueError:
        return 0.0, 0.0, 0
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    indices = [_block_index(name, blocks) for name, _ in trainable]
    indices = [i for i in indices if i is not None]
    grad_layers = layers - min(indices) if indices else layers  # prompt, prefix: all
    first = min(indices) if indices else 0
    in_block = [(n, p) for n, p in trainable if _block_index(n, blocks) == first]
    if method in ("lora", "dora"):
        return _lora_extra(model, blocks, first, method_config, places, method == "dora")
    if method == "ia3":
        return float(sum(p.numel() for _, p in in_block)), 0, grad_layers
    matrices = [p for _, p in in_block if p.dim() == 2]
    extra = sum(p.shape[1] + (p.shape[0] if p.shape[0] < p.shape[1] else 0) for p in matrices)
    return float(extra), 0, grad_layers


def _block_index(name: str, blocks: str) -> int | None:
    prefix = blocks + "."
    at = name.find(prefix)
    if at < 0:
        return None
    index = name[at + len(prefix) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _lora_extra(
    model: nn.Module, blocks: str, index: int, config: Any, places: Any, dora: bool
) -> tuple[float, int, int]:
    """LoRA's saved inputs in block `index` and its dropout masks' bytes (module doc)."""
    from peft_core.graph import in_out
    from peft_core.model import method_of

    layer_types = method_of(model).layer_types
    block = model.get_submodule(f"{blocks}.{index}")
    adapted = {
        p: in_out(m.base_layer) for p, m in block.named_modules() if isinstance(m, layer_types)
    }
    r, groups = config.r, {}
    for path, (d_in, _) in adapted.items():
        groups[_input_role(path, places)] = d_in
    groups.pop("attention_output", None)  # sdpa's saved output is O's input
    outputs = sum(d_out for _, d_out in adapted.values()) if dora else 0
    plain = sum(groups.values()) + r * len(adapted) + outputs
    masks = sum(d_in for d_in, _ in adapted.values())
    layers = len(model.get_submodule(blocks))
    return float(plain), masks, layers - index


def _input_role(path: str, places: Any) -> str:
    """Which input a block-relative Linear reads: modules with the same role share it."""
    if places is None:
        return path
    if path in (*places.query, *places.key, *places.value):
        return "attention_input"
    if path in places.ffn_inputs:
        return "ffn_input"
    if path == places.attention_output:
        return "attention_output"
    return path


# ---- a run -----------------------------------------------------------------------------------


def settings_for(
    train_config: TrainConfig, device: str, method_config: Any = None, devices: int = 1
) -> Settings:
    """A TrainConfig's memory settings for one of `devices` devices, with precision and
    attention resolved for `device`."""
    from peft_core.train import resolve_precision

    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return Settings(
        batch_size=-(-train_config.batch_size // devices),  # the largest share of a batch
        devices=devices,
        sharded=devices > 1 and train_config.parallel == "fsdp",
        max_length=train_config.max_length,
        grad_accum=train_config.grad_accum,
        gradient_checkpointing=train_config.gradient_checkpointing,
        precision=resolve_precision(train_config.precision, device),
        quantize=train_config.quantize,
        attn="eager" if train_config.attn == "eager" else "sdpa",
        device=kind,
        lora_dropout=bool(getattr(method_config, "dropout", 0)),
    )


def load_model_config(model: str | Path | PretrainedConfig) -> PretrainedConfig:
    """A config as given, or read from a model directory's config.json (nothing else read)."""
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    from peft_core.pretrained import load_config

    return load_config(model)


def estimate_for_run(
    model: str | Path | PretrainedConfig,
    train_config: TrainConfig,
    method_config: Any,
    device: str = "cpu",
    *,
    task: str = "causal-lm",
    num_labels: int = 2,
    devices: int = 1,
) -> Estimate:
    """The estimate for training `method_config` on `model` (a directory in HF layout, or its
    config) with `train_config` on `device` ("cpu", "cuda", "cuda:1"): per device of a run
    over `devices`."""
    facts = model_facts(load_model_config(model), method_config, task=task, num_labels=num_labels)
    return estimate(facts, settings_for(train_config, device, method_config, devices))


def refuse_if_too_big(
    model: str | Path | PretrainedConfig,
    train_config: TrainConfig,
    method_config: Any,
    device: str = "cpu",
    *,
    task: str = "causal-lm",
    num_labels: int = 2,
    devices: int = 1,
) -> Estimate:
    """The estimate, or PreflightError when it does not fit the device's free memory now."""
    est = estimate_for_run(
        model, train_config, method_config, device, task=task, num_labels=num_labels,
        devices=devices,
    )  # fmt: skip
    check(est, device)
    return est


__all__ = [
    "Estimate",
    "Fit",
    "ModelFacts",
    "PreflightError",
    "Settings",
    "check",
    "estimate",
    "estimate_for_run",
    "free_memory",
    "model_facts",
    "refuse_if_too_big",
    "settings_for",
]
