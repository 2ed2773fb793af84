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
counter moves (merge, load_state_dict); the norm is computed in the adapter's dtype, also
under autocast (a quantised W0 is dequantised for it, see below). While training, the step is written out
by hand (`DoraStep`, LoRA's step of lora_steps.py with g; it applies where LoRA's does),
with u = x̃·Aᵀ and, writing v = x̃·W0ᵀ and z = v + s·u·Bᵀ:

    forward    without dropout (v = x·W0ᵀ):  h = g ⊙ z + b          (z one buffer)
               with dropout:  h = x·W0ᵀ + b + g ⊙ z − v              (two base matmuls)
    backward   ∂g = Σ_n ∂h ⊙ z;  ∂z = g ⊙ ∂h;  ∂u = s·∂z·B;  ∂A = ∂uᵀ·x̃;  ∂B = s·∂zᵀ·u
               ∂x = ∂z·W0 + ∂u·A                                    without dropout
               ∂x = ∂h·W0 + (((g − 1) ⊙ ∂h)·W0 + ∂u·A) ⊙ M/(1 − p)   with dropout

It keeps one (n, d_out) tensor (z) for backward where the autograd of HF PEFT's form keeps
two or more, and makes a few elementwise passes over (n, d_out) instead of about ten.
v runs in the dtype HF PEFT gives it: autocast's, else the adapter's (W0 upcast).

Quantised base (bitsandbytes, `--quantize`), where W0 exists only packed and is dequantised
for each use, never kept (HF PEFT does the same, so the two agree):
    NF4   W0 = dequantize_4bit(packed, quant_state); the step above runs, x·W0ᵀ through
          bitsandbytes' 4-bit matmul in its compute dtype (bf16).
    int8  W0_i = CB_i · SCB_i / 127 (LLM.int8: int8 rows CB, one absmax scale SCB_i per
          row); the plain forward runs (the step cannot reproduce the int8 matmul, which
          quantises x too): W0·x is the layer's own output, and with dropout x̃·W0ᵀ is
          a matmul against the dequantised W0, as in HF PEFT, W0 made again in backward
          (`DequantizedLinear`) where HF's autograd keeps a dense copy of it per layer.
A quantised base is never merged into (model.merge refuses it, for every method).

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
from torch.nn import functional as F

from peft_core import lora
from peft_core.configs import DoraConfig, LoraConfig
from peft_core.lora import LoraLinear
from peft_core.lora_steps import add_product, base_grad, drop, is_4bit, is_quantized, no_autocast
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
        """‖W0 + s·B·A‖ per output row, (d_out,), detached, without forming W0 + s·B·A; in
        the adapter's dtype even under autocast (a quantised W0 is dequantised for it)."""
        a, b, s = self.lora_A.weight, self.lora_B.weight, self.scale  # (r, d_in), (d_out, r)
        with no_autocast(a.device):
            w0 = self.base_weight(a.dtype)  # (d_out, d_in), a view where no cast is needed
            base = self._base_square(w0)  # ‖W0_i‖²
            cross = (b * (w0 @ a.T)).sum(dim=1)  # B_i·(A·W0_iᵀ)    (d_out, r) -> (d_out,)
            low_rank = (b @ (a @ a.T) * b).sum(dim=1)  # B_i·(A·Aᵀ)·B_iᵀ
        return (base + 2 * s * cross + s * s * low_rank).clamp_min(0).sqrt()

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W0 (d_out, d_in) in `dtype`; an int8 W0 dequantised row by row (W0_i = CB_i·SCB_i/127,
        bitsandbytes' LLM.int8 layout), others as the steps see them (lora_steps.Frozen)."""
        layer = self.base_layer
        if is_int8(layer):
            from bitsandbytes.functional import int8_vectorwise_dequant

            # SCB moves from the weight to the layer's state on its first forward
            scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
            return int8_vectorwise_dequant(layer.weight.data, scales).to(dtype)
        return self.frozen().weight(dtype)

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
        step = self.fast_step(x)
        if step is not None:
            a, b = self.lora_A.weight, self.lora_B.weight
            return DoraStep.apply(x, step, self._dropped_dtype(x), a, b, g)
        y = self.base_layer(x)  # (…, d_out)
        dropping = self.training and not isinstance(self.lora_dropout, nn.Identity)
        x_drop = self.lora_dropout(x)
        w0_x = self._dropped_base(x_drop) if dropping else self._without_bias(y)
        low_rank = self.lora_B(self.lora_A(x_drop.to(self.lora_A.weight.dtype))) * self.scale
        return (y + (g - 1) * w0_x + g * low_rank).to(y.dtype)  # one rounding into y's dtype

    def _dropped_base(self, x_drop: torch.Tensor) -> torch.Tensor:
        """x̃·W0ᵀ: through the base layer, or against the dequantised W0 in the adapter's dtype
        (autocast's where it is on) for an int8 base, as HF PEFT computes it (bitsandbytes'
        int8 matmul would quantise x̃ again), W0 made again in backward rather than kept."""
        if not is_int8(self.base_layer):
            return self._without_bias(self.base_layer(x_drop))
        return DequantizedLinear.apply(x_drop, self, self._dropped_dtype(x_drop))

    def _dropped_dtype(self, x: torch.Tensor) -> torch.dtype:
        """HF PEFT's dtype for x̃·W0ᵀ: autocast's where it is on, else the adapter's (it upcasts W0)."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.lora_A.weight.dtype

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


class DoraStep(torch.autograd.Function):
    """h = x·W0ᵀ + b + (g − 1) ⊙ x̃·W0ᵀ + g ⊙ s·(x̃·Aᵀ)·Bᵀ for a frozen W0, b (the module
    docstring's step); inputs x, step (lora_steps.Step, one member), dropped (the dtype of
    x̃·W0ᵀ), A, B, g."""

    @staticmethod
    def forward(ctx, x, step, dropped, a, b, g):  # noqa: ANN001, ANN205
        base, low = step.members[0], a.dtype
        with no_autocast(x.device):
            x2 = x.reshape(-1, x.shape[-1])  # (n, d_in)
            (x_drop,), noises = drop(x2.to(low), step, 1)
            u = x_drop @ a.T  # (n, r)
            if noises:
                v = base.linear(x_drop, dropped, bias=False)  # x̃·W0ᵀ (n, d_out)
                z = torch.addmm(v.to(low), u, b.T, alpha=base.scale)  # z̃ = x̃·W0ᵀ + s·u·Bᵀ
                h = base.linear(x2, step.compute).to(step.output)  # x·W0ᵀ + b
                h = _add_scaled(h, z, g, v)
            else:
                z = add_product(
                    base.linear(x2, step.compute, bias=False).to(low), u, b.T, base.scale
                )
                bias = base.layer.bias
                h = z * g if bias is None else torch.addcmul(bias, z, g)
        ctx.save_for_backward(x_drop if noises else x2, u, z, g, a, b, *noises)
        ctx.step, ctx.dropped, ctx.x_dtype = step, dropped, x2.dtype
        return h.to(step.output).view(*x.shape[:-1], h.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        inputs, u, z, g, a, b, *noises = ctx.saved_tensors  # inputs: x̃ with dropout, else x
        step, low = ctx.step, a.dtype
        base = step.members[0]
        with no_autocast(inputs.device):
            grad_h = grad.reshape(-1, grad.shape[-1])  # (n, d_out)
            grad_low = grad_h.to(low)
            grad_g = (grad_low * z).sum(dim=0) if ctx.needs_input_grad[5] else None
            grad_z = grad_low * g  # ∂z = g ⊙ ∂h, what LoRA's step sees
            grad_u = (grad_z @ b).mul_(base.scale)  # (n, r)
            grad_x = None
            if ctx.needs_input_grad[0]:
                if noises:
                    grad_x = _dropped_grad_input(
                        ctx, grad_h, grad_low, grad_z, grad_u, a, noises[0]
                    )
                else:
                    grad_x = add_product(base_grad(step, [grad_z], ctx.x_dtype), grad_u, a)
                grad_x = grad_x.view(*grad.shape[:-1], -1)
            grad_a = grad_u.T @ inputs.to(low) if ctx.needs_input_grad[3] else None
            grad_b = (u.T @ grad_z).mul_(base.scale).T if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_a, grad_b, grad_g


class DequantizedLinear(torch.autograd.Function):
    """x·W0ᵀ in `dtype` for a DoraLinear's frozen packed W0 (base_weight): W0 is dequantised
    again for ∂x = ∂h·W0 instead of being saved, so backward keeps no (d_out, d_in) copy."""

    @staticmethod
    def forward(ctx, x, layer, dtype):  # noqa: ANN001, ANN205
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        with no_autocast(x.device):
            return F.linear(x.to(dtype), layer.base_weight(dtype))

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        with no_autocast(grad.device):
            weight = ctx.layer.base_weight(ctx.dtype)
            return (grad.to(ctx.dtype) @ weight).to(ctx.x_dtype), None, None


def _add_scaled(h: torch.Tensor, z: torch.Tensor, g: torch.Tensor, v: torch.Tensor):
    """h + g ⊙ z̃ − x̃·W0ᵀ, rounded once into h's dtype: h + (g − 1) ⊙ x̃·W0ᵀ + g ⊙ s·u·Bᵀ."""
    if h.dtype == z.dtype == v.dtype:
        return h.addcmul_(z, g).sub_(v)
    return h.add_(z.mul(g).sub_(v))


def _dropped_grad_input(ctx, grad_h, grad_low, grad_z, grad_u, a, noise):  # noqa: ANN001, ANN202
    """∂x = ∂h·W0 + N ⊙ (((g − 1) ⊙ ∂h)·W0 + ∂u·A), N = M/(1 − p), (g − 1) ⊙ ∂h = ∂z − ∂h."""
    step, dropped = ctx.step, ctx.dropped
    base = step.members[0]
    through_base = (grad_z - grad_low).to(dropped) @ base.weight(dropped)  # (n, d_in)
    dropped_part = add_product(through_base.to(a.dtype), grad_u, a)
    grad_x = base_grad(step, [grad_h], ctx.x_dtype)
    if grad_x.dtype == dropped_part.dtype:
        return grad_x.addcmul_(dropped_part, noise)
    return grad_x.add_(dropped_part.mul_(noise))


def is_int8(layer: nn.Module) -> bool:
    """A bitsandbytes Linear8bitLt (an Int8Params weight with its per-row scales SCB)."""
    return is_quantized(layer) and not is_4bit(layer)


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
