"""The cases every PEFT method runs through the shared battery (test_battery.py).

A method adds one `MethodCase` per configuration worth testing. `config(kind, task)` builds
the method's config for a tiny model; `expected_params(kind, task)` is the closed-form count
of the adapter's own trainable parameters (ARCHITECTURE.md's table), without the
classification head, which the battery adds itself.

Tiny models (peft_core.tiny): 2 layers, hidden 64, FFN 128, 4 heads of 16; Llama has 2
key/value heads (d_kv = 32, grouped-query attention); GPT-2's fused c_attn is 64 -> 192.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peft_core.bottleneck import BottleneckConfig
from peft_core.dora import DoraConfig
from peft_core.ia3 import IA3Config
from peft_core.lora import LoraConfig
from peft_core.mam import MAMConfig
from peft_core.prefix_tuning import PrefixTuningConfig
from peft_core.prompt_tuning import PromptTuningConfig

LAYERS, D, D_FF = 2, 64, 128
D_KV = {"llama": 32, "gpt2": 64, "bert": 64}
ARCHITECTURES = [
    ("llama", "causal-lm"),
    ("gpt2", "causal-lm"),
    ("llama", "seq-cls"),
    ("gpt2", "seq-cls"),
    ("bert", "seq-cls"),
]


@dataclass(frozen=True)
class MethodCase:
    id: str
    config: Callable[[str, str], Any]
    expected_params: Callable[[str, str], int]
    mergeable: bool
    identity_at_init: bool = True  # prompt / prefix tuning change outputs from the start
    architectures: tuple[tuple[str, str], ...] = tuple(ARCHITECTURES)


R = 4


def _lora_qv_params(kind: str, task: str) -> int:
    per_layer = {
        "llama": R * ((D + D) + (D + D_KV["llama"])),  # q_proj, v_proj
        "gpt2": R * (D + 3 * D),  # fused c_attn
        "bert": R * 2 * (D + D),  # query, value
    }[kind]
    return LAYERS * per_layer


# (d_in, d_out) of the Linear-like modules a target spec adapts in one layer.
QV_SHAPES = {
    "llama": [(D, D), (D, D_KV["llama"])],  # q_proj, v_proj
    "gpt2": [(D, 3 * D)],  # fused c_attn
    "bert": [(D, D), (D, D)],  # query, value
}
ALL_LINEAR_SHAPES = {
    # q, k, v, o, gate, up, down
    "llama": [(D, D), (D, D_KV["llama"]), (D, D_KV["llama"]), (D, D), (D, D_FF), (D, D_FF)]
    + [(D_FF, D)],
    "gpt2": [(D, 3 * D), (D, D), (D, D_FF), (D_FF, D)],  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    "bert": [(D, D)] * 4 + [(D, D_FF), (D_FF, D)],  # q, k, v, attention out, intermediate, out
}


def _dora_params(shapes: list[tuple[int, int]]) -> int:
    """LoRA's r·(d_in + d_out) plus the magnitude's d_out, per adapted layer."""
    return sum(R * (d_in + d_out) + d_out for d_in, d_out in shapes)


def _dora_qv_params(kind: str, task: str) -> int:
    return _dora_params(LAYERS * QV_SHAPES[kind])


def _dora_all_linear_params(kind: str, task: str) -> int:
    pooler = [(D, D)] if kind == "bert" else []  # BERT's pooler.dense, outside the layers
    return _dora_params(LAYERS * ALL_LINEAR_SHAPES[kind] + pooler)


def _ia3_params(kind: str, task: str) -> int:
    per_layer = {
        "llama": 2 * D_KV["llama"] + D_FF,  # l_k, l_v, l_ff (down_proj's input)
        "gpt2": 3 * D + D_FF,  # the whole fused c_attn output, mlp.c_proj's input
        "bert": 2 * D_KV["bert"] + D + D_FF,  # "output.dense" also catches attention.output.dense
    }[kind]
    return LAYERS * per_layer


CASES: list[MethodCase] = [
    MethodCase(
        id="lora-qv",
        config=lambda kind, task: LoraConfig(r=R, alpha=8.0),
        expected_params=_lora_qv_params,
        mergeable=True,
    ),
    MethodCase(
        id="dora-qv",
        config=lambda kind, task: DoraConfig(r=R, alpha=8.0),
        expected_params=_dora_qv_params,
        mergeable=True,
    ),
    MethodCase(
        id="dora-all-linear",
        config=lambda kind, task: DoraConfig(r=R, alpha=8.0, target_modules="all-linear"),
        expected_params=_dora_all_linear_params,
        mergeable=True,
    ),
    MethodCase(
        id="ia3",
        config=lambda kind, task: IA3Config(),
        expected_params=_ia3_params,
        mergeable=True,
    ),
]


M = 8  # bottleneck width


def _adapter_params(adapters_per_layer: int) -> Callable[[str, str], int]:
    """2·d·m + m + d per bottleneck adapter (W_down, b_down, W_up, b_up)."""
    return lambda kind, task: LAYERS * adapters_per_layer * (2 * D * M + M + D)


CASES += [
    MethodCase(
        id="bottleneck-houlsby",
        config=lambda kind, task: BottleneckConfig(placement="houlsby", bottleneck_dim=M),
        expected_params=_adapter_params(2),
        mergeable=False,
    ),
    MethodCase(
        id="bottleneck-pfeiffer",
        config=lambda kind, task: BottleneckConfig(
            placement="pfeiffer", bottleneck_dim=M, activation="gelu"
        ),
        expected_params=_adapter_params(1),
        mergeable=False,
    ),
    MethodCase(
        id="bottleneck-parallel",
        config=lambda kind, task: BottleneckConfig(
            placement="parallel", reduction_factor=D // M, activation="silu", scaling=4.0
        ),
        expected_params=_adapter_params(1),
        mergeable=False,
    ),
]


P, H = 4, 16  # virtual tokens; prefix tuning's MLP width


def _prefix_params(kind: str, task: str) -> int:
    """p·L·2·d_kv: the key/value table."""
    return P * LAYERS * 2 * D_KV[kind]


def _prefix_mlp_params(kind: str, task: str) -> int:
    """p·d + (d·h + h) + (h·L·2·d_kv + L·2·d_kv): E and the MLP computing the table."""
    width = LAYERS * 2 * D_KV[kind]
    return P * D + (D * H + H) + (H * width + width)


CASES += [
    MethodCase(
        id="prompt-random",
        config=lambda kind, task: PromptTuningConfig(num_virtual_tokens=P),
        expected_params=lambda kind, task: P * D,
        mergeable=False,
        identity_at_init=False,
    ),
    MethodCase(
        id="prefix",
        config=lambda kind, task: PrefixTuningConfig(num_virtual_tokens=P),
        expected_params=_prefix_params,
        mergeable=False,
        identity_at_init=False,
    ),
    MethodCase(
        id="prefix-mlp",
        config=lambda kind, task: PrefixTuningConfig(num_virtual_tokens=P, projection_dim=H),
        expected_params=_prefix_mlp_params,
        mergeable=False,
        identity_at_init=False,
    ),
]


def _mam_params(prefix_params: Callable[[str, str], int]) -> Callable[[str, str], int]:
    """MAM: the parallel adapter's L·(2·d·m + m + d) plus the prefix's own count."""
    return lambda kind, task: _adapter_params(1)(kind, task) + prefix_params(kind, task)


CASES += [
    MethodCase(
        id="mam",
        config=lambda kind, task: MAMConfig(num_virtual_tokens=P, bottleneck_dim=M),
        expected_params=_mam_params(_prefix_params),
        mergeable=False,
        identity_at_init=False,
    ),
    MethodCase(
        id="mam-mlp",
        config=lambda kind, task: MAMConfig(
            num_virtual_tokens=P, projection_dim=H, reduction_factor=D // M, activation="gelu"
        ),
        expected_params=_mam_params(_prefix_mlp_params),
        mergeable=False,
        identity_at_init=False,
    ),
]
