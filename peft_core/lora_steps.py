"""The hand-written training steps of LoRA (lora.py has the method; dora.py builds on these).

One adapted layer: frozen W0 (d_out, d_in) and b, trainable A (r, d_in) and B (d_out, r),
scale s; x (n, d_in) is the input with the n tokens flattened and g = ∂L/∂h (n, d_out).
While training with dropout p the adapter's path sees x̃ = x ⊙ M/(1 − p), M a bool mask
(each element kept with probability 1 − p; M = 1 and x̃ = x without dropout):

    forward    u = x̃·Aᵀ (n, r);  h = x·W0ᵀ + b + s·u·Bᵀ          (one buffer, added in place)
    backward   ∂u = s·g·B;  ∂x = g·W0 + (∂u·A) ⊙ M/(1 − p);  ∂A = ∂uᵀ·x̃;  ∂B = s·gᵀ·u

Every product is one matmul and no elementwise pass touches an (n, d_out) tensor; the
autograd of HF PEFT's form adds three such passes and sums two (n, d_in) input gradients.
k siblings their parent calls on one x (q, k, v; gate, up) take one step (`LowRankStep`
with k members): without dropout u = x·[A_1; …; A_k]ᵀ is one matmul; with dropout each
member draws its own M_i, as HF PEFT's per-layer nn.Dropout does, and u_i = x̃_i·A_iᵀ. In
both cases ∂x = Σ_i g_i·W0_i + Σ_i (∂u_i·A_i) ⊙ M_i/(1 − p) accumulates in one buffer.

Masks. Drawn in forward by torch.native_dropout, member after member in call order, from
the global generator: that is the very draw nn.Dropout makes, so a seeded run gives the same
adapter bit for bit on CPU, the same masks as HF PEFT (the tests compare gradients with
HF's under one seed), and checkpointing's recomputed forward, which restores the RNG state
(torch.utils.checkpoint's default), draws the masks the first forward drew.
Saved for backward: a single layer keeps x̃ (x is then not needed); k members keep x once
and each noise N_i = M_i/(1 − p) in the adapter's dtype, and remake x̃_i in backward (one
elementwise pass). For q, k, v on an fp32 x that is 4 + 3·4 bytes per element of x, where HF
PEFT's autograd keeps 3·(4 + 1) (each x̃_i and a bool mask). A bool mask would be smaller,
but converting it on each of its three uses cost more time than the step saved elsewhere
(LoRA all-linear at dropout 0.05 measured 1.03 × HF with bool masks, 0.87 with these); on a
half base under autocast the fp32 noise costs 4 bytes an element where HF keeps 2 + 1. No
tensor lives on ctx outside save_for_backward, so checkpointing frees and recomputes all of it.

Dtypes, as HF PEFT computes them. The base products x·W0ᵀ and g·W0 run in the compute
dtype: autocast's where it is on, else W0's (bitsandbytes: the layer's compute_dtype). The
rank-r products run in the adapter's dtype (fp32 beside a half base: HF casts x to it), so
∂A and ∂B come back fp32 from fp32 matmuls, and s·u·Bᵀ joins the half base output with one
rounding. Both Functions run with autocast off and cast explicitly, forward and backward.

Quantised base (bitsandbytes NF4/FP4 `Linear4bit`): x·W0ᵀ + b through bitsandbytes' own
4-bit matmul, g·W0 against W0 dequantised for that product only (bitsandbytes' backward
does the same), never kept. int8 (`Linear8bitLt`) keeps the plain path: its training
matmul quantises x on a GPU, which a dequantised W0 would not reproduce.
"""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from peft_core.distributed import bernoulli_like


def is_4bit(layer: nn.Module) -> bool:
    """A bitsandbytes Linear4bit (its weight a packed Params4bit with a quant_state)."""
    return getattr(layer.weight, "quant_state", None) is not None


def is_quantized(layer: nn.Module) -> bool:
    return is_4bit(layer) or type(layer.weight).__name__ == "Int8Params"


@dataclass(frozen=True)
class Frozen:
    """An adapted layer's frozen half as the steps see it: x·W0ᵀ + b, and W0 for g·W0."""

    layer: nn.Module  # nn.Linear, transformers' Conv1D, or bitsandbytes' Linear4bit
    transposed: bool  # Conv1D stores W0 as (d_in, d_out)
    scale: float  # s of this layer's low-rank path

    def linear(self, x: torch.Tensor, dtype: torch.dtype, bias: bool = True) -> torch.Tensor:
        """x·W0ᵀ (+ b), (n, d_out), in `dtype`."""
        b = self.layer.bias if bias else None
        b = None if b is None else b.to(dtype)
        if is_4bit(self.layer):
            import bitsandbytes as bnb

            weight = self.layer.weight
            return bnb.matmul_4bit(x.to(dtype), weight, quant_state=weight.quant_state, bias=b)
        return F.linear(x.to(dtype), self.weight(dtype), b)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W0 (d_out, d_in) in `dtype`: a view of a dense weight, a fresh dequantised copy of a 4-bit one."""
        weight = self.layer.weight
        if is_4bit(self.layer):
            from bitsandbytes.functional import dequantize_4bit

            return dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        return (weight.T if self.transposed else weight).to(dtype)


@dataclass(frozen=True)
class Step:
    """What one LowRankStep needs besides the tensors autograd tracks."""

    members: tuple[Frozen, ...]
    p: float  # dropout probability while training, 0 otherwise
    compute: torch.dtype  # dtype of the base products
    output: torch.dtype  # dtype of h (the base layer's own output dtype)

    @property
    def keep(self) -> float:
        return 1.0 / (1.0 - self.p)  # native_dropout's scale


def compute_dtype(layer: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The base products' dtype for x, or None where the step cannot reproduce the layer."""
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if is_4bit(layer):
        dtype = layer.compute_dtype or x.dtype
        return dtype if autocast in (None, dtype) else None
    if is_quantized(layer):
        return None
    dtype = autocast or x.dtype
    return dtype if layer.weight.dtype == dtype else None


def output_dtype(layer: nn.Module, x: torch.Tensor, compute: torch.dtype) -> torch.dtype:
    """The base layer's output dtype: bitsandbytes casts back to x's, a dense layer gives compute."""
    return x.dtype if is_4bit(layer) else compute


def no_autocast(device: torch.device):
    """Autocast off on `device`; a device without autocast (meta: shapes only) has none to stop."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def drop(x: torch.Tensor, step: Step, count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`count` dropped copies x̃_i = x ⊙ N_i of x and their noise N_i = M_i/(1 − p) in x's
    dtype ([x], [] without dropout): nn.Dropout's draw (bernoulli(1 − p) per element, in
    order) and its values, bit for bit."""
    if not step.p:
        return [x], []
    noises = [bernoulli_like(x, 1.0 - step.p).mul_(step.keep) for _ in range(count)]
    return [x * noise for noise in noises], noises


def add_product(out: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, alpha: float = 1.0):
    """out += alpha·m1·m2 in place; the product in m1's dtype, rounded once into out's."""
    if out.dtype == m1.dtype:
        return out.addmm_(m1, m2, alpha=alpha)
    return out.add_(m1 @ m2, alpha=alpha)


class LowRankStep(torch.autograd.Function):
    """h_i = x·W0_iᵀ + b_i + s_i·(x̃_i·A_iᵀ)·B_iᵀ for the k members of `step`; inputs x, step, A_1, B_1, …"""

    @staticmethod
    def forward(ctx, x, step, *factors):  # noqa: ANN001, ANN205
        with no_autocast(x.device):
            x2 = x.reshape(-1, x.shape[-1])  # (n, d_in)
            a_s, b_s = factors[0::2], factors[1::2]
            x_low = x2.to(a_s[0].dtype)  # the adapter's input, in its dtype
            drops, noises = drop(x_low, step, len(a_s))
            if noises:
                u = torch.cat([xd @ a.T for xd, a in zip(drops, a_s, strict=True)], dim=1)
            else:
                u = x_low @ torch.cat(a_s).T  # (n, Σr): one pass over x for every A
            us = u.split([a.shape[0] for a in a_s], dim=1)
            outs = [  # the base output in its own dtype, then s·u·Bᵀ added with one rounding
                add_product(m.linear(x2, step.compute).to(step.output), u_i, b.T, m.scale)
                for m, u_i, b in zip(step.members, us, b_s, strict=True)
            ]
        # one member keeps x̃ (x is then not needed), several keep x and remake each x̃_i
        inputs = drops[0] if noises and len(a_s) == 1 else x2
        ctx.save_for_backward(inputs, u, *noises, *factors)
        ctx.step, ctx.k, ctx.x_dtype = step, len(a_s), x2.dtype
        return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN205
        step, k = ctx.step, ctx.k
        inputs, u, *rest = ctx.saved_tensors
        noises, factors = rest[: len(rest) - 2 * k], rest[len(rest) - 2 * k :]
        a_s, b_s = factors[0::2], factors[1::2]
        low = a_s[0].dtype
        with no_autocast(inputs.device):
            gs = [g.reshape(-1, g.shape[-1]) for g in grads]  # (n, d_out_i)
            g_low = [g.to(low) for g in gs]
            grad_u = torch.cat(
                [(g @ b).mul_(m.scale) for g, b, m in zip(g_low, b_s, step.members, strict=True)],
                dim=1,
            )  # (n, Σr)
            grad_us = grad_u.split([a.shape[0] for a in a_s], dim=1)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = base_grad(step, gs, ctx.x_dtype)
                grad_x = _add_low_rank_grad(grad_x, grad_u, grad_us, a_s, noises)
                grad_x = grad_x.view(*grads[0].shape[:-1], -1)
            if noises and k == 1:
                drops = [inputs]
            else:
                x_low = inputs.to(low)
                drops = [x_low * noise for noise in noises] or [x_low] * k
            grad_factors = []
            for i, (g, u_i, grad_u_i, xd) in enumerate(
                zip(g_low, u.split([a.shape[0] for a in a_s], dim=1), grad_us, drops, strict=True)
            ):
                grad_a = grad_u_i.T @ xd if ctx.needs_input_grad[2 + 2 * i] else None
                s = step.members[i].scale
                grad_b = (u_i.T @ g).mul_(s).T if ctx.needs_input_grad[3 + 2 * i] else None
                grad_factors += [grad_a, grad_b]  # (r, d_in), (d_out, r): uᵀ·g is the faster layout
        return grad_x, None, *grad_factors


def base_grad(step: Step, gs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Σ_i g_i·W0_i, each product in the compute dtype, summed in x's `dtype` (one buffer)."""
    grad_x = None
    for g, member in zip(gs, step.members, strict=True):
        g, weight = g.to(step.compute), member.weight(step.compute)
        if grad_x is None:
            grad_x = (g @ weight).to(dtype)
        else:
            add_product(grad_x, g, weight)
    return grad_x


def _add_low_rank_grad(grad_x, grad_u, grad_us, a_s, noises):  # noqa: ANN001, ANN202
    """grad_x += Σ_i (∂u_i·A_i) ⊙ N_i (∂u·[A_1; …; A_k] in one matmul without dropout)."""
    if not noises:
        return add_product(grad_x, grad_u, torch.cat(a_s))
    if grad_x.dtype == grad_u.dtype:
        for grad_u_i, a, noise in zip(grad_us, a_s, noises, strict=True):
            grad_x.addcmul_(grad_u_i @ a, noise)
        return grad_x
    low_rank = None  # Σ_i (∂u_i·A_i) ⊙ N_i in the adapter's dtype, joining grad_x in one rounding
    for grad_u_i, a, noise in zip(grad_us, a_s, noises, strict=True):
        term = (grad_u_i @ a).mul_(noise)
        low_rank = term if low_rank is None else low_rank.add_(term)
    return grad_x.add_(low_rank)
