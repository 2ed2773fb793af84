"""MAM adapter: a parallel adapter beside the FFN and prefix tuning in the attention.

He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning",
arXiv:2110.04366, §4.4 ("Mix-And-Match"). Layer l of the frozen model computes

    attn_l = softmax(Q·[P_k^l ; K]ᵀ / √d_h)·[P_v^l ; V]     P_k^l, P_v^l: (n_kv, p, d_h)
    h_l    = FFN(x) + s·(f(x·W_down + b_down)·W_up + b_up)  x: (…, d), W_down: (d, m)

The two halves are the existing methods, composed rather than copied: the adapter is
bottleneck.py's parallel injection (placement "parallel"), the prefix is
prefix_tuning.py's (p virtual key/value pairs per layer, optionally trained through
the MLP of width h = projection_dim). Their inits apply: W_up = b_up = 0, so the adapter
starts at zero, but the prefix P ~ N(0, 1) changes the outputs from the first step.

The config (MAMConfig in configs.py, torch-free, re-exported here) is flat (one form,
one JSON object for a run) and hands each half its own config: `adapter_config()` and
`prefix_config()`, whose checks it reuses. The paper's
MAM uses p = 30 and s = 4 with m = d/2; the defaults keep p = 30 and s = 4 but take
bottleneck.py's width rule (m = d // 16 unless bottleneck_dim is set).

Trainable parameters: L·(2·d·m + m + d) for the adapter, plus the prefix's
p·L·2·d_kv (or p·d + (d·h + h) + (h·L·2·d_kv + L·2·d_kv) through the MLP).
On disk: our own `peft_type: MAM` (HF PEFT has no MAM adapter), keys
base_model.model.<ffn>.adapter_down.weight … and base_model.model.prefix_encoder.embedding,
the prefix saved as the table P (the MLP folded in, as prefix tuning saves it), so a
loaded MAM adapter has projection_dim None.
"""

from typing import Any

from torch import nn

from peft_core import bottleneck, prefix_tuning
from peft_core.configs import MAMConfig
from peft_core.methods import Method


def inject_mam(model: nn.Module, config: MAMConfig) -> list[str]:
    """A parallel adapter beside every FFN, then the prefix in every self-attention."""
    adapted = bottleneck.inject_parallel(model, config.adapter_config())
    return adapted + prefix_tuning.inject_prefix_tuning(model, config.prefix_config())


CONFIG_KEYS = (
    "num_virtual_tokens",
    "bottleneck_dim",
    "reduction_factor",
    "scaling",
    "activation",
    "dropout",
)


def to_hf_config(model: nn.Module, config: MAMConfig) -> dict[str, Any]:
    """Our keys of adapter_config.json; the prefix is saved as its table, so no projection."""
    return {**{key: getattr(config, key) for key in CONFIG_KEYS}, "projection_dim": None}


def from_hf_config(hf: dict[str, Any]) -> MAMConfig:
    known = {key: hf[key] for key in CONFIG_KEYS if key in hf}
    return MAMConfig(**known, modules_to_save=hf.get("modules_to_save") or ())


METHOD = Method(
    peft_type="MAM",
    prefix=bottleneck.METHOD.prefix,
    extra_prefixes=(prefix_tuning.METHOD.prefix,),
    config_cls=MAMConfig,
    layer_types=(
        bottleneck.ParallelAdapter,
        bottleneck.ParallelAtOutput,
        *prefix_tuning.METHOD.layer_types,
    ),
    inject=inject_mam,
    to_hf_config=to_hf_config,
    from_hf_config=from_hf_config,
    export_state=prefix_tuning.export_state,
)
