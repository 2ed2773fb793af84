"""Bottleneck adapters: sequential (Houlsby, Pfeiffer) and parallel.

Houlsby et al. 2019, arXiv:1902.00751 (an adapter after attention and after the
FFN); Pfeiffer et al. 2020, arXiv:2005.00247 (after the FFN only); He et al.
2022, arXiv:2110.04366 (a scaled adapter parallel to the FFN). One adapter:

    branch(x) = s·(f(x·W_down + b_down)·W_up + b_up)
    W_down: (d, m)   b_down: (m,)   W_up: (m, d)   b_up: (d,)   x: (…, d)

    sequential, on a sublayer's output y:   y' = y + branch(y)            (s = 1)
    parallel, beside the FFN with input x:  h = FFN(x) + branch(x)

    houlsby    y = attention output projection, and y = the FFN's last projection
    pfeiffer   y = the FFN's last projection
    parallel   x = the FFN's input

The sublayer outputs are taken before residual + LayerNorm (BERT) or before the
residual add (Llama, GPT-2). The sites come from the model's structure (structure.py): the
attention's output projection O, the FFN's last projection W_out, and the FFN module,
called as ffn(x) (Llama's mlp) or ffn(h_ff, x) with x its residual argument (BERT's
output, LayerNorm(dense(h_ff) + x): the branch joins x there). A block whose FFN layers sit
in the block itself (OPT's fc1, fc2) has no FFN module: the parallel adapter wraps W_out and
reads x where W_in reads it (a forward pre-hook on W_in).
m = bottleneck_dim, or d // reduction_factor (at least 1); with neither set,
reduction_factor = 16 (AdapterHub's default), so m scales with the model width.
Dropout acts on the branch's input, f is relu | gelu | silu | tanh.
Init: W_down kaiming-uniform(a=√5) as nn.Linear, b_down = 0, W_up = 0, b_up = 0,
so branch = 0 and the adapted model starts equal to the base model.

Adapters add sequential computation and are never merged. Trainable parameters:
2·d·m + m + d per adapter; Houlsby has 2 per layer, Pfeiffer and parallel 1.
On disk: our own `peft_type: BOTTLENECK` with this config's fields (HF PEFT has
no bottleneck adapter and cannot load it); keys base_model.model.<site>.adapter_down.weight.
BottleneckConfig lives in configs.py (torch-free: the web judges values with it),
re-exported here.
"""

import math
from typing import Any

import torch
from torch import nn

from peft_core.configs import BottleneckConfig
from peft_core.graph import in_out
from peft_core.methods import Method, WrappedLinear
from peft_core.structure import Places, find_places

# The module of each of configs.ACTIVATION_CHOICES.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


class BottleneckLayer(nn.Module):
    """A wrapped `base_layer` and the branch s·(f(x·W_down + b_down)·W_up + b_up)."""

    def __init__(self, base_layer: nn.Module, d: int, config: BottleneckConfig):
        super().__init__()
        self.base_layer = base_layer
        reference = next(base_layer.parameters())
        # float32 adapter even beside a bf16/fp16 base, like LoRA's factors
        dtype = reference.dtype if reference.dtype == torch.float64 else torch.float32
        factory = {"device": reference.device, "dtype": dtype}
        m = config.width(d)
        self.adapter_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.adapter_down = nn.Linear(d, m, **factory)  # weight (m, d) = W_downᵀ
        self.adapter_act = ACTIVATIONS[config.activation]()
        self.adapter_up = nn.Linear(m, d, **factory)  # weight (d, m) = W_upᵀ
        self.scaling = config.scaling
        self.disabled = False
        self.merged = False  # always: adapters are never merged
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's output for x (…, d), in x's dtype."""
        h = self.adapter_dropout(x).to(self.adapter_down.weight.dtype)
        h = self.adapter_up(self.adapter_act(self.adapter_down(h)))  # (…, m) -> (…, d)
        if self.scaling != 1.0:  # in place: a Linear's backward does not need its output
            h = h.mul_(self.scaling)
        return h.to(x.dtype)

    def add_branch(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + branch(x), summed into the branch's own fresh buffer when the dtypes agree."""
        h = self.branch(x)
        return h.add_(y) if h.dtype == y.dtype and h.shape == y.shape else y + h

    def extra_repr(self) -> str:
        return f"scaling={self.scaling:g}"


class SequentialAdapter(WrappedLinear, BottleneckLayer):
    """A sublayer's output projection followed by y + branch(y) (Houlsby, Pfeiffer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (…, d)
        return y if self.disabled else self.add_branch(y, y)


class ParallelAdapter(BottleneckLayer):
    """An FFN block plus branch(x) of its input x (He et al.'s parallel adapter)."""

    def __init__(self, base_layer: nn.Module, d: int, config: BottleneckConfig, residual: bool):
        super().__init__(base_layer, d, config)
        self.takes_residual = residual  # BERT: called as ffn(h_ff, x), x the FFN input

    def forward(self, hidden_states: torch.Tensor, *args: Any) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(hidden_states, *args)
        if self.takes_residual:  # LayerNorm(dense(h_ff) + x + branch(x))
            (x,) = args
            return self.base_layer(hidden_states, x + self.branch(x))
        return self.add_branch(self.base_layer(hidden_states, *args), hidden_states)


class ParallelAtOutput(WrappedLinear, BottleneckLayer):
    """A parallel adapter for an FFN that is no module of its own: wraps W_out, adds branch(x)
    with x the input W_in read in the same block call (`remember_input`, W_in's pre-hook)."""

    def __init__(self, base_layer: nn.Module, d: int, config: BottleneckConfig):
        super().__init__(base_layer, d, config)
        self.ffn_input: torch.Tensor | None = None

    def remember_input(self, module: nn.Module, args: tuple) -> None:
        self.ffn_input = args[0]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(hidden_states)
        x, self.ffn_input = self.ffn_input, None  # hold no tensor between calls
        if self.disabled:
            return y
        if x is None:
            raise RuntimeError("the parallel adapter did not see its FFN's input this call")
        return self.add_branch(y, x)


def adapter_places(model: nn.Module) -> Places:
    """The model's places; refused where there is no FFN for an adapter to sit by."""
    places = find_places(model)
    if places.ffn_output is None:
        raise ValueError(f"bottleneck adapters need an FFN in each block of {places.blocks}")
    return places


def inject_sequential(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Wrap the output projection(s) the placement names in a SequentialAdapter."""
    places = adapter_places(model)
    relatives = [places.ffn_output]
    if config.placement == "houlsby":
        relatives.insert(0, places.attention_output)
    paths = [path for relative in relatives for path in places.in_blocks(relative)]
    for path in paths:
        base = model.get_submodule(path)
        model.set_submodule(path, SequentialAdapter(base, in_out(base)[1], config))
    return paths


def inject_parallel(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """A parallel adapter beside every block's FFN (also MAM's adapter half)."""
    places = adapter_places(model)
    if places.ffn is None:
        return _inject_at_output(model, config, places)
    paths = places.in_blocks(places.ffn)
    for path in paths:
        ffn = model.get_submodule(path)
        layer = ParallelAdapter(ffn, places.hidden, config, places.ffn_takes_residual)
        model.set_submodule(path, layer)
    return paths


def _inject_at_output(model: nn.Module, config: BottleneckConfig, places: Places) -> list[str]:
    paths = places.in_blocks(places.ffn_output)
    for block, path in enumerate(paths):
        layer = ParallelAtOutput(model.get_submodule(path), places.hidden, config)
        model.set_submodule(path, layer)
        reader = f"{places.blocks}.{block}.{places.ffn_inputs[0]}"
        model.get_submodule(reader).register_forward_pre_hook(layer.remember_input)
    return paths


def inject_bottleneck(model: nn.Module, config: BottleneckConfig) -> list[str]:
    if config.placement == "parallel":
        return inject_parallel(model, config)
    return inject_sequential(model, config)


def to_hf_config(model: nn.Module, config: BottleneckConfig) -> dict[str, Any]:
    """Our keys of adapter_config.json (peft_type BOTTLENECK, which HF PEFT does not know)."""
    return {
        "placement": config.placement,
        "bottleneck_dim": config.bottleneck_dim,
        "reduction_factor": config.reduction_factor,
        "activation": config.activation,
        "scaling": config.scaling,
        "dropout": config.dropout,
    }


def from_hf_config(hf: dict[str, Any]) -> BottleneckConfig:
    return BottleneckConfig(
        placement=hf.get("placement", "houlsby"),
        bottleneck_dim=hf.get("bottleneck_dim"),
        reduction_factor=hf.get("reduction_factor"),
        activation=hf.get("activation", "relu"),
        scaling=hf.get("scaling", 1.0),
        dropout=hf.get("dropout", 0.0),
        modules_to_save=hf.get("modules_to_save") or (),
    )


METHOD = Method(
    peft_type="BOTTLENECK",
    prefix="adapter_",
    config_cls=BottleneckConfig,
    layer_types=(SequentialAdapter, ParallelAdapter, ParallelAtOutput),
    inject=inject_bottleneck,
    to_hf_config=to_hf_config,
    from_hf_config=from_hf_config,
)
