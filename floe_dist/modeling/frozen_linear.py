"""Frozen linear layers whose autograd graph does not pin the weight's storage.

For the input gradient autograd saves a *view* of the weight (``F.linear`` saves ``weight.t()``,
bitsandbytes' ``MatMul4Bit`` keeps ``B.view(-1, 1)``), and a view keeps its storage alive. Under ZeRO-3
that storage is the gathered full weight, so from forward to backward every rank holds every gathered
frozen weight behind the first adapter: the whole backbone per rank (measured, BENCHMARKS.md load section).
DeepSpeed's own remedy (``memory_efficient_linear``) covers ``F.linear`` only and saves every input
for a weight gradient a frozen weight never has. Here a frozen linear's backward keeps the module (ZeRO-3
releases its weight after forward and gathers it again before the module's backward, as for any
module) and computes the input gradient only: ``grad @ W``, with NF4 weights dequantized.
Only ZeRO-3 needs it (floe_dist/resources.py): without partitioning every weight is resident anyway, and a step
through plain autograd is faster (BENCHMARKS.md, "The training step against PEFT's").
"""
from __future__ import annotations

import torch
from torch import nn


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as a matrix (out, in): dequantized for a bitsandbytes 4-bit linear."""
    w = module.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data.view(-1, 1), w.quant_state)
    return w


class FrozenLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module, forward) -> torch.Tensor:
        ctx.module = module  # the module, not a tensor: nothing of the weight is saved
        return forward(x)  # autograd is off inside Function.forward

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = dense_weight(ctx.module)
        return (grad @ weight.to(grad.dtype)).to(grad.dtype), None, None


def release_frozen_weights(model: nn.Module) -> int:
    """Route every frozen linear (plain or 4-bit) of ``model`` through ``FrozenLinearFunction``; returns
    how many. Call before adapters are injected: the adapters' own linears are trainable and untouched."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and not any(p.requires_grad for p in module.parameters()):
            plain = module.forward

            def forward(x, module=module, plain=plain):
                if torch.is_grad_enabled() and x.requires_grad:
                    return FrozenLinearFunction.apply(x, module, plain)
                return plain(x)

            module.forward = forward
            count += 1
    return count
