"""floe_dist/flops.py against the FLOPs torch actually runs (torch.utils.flop_counter) on a tiny Llama."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig

from floe_dist.allocation import Allocation
from floe_dist.flops import flops_per_token, utilisation
from floe_dist.modeling.backbone import TINY_CONFIG
from floe_dist.modeling.inject import inject_adapters
from floe_dist.stages.plan import count_model


@pytest.mark.parametrize("experts,top_k", [(1, 1), (4, 4)])
def test_model_flops_equal_what_a_frozen_base_step_computes(experts, top_k):
    """Forward + backward of adapters on a frozen model, counted matmul by matmul, equals the model-FLOPs
    formula exactly. With top_k = experts every expert is active, so P_active = P_computed."""
    # eager attention: its two matmuls are counted (torch's CPU SDPA kernel has no FLOP formula)
    config = LlamaConfig(vocab_size=256, attn_implementation="eager", **TINY_CONFIG)
    count = count_model(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    allocation = Allocation.uniform(count.layers, ["q_proj", "v_proj", "up_proj"], experts=experts, rank=4,
                                    top_k=top_k)
    inject_adapters(model, allocation)
    batch, seq = 2, 32
    ids = torch.randint(256, (batch, seq))
    embeds = model.get_input_embeddings()(ids).requires_grad_()  # backward reaches layer 0, as the formula assumes
    with FlopCounterMode(display=False) as counter:
        model(inputs_embeds=embeds).logits.float().pow(2).mean().backward()
    expected = flops_per_token(decoder_linear=count.linear, head=count.vocab * count.hidden, layers=count.layers,
                               hidden=count.hidden, seq_len=seq,
                               adapter_active=allocation.count_active_parameters(count.shapes),
                               adapter_computed=allocation.count_parameters(count.shapes), recompute=False)
    assert counter.get_total_flops() == pytest.approx(expected.model * batch * seq, rel=1e-9)  # routers included
    assert expected.model == expected.hardware  # no recomputation, every expert active


def test_recomputation_and_inactive_experts_count_as_hardware_flops_only():
    common = dict(decoder_linear=1000, head=200, layers=2, hidden=8, seq_len=16)
    dense = flops_per_token(**common, adapter_active=50, adapter_computed=50, recompute=False)
    assert dense.model == dense.hardware == 4 * 1200 + 12 * 2 * 8 * 16 + 6 * 50
    sparse = flops_per_token(**common, adapter_active=50, adapter_computed=80, recompute=True)
    assert sparse.model == dense.model
    assert sparse.hardware == 4 * 1200 + 12 * 2 * 8 * 16 + 6 * 80 + 2 * 1000 + 4 * 2 * 8 * 16 + 2 * 80
    assert utilisation(1e9, 1000, 1.0) == pytest.approx(1.0)  # 1e12 FLOP/s on a 1 TFLOP/s peak
