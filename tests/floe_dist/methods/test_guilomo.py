"""GuiLoMo: the GSV autograd rules of methods.md §5.3, the search module, the DARTS implicit term, the
export rule, and a heterogeneous-rank allocation trained and evaluated end to end."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from floe_dist.allocation import Allocation
from floe_dist.methods.guilomo import (
    EXPERT_OFF,
    EXPERT_ON,
    RANK_OFF,
    ExpertMask,
    GuidedLoRAMoE,
    RankMask,
    finite_difference_hvp,
    guilomo_search,
)
from floe_dist.stages.allocate import model_shape
from floe_dist.stages.allocate import run as allocate
from tests.conftest import recipe_for


def test_expert_mask_gradient_is_the_cumulative_sum_at_the_winner_only():
    s = torch.tensor([0.2, 0.1, 0.7, 0.3, 0.05], requires_grad=True)
    mask = ExpertMask.apply(s)
    assert mask.tolist() == [EXPERT_ON] * 3 + [EXPERT_OFF] * 2  # experts 0..argmax on
    delta = torch.tensor([0.5, -2.0, 1.5, 3.0, -1.0])
    (mask * delta).sum().backward()
    expected = torch.zeros(5)
    expected[2] = 0.2 * 0.5 + 0.1 * -2.0 + 0.7 * 1.5  # sum_{i<=k} s_i delta_i
    torch.testing.assert_close(s.grad, expected)


def test_expert_mask_keeps_two_experts_when_the_first_wins():
    s = torch.tensor([0.9, 0.1, 0.3], requires_grad=True)
    mask = ExpertMask.apply(s)
    assert mask.tolist() == [EXPERT_ON, EXPERT_ON, EXPERT_OFF]  # k forced from 0 to 1
    (mask * torch.tensor([1.0, 2.0, 4.0])).sum().backward()
    torch.testing.assert_close(s.grad, torch.tensor([0.0, 0.9 * 1.0 + 0.1 * 2.0, 0.0]))  # as the code: at k=1


def test_rank_mask_leaks_a_small_gradient_off_the_winner():
    s = torch.tensor([[0.1, 0.6, 0.2], [0.5, 0.1, 0.2]], requires_grad=True)
    mask = RankMask.apply(s)
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1.0, RANK_OFF], [1.0, RANK_OFF, RANK_OFF]]))
    delta = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 4.0, 5.0]])
    (mask * delta).sum().backward()
    expected = RANK_OFF * delta
    expected[0, 1] = 0.1 * 1.0 + 0.6 * 2.0
    expected[1, 0] = 0.5 * -1.0
    torch.testing.assert_close(s.grad, expected)


def test_guided_module_uses_only_the_experts_and_rank_rows_its_gsvs_keep():
    torch.manual_seed(0)
    layer = GuidedLoRAMoE(nn.Linear(16, 12), n_max=6, r_max=4, top_k=2, dropout=0.0)
    with torch.no_grad():
        layer.gsv_experts.copy_(torch.tensor([0.1, 0.2, 0.9, 0.0, 0.0, 0.0]))  # experts 0..2 on
        layer.gsv_ranks.copy_(torch.tensor([[0.0, 0.5, 0.1, 0.0]]).repeat(6, 1))  # rows 0..1 on
    x = torch.randn(50, 16)
    layer(x)
    assert int(layer.top_i.max()) <= 2
    rows = layer.down_weight() / layer.lora_A
    torch.testing.assert_close(rows[:2], torch.ones(2, 16))
    torch.testing.assert_close(rows[2:4], torch.full((2, 16), RANK_OFF))
    exported = layer.exported()
    assert (exported.experts, exported.ranks, exported.top_k) == (3, (2, 2, 2), 2)
    assert [n for n, _ in layer.named_parameters() if n.startswith("gsv")] == ["gsv_experts", "gsv_ranks"]
    assert not any(p is layer.gsv_experts for p in layer.adapter_parameters())  # upper level kept apart


def test_finite_difference_implicit_term_matches_exact_double_backward():
    """The DARTS implicit term d/dg (v . dL/dtheta), by central differences, against autograd."""
    torch.manual_seed(1)
    layer = GuidedLoRAMoE(nn.Linear(8, 8).requires_grad_(False), n_max=3, r_max=4, dropout=0.0).double()
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64)
    theta, gsv = layer.adapter_parameters(), layer.gsv_parameters()
    loss = lambda: (layer(x) - y).pow(2).mean()
    v = [torch.randn_like(p) for p in theta]
    first = torch.autograd.grad(loss(), theta, create_graph=True)
    exact = torch.autograd.grad(sum((g * vi).sum() for g, vi in zip(first, v)), gsv, allow_unused=True)
    at = [p.detach().clone() for p in theta]
    approx = finite_difference_hvp(theta, at, v, lambda: list(torch.autograd.grad(loss(), gsv)))
    for e, a in zip(exact, approx):
        torch.testing.assert_close(a, torch.zeros_like(a) if e is None else e, rtol=1e-4, atol=1e-8)
    assert any(e is not None and e.abs().sum() > 0 for e in exact)  # a real, non-zero mixed term
    assert all(torch.equal(p, p0) for p, p0 in zip(theta, at))  # theta left where it was


@pytest.mark.parametrize("order", ["first", "second"])
def test_search_moves_gsvs_and_leaves_the_lower_level_optimiser_state_consistent(order):
    torch.manual_seed(2)
    layer = GuidedLoRAMoE(nn.Linear(8, 8).requires_grad_(False), n_max=4, r_max=4, dropout=0.0)
    before = [p.detach().clone() for p in layer.gsv_parameters()]
    data = itertools.cycle([{"x": torch.randn(16, 8), "y": torch.randn(16, 8)} for _ in range(4)])
    losses = []
    guilomo_search([layer], data, lambda b: (layer(b["x"]) - b["y"]).pow(2).mean(), steps=5, order=order,
                   lr=1e-2, on_step=lambda s, l: losses.append(l))
    assert len(losses) == 5 and all(map(torch.isfinite, torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, layer.gsv_parameters()))
    with pytest.raises(ValueError, match="order must be"):
        guilomo_search([layer], data, lambda b: b, steps=1, order="third")


def test_guilomo_allocation_with_heterogeneous_ranks_trains_exports_and_evaluates(tmp_path):
    from floe_dist.stages.evaluate import run as evaluate
    from floe_dist.stages.train import run as train

    alloc_file = tmp_path / "guilomo.json"
    allocation = allocate(recipe_for("allocate", method="guilomo", model="tiny", task="sst2", guilomo_steps=2, guilomo_batch=2, guilomo_experts=4, guilomo_rank=4, guilomo_order="first"), str(alloc_file))
    modules = [m for mods in allocation.layers.values() for m in mods.values()]
    assert all(m.experts >= 2 and m.top_k == 2 and len(m.ranks) == m.experts for m in modules)
    assert any(len(set(m.ranks)) > 1 for m in modules)  # heterogeneous inside a module
    train(recipe_for("train", model="tiny", task="sst2", allocation=str(alloc_file), steps=2, micro_batch=2, zero="0", checkpoint_every=0), str(tmp_path / "run"))
    exported = Allocation.load(tmp_path / "run" / "adapter" / "allocation.json")
    assert exported.layers == allocation.layers
    result = evaluate(recipe_for("evaluate", model="tiny", task="sst2", adapter=str(tmp_path / "run" / "adapter"), limit=8))
    most = allocation.count_active_parameters(model_shape("tiny").shapes)
    assert 0 < result["active_parameters_per_token"] <= most < allocation.trainable_parameters


def test_search_balance_loss_is_the_official_one(tmp_path, monkeypatch):
    """Official: 0.001 x sum over modules of sum_i f_i P_i (no xE). Our modules' balance loss is Switch's
    E x sum_i f_i P_i, so the search must weight it by 0.001 / E: the same loss, not E times it."""
    import floe_dist.modeling.answer_lm as answer_lm

    made = []

    class Recording(answer_lm.AnswerLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(answer_lm, "AnswerLM", Recording)
    allocate(recipe_for("allocate", method="guilomo", model="tiny", task="sst2", guilomo_steps=1, guilomo_batch=2, guilomo_experts=4, guilomo_rank=2, guilomo_order="first"), str(tmp_path / "g.json"))
    (model,) = made
    modules = [m for mods in model._adapters_by_layer.values() for m in mods if m.balance_loss is not None]
    assert modules and all(m.n_experts == 4 for m in modules)
    official = 0.001 * sum(float(m.balance_loss.detach()) / m.n_experts for m in modules)  # sum_i f_i P_i per module
    assert model.balance_coef * float(model.balance_loss(modules[0].balance_loss).detach()) == pytest.approx(official)
