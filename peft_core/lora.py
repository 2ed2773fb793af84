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
scale = α/r, or α/√r with rank-stabilised LoRA (Kalajdzievski 2023,
arXiv:2312.03732). Init: A ~ kaiming-uniform(a=√5), B = 0, so ΔW = 0 and the
adapted model starts equal to the base model.

GPT-2's fused c_attn / c_proj / c_fc are transformers `Conv1D` layers whose
weight is stored transposed, (d_in, d_out) ("fan_in_fan_out"); ΔW is transposed
to match when merging, and the saved config says `fan_in_fan_out: true`.
Trainable parameters: r·(d_in + d_out) per adapted layer.
"""

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_core.methods import Method, WrappedLinear
from peft_core.targets import ALL_LINEAR, TargetSpec, compact_target_names, resolve_targets

MAX_RANK = 1024
MAX_ALPHA = 10_000.0


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: TargetSpec = None
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__
        object.__setattr__(self, "target_modules", _normalise_targets(self.target_modules))
        object.__setattr__(self, "modules_to_save", _normalise_names(self.modules_to_save))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 1 <= self.r <= MAX_RANK:
            raise ValueError(f"LoRA r must be an integer in 1..{MAX_RANK}, got {self.r!r}")
        if not _is_number(self.alpha) or not 0 < self.alpha <= MAX_ALPHA:
            raise ValueError(
                f"LoRA alpha must be a number in (0, {MAX_ALPHA:g}], got {self.alpha!r}"
            )
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be a number in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.use_rslora)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _normalise_names(names: Any) -> tuple[str, ...]:
    """A name, or a list/tuple/set of names, as a tuple of non-empty strings."""
    names = (names,) if isinstance(names, str) else tuple(names or ())
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"module names must be non-empty strings, got {names!r}")
    return names


def _normalise_targets(spec: Any) -> TargetSpec:
    """None and "all-linear" stay; another str must be a valid regex; a list becomes a tuple."""
    if spec is None or spec == ALL_LINEAR:
        return spec
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as err:
            raise ValueError(f"LoRA target_modules {spec!r} is not a valid regex: {err}") from None
        return spec
    names = _normalise_names(spec)
    if not names:
        raise ValueError("LoRA target_modules is empty; use None for the architecture default")
    return names


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraLinear(WrappedLinear, nn.Module):
    """An nn.Linear or Conv1D `base_layer` plus the low-rank path lora_B(lora_A(x))·scale."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # weight (d_in, d_out)
        d_in, d_out = _in_out_features(base_layer)
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
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (…, d_out)
        if self.disabled or self.merged:
            return y
        x = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(x)) * self.scale).to(y.dtype)  # (…, r) -> (…, d_out)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale·B·A, laid out like the base weight ((d_in, d_out) for Conv1D)."""
        delta = self.scale * (self.lora_B.weight @ self.lora_A.weight)  # (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = self.base_layer.weight
            weight += self.delta_weight().to(weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.base_layer.weight
            weight -= self.delta_weight().to(weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}, fan_in_fan_out={self.fan_in_fan_out}"


def _in_out_features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def inject_lora(
    model: nn.Module, config: LoraConfig, layer_cls: type[LoraLinear] = LoraLinear
) -> list[str]:
    """Replace each target Linear/Conv1D with a `layer_cls` around it; returns their paths."""
    paths = resolve_targets(model, config.target_modules, exclude=config.modules_to_save)
    for path in paths:
        base = model.get_submodule(path)
        layer = layer_cls(base, config.r, config.alpha, config.dropout, config.use_rslora)
        model.set_submodule(path, layer)
    return paths


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


def _refuse_unsupported(hf: dict[str, Any]) -> None:
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
    name="LoRA",
    peft_type="LORA",
    prefix="lora_",
    config_cls=LoraConfig,
    layer_types=(LoraLinear,),
    mergeable=True,
    inject=inject_lora,
    to_hf_config=to_hf_config,
    from_hf_config=from_hf_config,
)
