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

from peft_core.lora import LoraConfig

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


CASES: list[MethodCase] = [
    MethodCase(
        id="lora-qv",
        config=lambda kind, task: LoraConfig(r=R, alpha=8.0),
        expected_params=_lora_qv_params,
        mergeable=True,
    ),
]
