"""Training FLOPs per token for adapters on a frozen backbone: model FLOPs (for MFU) and hardware FLOPs (HFU).

Definitions follow PaLM (Chowdhery et al., 2022, appendix B): *model* FLOPs are what one forward and
one backward pass need, without recomputation; *hardware* FLOPs add what is computed again or computed
although the model does not need it (gradient checkpointing; experts computed densely). A full
fine-tune needs 6N + 12·L·d·T per token. With a frozen backbone the base weights get no gradient, so
the backward pass of a base matmul computes only the activation gradient (2N, not 4N):

    base       forward 2·N, backward 2·N          N: decoder linears + output head (the embedding is a lookup)
    attention  forward 4·L·d·T, backward 8·L·d·T  no weights, both inputs need gradients (PaLM's 12·L·d·T)
    adapters   forward 2·P, backward 4·P          weight and input gradients
    model      4·N + 12·L·d·T + 6·P_active        P_active: router + the top-k experts a token uses
    hardware   4·N + 12·L·d·T + 6·P_computed      P_computed: every expert (floe-dist's dispatch is dense)
               + 2·N_dec + 4·L·d·T + 2·P_computed with checkpointing (decoder forward recomputed)

It assumes backward runs through every layer (true whenever layer 0 is adapted), and counts attention over
the full T as PaLM does (a causal kernel does about half of it). Norms, activations and the softmax are left out.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenFlops:
    model: float  # per token, no recomputation: what MFU divides
    hardware: float  # per token, what the run executes: what HFU divides


def flops_per_token(*, decoder_linear: int, head: int, layers: int, hidden: int, seq_len: int,
                    adapter_active: int, adapter_computed: int, recompute: bool) -> TokenFlops:
    """Per-token training FLOPs of adapters on a frozen model; see the module docstring for each term."""
    n = decoder_linear + head
    attention = 4 * layers * hidden * seq_len  # one forward
    model = 4 * n + 3 * attention + 6 * adapter_active
    hardware = 4 * n + 3 * attention + 6 * adapter_computed
    if recompute:
        hardware += 2 * decoder_linear + attention + 2 * adapter_computed
    return TokenFlops(model=float(model), hardware=float(hardware))


def utilisation(flops_per_token_: float, tokens_per_second: float, peak_tflops: float) -> float:
    """Achieved FLOP/s over the device's dense peak (MFU with model FLOPs, HFU with hardware FLOPs)."""
    return flops_per_token_ * tokens_per_second / (peak_tflops * 1e12)
