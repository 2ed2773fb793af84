"""LoRA: Low-Rank Adaptation of Large Language Models.

Hu et al. 2021, arXiv:2106.09685. A frozen weight W0 (d_out, d_in) gets a
trainable low-rank update beside it (eq. 3 of the paper):

    h = W0·x + ΔW·x,   ΔW = (α/r)·B·A,   A: (r, d_in),  B: (d_out, r)

         x (…, d_in)
         ├────────────────┐
         │            dropout
      W0 (frozen)     A  (…, r)
         │            B  (…, d_out)
         │            · α/r
         └──── + ───────┘
               h (…, d_out)

Forward computes ((x·Aᵀ)·Bᵀ)·scale and never materialises B·A; merge folds
W0 += scale·B·A into the base weight and unmerge subtracts it again.
While training, the step is written out by hand (lora_steps.py, which states it in full):
with dropout mask M (x̃ = x ⊙ M/(1 − p)), g = ∂L/∂h (n, d_out) and n = tokens,

    forward    u = x̃·Aᵀ (n, r);  h = x·W0ᵀ + b, then h += s·u·Bᵀ in place
    backward   ∂u = s·g·B;  ∂x = g·W0 + (∂u·A) ⊙ M/(1 − p);  ∂A = ∂uᵀ·x̃;  ∂B = s·gᵀ·u

It applies whenever W0 is frozen: with or without dropout, under autocast, on a half base
with fp32 factors, under gradient checkpointing and on a 4-bit bitsandbytes base; the plain
forward covers the rest (a trainable base, an int8 base, autocast to a dtype the base is not in).
Siblings their parent calls on one x (q, k, v; gate, up: SHARED_INPUT_GROUPS)
take the step together (`SharedInput`): each draws its own dropout mask, as in HF PEFT,
and ∂x = Σ_i g_i·W0_i + Σ_i (∂u_i·A_i) ⊙ M_i/(1 − p) fills one buffer (without dropout
u = x·[A_q; A_k; A_v]ᵀ is one matmul). Each layer keeps its own lora_A / lora_B, so the
saved adapter is unchanged.
scale = α/r, or α/√r with rank-stabilised LoRA (Kalajdzievski 2023,
arXiv:2312.03732). Init: A ~ kaiming-uniform(a=√5), B = 0, so ΔW = 0 and the
adapted model starts equal to the base model.

GPT-2's fused c_attn / c_proj / c_fc are transformers `Conv1D` layers whose
weight is stored transposed, (d_in, d_out) ("fan_in_fan_out"); ΔW is transposed
to match when merging, and the saved config says `fan_in_fan_out: true`.
Trainable parameters: r·(d_in + d_out) per adapted layer.
The config, LoraConfig, lives in configs.py (torch-free: the web judges values with it)
and is re-exported here; its docstring says why dropout defaults to 0.05.
"""

import math
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_core.configs import LoraConfig, lora_scale
from peft_core.graph import in_out
from peft_core.lora_steps import Frozen, LowRankStep, Step, compute_dtype, output_dtype
from peft_core.methods import Method, WrappedLinear
from peft_core.targets import compact_target_names, resolve_targets

# Sibling projections that HF models call on the same tensor (checked at run time, see
# SharedInput): their LoRA steps are computed together.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class LoraLinear(WrappedLinear, nn.Module):
    """An nn.Linear or Conv1D `base_layer` plus the low-rank path lora_B(lora_A(x))·scale."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # weight (d_in, d_out)
        d_in, d_out = in_out(base_layer)
        weight = base_layer.weight
        # float32 adapter even beside a bf16/fp16 base (HF PEFT's autocast_adapter_dtype)
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(d_in, r, bias=False, **factory)  # A: (r, d_in)
        self.lora_B = nn.Linear(r, d_out, bias=False, **factory)  # B: (d_out, r)
        self.scale = lora_scale(r, alpha, rslora)
        self.disabled = False
        self.merged = False
        self.shared_input: SharedInput | None = None  # set by inject_lora for q/k/v, gate/up
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        if self.shared_input is not None and self.shared_input.applies(x):
            return self.shared_input.output(self, x)
        step = self.fast_step(x)
        if step is not None:
            return LowRankStep.apply(x, step, self.lora_A.weight, self.lora_B.weight)[0]
        y = self.base_layer(x)  # (…, d_out)
        x = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(x)) * self.scale).to(y.dtype)  # (…, r) -> (…, d_out)

    def fast_step(self, x: torch.Tensor) -> Step | None:
        """The hand-written step's settings for x (lora_steps.py), or None where the plain
        forward runs: a trainable base, factors of two dtypes, a base it cannot reproduce."""
        base, a, b = self.base_layer, self.lora_A.weight, self.lora_B.weight
        frozen = not base.weight.requires_grad and (
            base.bias is None or not base.bias.requires_grad
        )
        if not (frozen and x.is_floating_point() and a.dtype == b.dtype):
            return None
        compute = compute_dtype(base, x)
        if compute is None:
            return None
        dropping = self.training and isinstance(self.lora_dropout, nn.Dropout)
        p = self.lora_dropout.p if dropping else 0.0
        return Step((self.frozen(),), p, compute, output_dtype(base, x, compute))

    def fast_path_applies(self, x: torch.Tensor) -> bool:
        """Whether the hand-written step computes this forward (see fast_step)."""
        return self.fast_step(x) is not None

    def frozen(self) -> Frozen:
        return Frozen(self.base_layer, self.fan_in_fan_out, self.scale)

    def out_major_weight(self) -> torch.Tensor:
        """The base weight viewed as (d_out, d_in), whatever its layout."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale·B·A, laid out like the base weight ((d_in, d_out) for Conv1D)."""
        delta = self.scale * (self.lora_B.weight @ self.lora_A.weight)  # (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + ΔW with ΔW in the factors' float32 and the sum rounded once into W's dtype
        (in-place ops compute in the wider dtype): a bf16 W gets the nearest bf16 to W + ΔW,
        not ΔW rounded to bf16 and then the sum rounded again."""
        if not self.merged:
            self.base_layer.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}, fan_in_fan_out={self.fan_in_fan_out}"


class SharedInput:
    """Sibling layers their parent calls on one tensor x, in any order (q, k, v; gate, up).

    The first call computes every member's output in one `LowRankStep` (drawing each member's
    dropout mask in member order) and keeps the others' until they are asked for with the same
    x (same object, unchanged): in backward one ∂x buffer for all members instead of a sum of
    three. A forward cut short (checkpointing's recompute stops once it has what backward
    needs) leaves outputs pending; the next forward's first call replaces them.
    """

    def __init__(self, members: list["LoraLinear"]):
        self.members = members
        self.pending: dict[int, torch.Tensor] = {}  # member index -> its computed output
        self.x: torch.Tensor | None = None
        self.version = -1
        self.grad = True
        self.shared = True

    def applies(self, x: torch.Tensor) -> bool:
        layers = self.members
        usable = self.shared and all(not m.disabled and not m.merged for m in layers)
        return usable and all(m.fast_path_applies(x) for m in layers)

    def step(self, x: torch.Tensor) -> Step:
        """One Step for every member: each its own W0, b, s; the first one's dropout and dtypes."""
        first = self.members[0].fast_step(x)
        frozen = tuple(m.frozen() for m in self.members)
        return Step(frozen, first.p, first.compute, first.output)

    def output(self, layer: "LoraLinear", x: torch.Tensor) -> torch.Tensor:
        index = self.members.index(layer)
        if index in self.pending:
            if self.x is x and self.version == x._version and self.grad == torch.is_grad_enabled():
                out = self.pending.pop(index)
                if not self.pending:
                    self.x = None  # everything handed out: hold no tensor between steps
                return out
            self.shared = False  # the members see different inputs (cross-attention): stop
            self.pending, self.x = {}, None
            return layer(x)
        factors = [t for m in self.members for t in (m.lora_A.weight, m.lora_B.weight)]
        outputs = LowRankStep.apply(x, self.step(x), *factors)
        self.pending = {i: out for i, out in enumerate(outputs) if i != index}
        self.x, self.version, self.grad = x, x._version, torch.is_grad_enabled()
        return outputs[index]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pending": {}, "x": None}


def inject_lora(
    model: nn.Module, config: LoraConfig, layer_cls: type[LoraLinear] = LoraLinear
) -> list[str]:
    """Replace each target Linear/Conv1D with a `layer_cls` around it; returns their paths."""
    paths = resolve_targets(model, config.target_modules, exclude=config.modules_to_save)
    for path in paths:
        base = model.get_submodule(path)
        layer = layer_cls(base, config.r, config.alpha, config.dropout, config.use_rslora)
        model.set_submodule(path, layer)
    if layer_cls is LoraLinear:
        share_inputs(model, paths)
    return paths


def share_inputs(model: nn.Module, paths: list[str]) -> None:
    """Give each set of adapted siblings of SHARED_INPUT_GROUPS one SharedInput."""
    adapted = set(paths)
    for parent_path, _ in model.named_modules():
        prefix = f"{parent_path}." if parent_path else ""
        for names in SHARED_INPUT_GROUPS:
            found = [f"{prefix}{name}" for name in names if f"{prefix}{name}" in adapted]
            if len(found) < 2:
                continue
            members = [model.get_submodule(path) for path in found]
            if all(type(m) is LoraLinear for m in members):
                group = SharedInput(members)
                for member in members:
                    member.shared_input = group


def lora_paths(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if isinstance(m, LoraLinear)]


def to_hf_config(model: nn.Module, config: LoraConfig) -> dict[str, Any]:
    """LoRA's keys of HF PEFT's adapter_config.json for an adapted model."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    return {
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": compact_target_names(model, lora_paths(model)),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "bias": "none",
    }


# HF PEFT LoRA options that change what the adapter computes; we refuse any
# value other than "off" rather than load an adapter that would behave differently.
_UNSUPPORTED_HF_KEYS = (
    "use_dora",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "exclude_modules",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "use_qalora",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "use_bdlora",
)


# init_lora_weights values that rewrite the base weights when the adapter is created
# (PiSSA and OLoRA keep W0 - B·A as the new base, CorDA likewise, LoftQ a quantised residual):
# such an adapter is only right on the base it rewrote, which HF PEFT does not save, so on
# the original base its logits are off. Init-only values (True, False, "gaussian", "eva",
# "orthogonal") leave W0 alone and load as any LoRA adapter.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def _rewrites_the_base(init: Any) -> bool:
    return isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS)


def _refuse_unsupported(hf: dict[str, Any]) -> None:
    init = hf.get("init_lora_weights")
    if _rewrites_the_base(init):
        raise ValueError(
            f"this LoRA adapter was made with init_lora_weights={init!r}, which rewrites the "
            "base model's weights: on the original base its outputs would be wrong. Convert "
            "it to a plain LoRA adapter first (HF PEFT: save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)), then load that."
        )
    used = [key for key in _UNSUPPORTED_HF_KEYS if hf.get(key) not in (None, False, {}, [])]
    if hf.get("bias", "none") != "none":
        used.append("bias")
    if used:
        shown = ", ".join(f"{key}={hf[key]!r}" for key in used)
        raise ValueError(f"this LoRA adapter uses {shown}, which peft_core does not support")


def from_hf_config(hf: dict[str, Any]) -> LoraConfig:
    _refuse_unsupported(hf)
    return LoraConfig(
        r=hf.get("r", 8),
        alpha=float(hf.get("lora_alpha", 8)),
        dropout=hf.get("lora_dropout", 0.0),
        target_modules=hf.get("target_modules"),
        use_rslora=bool(hf.get("use_rslora", False)),
        modules_to_save=hf.get("modules_to_save") or (),
    )


METHOD = Method(
    peft_type="LORA",
    prefix="lora_",
    config_cls=LoraConfig,
    layer_types=(LoraLinear,),
    inject=inject_lora,
    to_hf_config=to_hf_config,
    from_hf_config=from_hf_config,
)
