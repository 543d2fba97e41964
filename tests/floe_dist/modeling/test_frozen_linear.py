"""Frozen linears that keep no weight for backward give the same adapter gradients as plain autograd."""
from __future__ import annotations

import pytest
import torch

from floe_dist.allocation import Allocation
from floe_dist.modeling.backbone import load_backbone, resolve_model
from floe_dist.modeling.frozen_linear import release_frozen_weights
from floe_dist.modeling.inject import inject_adapters, lora_state_dict

IDS = torch.tensor([[1, 450, 3290, 17, 902, 33, 7, 1200], [5, 6, 7, 8, 9, 10, 11, 12]])


def adapter_grads(quant: str, release: bool, saved: list | None = None) -> dict[str, torch.Tensor]:
    lm = load_backbone(resolve_model("tiny"), quant)
    if release:
        assert release_frozen_weights(lm) == 4 * 7 + 1  # every decoder linear and the head
    torch.manual_seed(0)
    inject_adapters(lm, Allocation.uniform(4, ["q_proj", "v_proj", "down_proj"], experts=2, rank=4, top_k=1,
                                           layers=[1, 3]))
    with torch.no_grad():
        for p in lora_state_dict(lm).values():
            p.normal_(0, 0.05)
    pack = (lambda t: saved.append(tuple(t.shape)) or t) if saved is not None else (lambda t: t)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm(IDS).logits.float().logsumexp(-1).mean()
    loss.backward()
    return {k: v.grad.clone() for k, v in lora_state_dict(lm).items()}


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_adapter_gradients_equal_plain_autograd(quant):
    plain, released = adapter_grads(quant, False), adapter_grads(quant, True)
    assert plain.keys() == released.keys() and any(g.abs().max() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(released[name], plain[name], rtol=1e-5, atol=1e-7)


def test_no_frozen_weight_is_saved_for_backward():
    """What ZeRO-3 needs: autograd holds no (view of a) gathered frozen weight between forward and backward."""
    weights = {(64, 64), (64, 32), (128, 64), (64, 128), (49152, 64)}
    weights |= {s[::-1] for s in weights}
    before, after = [], []
    adapter_grads("none", False, before), adapter_grads("none", True, after)
    assert weights & set(before)  # plain autograd saves frozen weights (their transposed views) ...
    assert not weights & set(after)  # ... the released linears save none


@pytest.mark.parametrize("zero_stage, released", [(0, False), (2, False), (3, True)])
def test_only_a_zero3_training_backbone_takes_the_released_backward(zero_stage, released):
    """ZeRO-3 gathers weights that autograd must not pin; every other layout holds them anyway and keeps plain
    autograd, the faster backward (BENCHMARKS.md, "The training step against PEFT's")."""
    from floe_dist.distributed.layout import Layout
    from floe_dist.resources import Resources

    lm = Resources().backbone(resolve_model("tiny"), "none", Layout(zero_stage=zero_stage), {})
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * 7 + 1
    assert [("forward" in vars(m)) for m in linears] == [released] * len(linears)  # an instance forward: released
