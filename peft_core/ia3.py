"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu et al. 2022 (T-Few), arXiv:2205.05638. Learned vectors rescale the keys,
the values and the FFN's inner activation elementwise (§3.3 of the paper):

    softmax(Q·(l_k ⊙ K)ᵀ / √d_k) · (l_v ⊙ V)        l_k, l_v: (d_kv,)
    (l_ff ⊙ γ(W1·x)) · W2                            l_ff: (d_ff,)

On Linear layers, as HF PEFT implements it, with one vector `ia3_l` per layer:

    output-scaling layer (k_proj, v_proj):   h = l ⊙ (W·x + b)    ia3_l: (d_out, 1)
    feed-forward layer (down_proj = W2):     h = W·(l ⊙ x) + b    ia3_l: (1, d_in)

Init: l = 1, so the adapted model starts equal to the base model.
A feed-forward layer with a frozen base trains through `ScaledInputLinear`, which
scales the (d_out, d_in) weight instead of the (n, d_in) input, n = tokens, and
keeps x, not l ⊙ x, for backward (g = ∂L/∂h, (n, d_out)):

    forward    h = x·(W ⊙ l)ᵀ + b
    backward   p = g·W (n, d_in);  ∂x = l ⊙ p;  ∂l = Σ_n x ⊙ p
Merge folds l into the weight, W ← diag(l)·W and b ← l ⊙ b for output scaling,
W ← W·diag(l) for a feed-forward layer (transposed for GPT-2's Conv1D, whose
weight is (d_in, d_out)); unmerge divides again, exact up to rounding, so a
vector with a zero entry is refused at merge.

Default targets (targets.ia3_default_paths, found from the model's structure: the key
and value projections and the FFN's output projection, as the paper) and trainable
parameters, L layers, d model width, d_kv key/value width, d_ff FFN width:
    Llama-like  k_proj, v_proj, down_proj (ff)           L·(2·d_kv + d_ff)
    fused QKV   c_attn / query_key_value / qkv_proj,     L·(d_qkv + d_ff)
                the FFN output (ff)                      (GPT-2: d_qkv = 3·d)
    BERT-style  key, value, output.dense (ff)            L·(2·d_kv + d + d_ff)
A fused layer computes q|k|v, and HF PEFT scales its whole output, so queries get a
vector too. HF PEFT's BERT default "output.dense" matches both output.dense (input
d_ff) and attention.output.dense (input d), scaling the attention output projection's
input as well; BERT, RoBERTa and DeBERTa-v2 keep that default (targets.py says why).
IA3Config lives in configs.py (torch-free: the web judges values with it), re-exported here.
"""

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from peft_core.configs import IA3Config
from peft_core.graph import in_out
from peft_core.methods import Method, WrappedLinear
from peft_core.target_match import matches
from peft_core.targets import compact_target_names, ia3_default_paths, resolve_targets


class IA3Linear(WrappedLinear, nn.Module):
    """An nn.Linear or Conv1D `base_layer` whose output (or, feed-forward, input) is scaled by l."""

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        self.feedforward = feedforward
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # weight (d_in, d_out)
        weight = base_layer.weight
        d_in, d_out = in_out(base_layer)  # a bitsandbytes weight is packed: ask the layer
        # float32 vector even beside a bf16/fp16 base, like LoRA's factors
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        shape = (1, d_in) if feedforward else (d_out, 1)  # HF PEFT's on-disk shapes
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=dtype))
        self.disabled = False
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()  # (d_in,) or (d_out,)
        if self.feedforward and self._frozen_base(x):
            weight = self.base_layer.weight
            w0 = weight.T if self.fan_in_fan_out else weight  # (d_out, d_in)
            return ScaledInputLinear.apply(x, w0, self.base_layer.bias, scale)
        if self.feedforward:
            return self.base_layer((x * scale).to(x.dtype))  # W·(l ⊙ x) + b
        y = self.base_layer(x)
        return (y * scale).to(y.dtype)  # l ⊙ (W·x + b)

    def _frozen_base(self, x: torch.Tensor) -> bool:
        """Whether ScaledInputLinear computes this forward: frozen base, one dtype, no autocast."""
        base = self.base_layer
        frozen = not base.weight.requires_grad and (
            base.bias is None or not base.bias.requires_grad
        )
        same_dtype = x.dtype == base.weight.dtype == self.ia3_l.dtype
        return frozen and same_dtype and not torch.is_autocast_enabled(x.device.type)

    def weight_scale(self) -> torch.Tensor:
        """ia3_l shaped to multiply the base weight in its own layout."""
        return self.ia3_l.T if self.fan_in_fan_out else self.ia3_l

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if not torch.all(self.ia3_l != 0):
            raise ValueError("an (IA)³ vector has a zero entry: merging it could not be undone")
        self.base_layer.weight.mul_(self.weight_scale())
        if not self.feedforward and self.base_layer.bias is not None:
            self.base_layer.bias.mul_(self.ia3_l.flatten())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight.div_(self.weight_scale())
        if not self.feedforward and self.base_layer.bias is not None:
            self.base_layer.bias.div_(self.ia3_l.flatten())
        self.merged = False

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, fan_in_fan_out={self.fan_in_fan_out}"


class ScaledInputLinear(torch.autograd.Function):
    """h = W0·(l ⊙ x) + b for a frozen W0 (d_out, d_in), b; the module docstring's step."""

    @staticmethod
    def forward(ctx, x, w0, bias, scale):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, w0, scale)
        return F.linear(x, w0 * scale, bias)  # (d_out, d_in) scaled, not (n, d_in)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, w0, scale = ctx.saved_tensors
        p = grad @ w0  # (…, d_in)
        grad_x = p * scale if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[3]:
            grad_scale = p.mul_(x).reshape(-1, p.shape[-1]).sum(dim=0)  # p is ours to overwrite
        return grad_x, None, None, grad_scale


def _selects(spec: tuple[str, ...] | str, path: str) -> bool:
    """A regex full-matches the path; a name matches as a dotted suffix, as in target_modules.

    HF PEFT matches feedforward names with a plain `endswith`; the names we write (leaf
    names or full paths) select the same modules under both rules, and a mismatch on
    loading cannot pass silently: the two kinds of `ia3_l` have different shapes.
    """
    return matches(path, spec)


def _feedforward_spec(model: nn.Module, config: IA3Config) -> tuple[str, ...] | str:
    """The config's feedforward_modules, or the default's (the FFN output layers' paths)."""
    if config.feedforward_modules is not None:
        return config.feedforward_modules
    return tuple(ia3_default_paths(model)[1])


def _default_targets(model: nn.Module) -> list[str]:
    return ia3_default_paths(model)[0]


def inject_ia3(model: nn.Module, config: IA3Config) -> list[str]:
    """Replace each target Linear/Conv1D with an IA3Linear around it; returns their paths."""
    paths = resolve_targets(
        model, config.target_modules, exclude=config.modules_to_save, default=_default_targets
    )
    spec = _feedforward_spec(model, config)
    feedforward = {path for path in paths if _selects(spec, path)}
    if spec and not feedforward and config.feedforward_modules is not None:
        raise ValueError(
            f"(IA)³ feedforward_modules {spec!r} matched none of the adapted modules {paths}"
        )
    for path in paths:
        model.set_submodule(path, IA3Linear(model.get_submodule(path), path in feedforward))
    return paths


def to_hf_config(model: nn.Module, config: IA3Config) -> dict[str, Any]:
    """(IA)³'s keys of HF PEFT's adapter_config.json for an adapted model."""
    layers = {path: m for path, m in model.named_modules() if isinstance(m, IA3Linear)}
    feedforward = [path for path, layer in layers.items() if layer.feedforward]
    targets = compact_target_names(model, list(layers))
    feedforward_names = compact_target_names(model, feedforward) if feedforward else []
    if not set(feedforward_names) <= set(targets):  # HF PEFT wants a subset; full paths are one
        targets, feedforward_names = sorted(layers), sorted(feedforward)
    return {
        "target_modules": targets,
        "feedforward_modules": feedforward_names,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "init_ia3_weights": True,
    }


def from_hf_config(hf: dict[str, Any]) -> IA3Config:
    if hf.get("exclude_modules"):
        raise ValueError(
            f"this (IA)³ adapter uses exclude_modules={hf['exclude_modules']!r}, "
            "which peft_core does not support"
        )
    return IA3Config(
        target_modules=hf.get("target_modules"),
        feedforward_modules=hf.get("feedforward_modules"),  # None: the default table, as HF PEFT
        modules_to_save=hf.get("modules_to_save") or (),
    )


METHOD = Method(
    peft_type="IA3",
    prefix="ia3_",
    config_cls=IA3Config,
    layer_types=(IA3Linear,),
    inject=inject_ia3,
    to_hf_config=to_hf_config,
    from_hf_config=from_hf_config,
)
