"""DoRA: Weight-Decomposed Low-Rank Adaptation.

Liu et al. 2024, arXiv:2402.09353. LoRA's update, with the adapted weight split
into a direction and a trainable magnitude per output row (eq. 5 of the paper):

    W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_r,   ΔW = s·B·A
    W0: (d_out, d_in)   A: (r, d_in)   B: (d_out, r)   m: (d_out,)

‖·‖_r is the L2 norm of each output row (the paper's column norm, written for
the transposed (d_in, d_out) layout). Init: LoRA's (A kaiming-uniform, B = 0)
and m = ‖W0‖_r, so W' = W0 and the adapted model starts equal to the base one.

Forward, with g = m / ‖W0 + ΔW‖_r a detached constant (paper §4.3: the norm
gets no gradient), written as HF PEFT computes it so logits agree:

    h = W0·x + b + (g − 1) ⊙ W0·x̃ + g ⊙ s·B·A·x̃        g: (d_out,)

x̃ is the input after LoRA dropout. Without dropout (or in eval) x̃ = x, W0·x is
the base output less its bias, and h = g ⊙ (W0·x + s·B·A·x) + b. While dropout
is active HF PEFT runs the base matmul once more on x̃, and so do we.
The norm never materialises W0 + ΔW (each row i, costing one W0·Aᵀ):

    ‖W0_i + s·B_i·A‖² = ‖W0_i‖² + 2s·B_i·(A·W0_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ

‖W0_i‖² is kept between steps (W0 is frozen) and recomputed when W0's version
counter moves (merge, load_state_dict). While training without dropout, the step
is written out by hand (`DoraLinearFunction`, LoRA's `LowRankLinear` with g):

    forward    u = x·Aᵀ;  z = x·W0ᵀ + s·u·Bᵀ (one buffer);  h = g ⊙ z + b
    backward   ∂g = Σ_n ∂h ⊙ z;  ∂z = g ⊙ ∂h;  then LoRA's backward with ∂z

It keeps one (n, d_out) tensor for backward where the autograd of HF PEFT's form
keeps two, and makes three elementwise passes over (n, d_out) instead of about ten.

Merge: W0 ← g ⊙ (W0 + ΔW) per output row, remembering ‖W0 + ΔW‖_r (the norm
of the unmerged weight); unmerge: W0 ← W'/g − ΔW. GPT-2's Conv1D stores the
weight transposed (d_in, d_out), so g scales its columns there.

On disk this is HF PEFT's LoRA (`peft_type: LORA`, `use_dora: true`) with the
magnitude under `base_model.model.<path>.lora_magnitude_vector`.
Trainable parameters: r·(d_in + d_out) + d_out per adapted layer.
DoraConfig (configs.py, re-exported here) is LoraConfig's fields and checks under its own name.
"""

from dataclasses import fields
from typing import Any

import torch
from torch import nn

from peft_core import lora
from peft_core.configs import DoraConfig, LoraConfig
from peft_core.lora import LoraLinear, low_rank_backward
from peft_core.methods import Method


class DoraLinear(LoraLinear):
    """A LoraLinear whose output rows are renormalised to the trainable `lora_magnitude_vector`."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__(base_layer, r, alpha, dropout, rslora)
        # ‖W0 + ΔW‖_r at merge time: unmerge needs the norm of the *unmerged* weight.
        self.register_buffer("merged_norm", None, persistent=False)
        self._w0_square: tuple[tuple[int, int], torch.Tensor] | None = None  # key, ‖W0_i‖²
        # B = 0 here, so this is ‖W0‖_r, computed exactly as forward will: g = 1 at init.
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())  # (d_out,)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s·B·A‖ per output row, (d_out,), detached, without forming W0 + s·B·A."""
        a, b, s = self.lora_A.weight, self.lora_B.weight, self.scale  # (r, d_in), (d_out, r)
        w0 = self.out_major_weight().to(a.dtype)  # (d_out, d_in), a view
        base = self._base_square(w0)  # ‖W0_i‖²
        cross = (b * (w0 @ a.T)).sum(dim=1)  # B_i·(A·W0_iᵀ)    (d_out, r) -> (d_out,)
        low_rank = (b @ (a @ a.T) * b).sum(dim=1)  # B_i·(A·Aᵀ)·B_iᵀ
        return (base + 2 * s * cross + s * s * low_rank).clamp_min(0).sqrt()

    def _base_square(self, w0: torch.Tensor) -> torch.Tensor:
        """‖W0_i‖², (d_out,), recomputed only when the base weight changed."""
        weight = self.base_layer.weight
        key = (weight._version, weight.data_ptr())
        if self._w0_square is None or self._w0_square[0] != key:
            self._w0_square = (key, torch.linalg.vector_norm(w0, dim=1).square())
        return self._w0_square[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        g = self.lora_magnitude_vector / self.weight_norm()  # (d_out,)
        if self.fast_path_applies(x):
            a, b, w0 = self.lora_A.weight, self.lora_B.weight, self.out_major_weight()
            return DoraLinearFunction.apply(x, w0, self.base_layer.bias, a, b, self.scale, g)
        y = self.base_layer(x)  # (…, d_out)
        dropping = self.training and not isinstance(self.lora_dropout, nn.Identity)
        x_drop = self.lora_dropout(x)
        w0_x = self._without_bias(self.base_layer(x_drop) if dropping else y)
        low_rank = self.lora_B(self.lora_A(x_drop.to(self.lora_A.weight.dtype))) * self.scale
        return y + ((g - 1) * w0_x + g * low_rank).to(y.dtype)

    def _without_bias(self, y: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        return y if bias is None else y - bias

    def _per_output(self, vector: torch.Tensor) -> torch.Tensor:
        """A (d_out,) vector shaped to scale the output rows of the base weight's layout."""
        return vector.view(1, -1) if self.fan_in_fan_out else vector.view(-1, 1)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base_layer.weight
        norm = self.weight_norm()
        g = self._per_output(self.lora_magnitude_vector / norm)
        weight.copy_(g * (weight.to(g.dtype) + self.delta_weight()))
        self.merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        g = self._per_output(self.lora_magnitude_vector / self.merged_norm)
        weight.copy_(weight.to(g.dtype) / g - self.delta_weight())
        self.merged_norm = None
        self.merged = False


class DoraLinearFunction(torch.autograd.Function):
    """h = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b for a frozen W0, b; the module docstring's step."""

    @staticmethod
    def forward(ctx, x, w0, bias, a, b, scale, g):  # noqa: ANN001, ANN205
        x2 = x.reshape(-1, x.shape[-1])  # (n, d_in)
        u = x2 @ a.T  # (n, r)
        z = (x2 @ w0.T).addmm_(u, b.T, alpha=scale)  # (n, d_out)
        h = z * g if bias is None else torch.addcmul(bias, z, g)
        ctx.save_for_backward(x2, u, z, g, w0, a, b)
        ctx.scale = scale
        return h.view(*x.shape[:-1], h.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x2, u, z, g, w0, a, b = ctx.saved_tensors
        grad_h = grad.reshape(-1, grad.shape[-1])  # (n, d_out)
        grad_g = (grad_h * z).sum(dim=0) if ctx.needs_input_grad[6] else None
        grad_x, grad_a, grad_b = low_rank_backward(ctx, grad_h * g, x2, u, w0, a, b)
        if grad_x is not None:
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
        return grad_x, None, None, grad_a, grad_b, None, grad_g


def inject_dora(model: nn.Module, config: DoraConfig) -> list[str]:
    """Replace each target Linear/Conv1D with a DoraLinear around it; returns their paths."""
    return lora.inject_lora(model, config, layer_cls=DoraLinear)


def to_hf_config(model: nn.Module, config: DoraConfig) -> dict[str, Any]:
    return {**lora.to_hf_config(model, config), "use_dora": True}


def from_hf_config(hf: dict[str, Any]) -> DoraConfig:
    """A DoRA config from HF PEFT's LoRA config with `use_dora: true`; LoRA's checks apply."""
    if not hf.get("use_dora"):
        raise ValueError("this adapter_config.json is not DoRA (use_dora is not true)")
    config = lora.from_hf_config({**hf, "use_dora": False})
    return DoraConfig(**{field.name: getattr(config, field.name) for field in fields(LoraConfig)})


METHOD = Method(
    peft_type="LORA",
    prefix="lora_",
    config_cls=DoraConfig,
    layer_types=(DoraLinear,),
    inject=inject_dora,
    to_hf_config=to_hf_config,
    from_hf_config=from_hf_config,
    hf_flag="use_dora",
)
