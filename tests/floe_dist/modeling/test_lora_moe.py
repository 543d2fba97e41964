"""LoRAMoELinear against its definition, PEFT's LoRA and the routing rules."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from floe_dist.allocation import count_active_parameters, count_lora_parameters
from floe_dist.modeling.lora_moe import LoRAMoELinear

D_IN, D_OUT = 16, 12


def _randomise(layer: LoRAMoELinear, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _naive(layer: LoRAMoELinear, x: torch.Tensor) -> torch.Tensor:
    """The formula in the module docstring, token by token, expert by expert."""
    x2 = x.reshape(-1, D_IN)
    out = layer.base(x2).clone()
    experts = layer.expert_state()
    for t in range(x2.shape[0]):
        if layer.lora_router is None:
            weights = {0: 1.0}
        else:
            probs = torch.softmax(layer.lora_router(x2[t]), -1)
            if layer.router == "dense":
                weights = dict(enumerate(probs.tolist()))
            else:
                top_w, top_i = probs.topk(layer.top_k)
                if layer.top_p:  # add experts in descending probability until the mass reaches top_p
                    n = next(j + 1 for j in range(layer.top_k)
                             if j + 1 >= layer.min_k and top_w[: j + 1].sum() >= layer.top_p) \
                        if top_w.sum() >= layer.top_p else layer.top_k
                    top_w, top_i = top_w[:n], top_i[:n]
                weights = dict(zip(top_i.tolist(), (top_w / top_w.sum()).tolist()))
        for e, w in weights.items():
            a, b = experts[e]["A"], experts[e]["B"]
            out[t] += w * (layer.alpha / layer.ranks[e]) * (b @ (a @ x2[t]))
    return out.reshape(*x.shape[:-1], D_OUT)


def test_single_expert_equals_peft_lora():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0))
    peft_layer = peft_model.base_model.model[0]
    ours = LoRAMoELinear(peft_layer.base_layer, ranks=[4], router="topk", top_k=1, alpha=8)
    _randomise(ours)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(3, 5, D_IN)
    assert (ours(x) - peft_model(x)).abs().max().item() <= 1e-6
    assert not torch.equal(ours(x), ours.base(x))  # the adapter really contributes


@pytest.mark.parametrize("router,ranks,top_k", [("topk", [4], 1), ("topk", [2, 2, 2, 2], 2), ("dense", [3, 3, 3], 3)])
def test_zero_b_leaves_base_output_unchanged(router, ranks, top_k):
    base = nn.Linear(D_IN, D_OUT)
    layer = LoRAMoELinear(base, ranks, router=router, top_k=top_k)
    x = torch.randn(2, 7, D_IN)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("router,ranks,top_k,top_p", [("topk", [1, 3, 2], 2, 0.0), ("topk", [2, 5], 1, 0.0),
                                                      ("dense", [3, 3, 3], 3, 0.0), ("topk", [1, 2, 3, 4], 4, 0.5)])
def test_forward_matches_definition(router, ranks, top_k, top_p):
    torch.manual_seed(1)
    layer = LoRAMoELinear(nn.Linear(D_IN, D_OUT), ranks, router=router, top_k=top_k, alpha=6, top_p=top_p)
    _randomise(layer)
    x = torch.randn(2, 4, D_IN)
    torch.testing.assert_close(layer(x), _naive(layer, x), atol=1e-5, rtol=1e-5)


def test_top_p_uses_fewer_experts_on_confident_tokens_and_reports_active_parameters():
    """HILO's activation policy: min_k <= experts used <= top_k, fewer where the router is sure;
    the active-parameter count follows the experts actually used."""
    torch.manual_seed(4)
    layer = LoRAMoELinear(nn.Linear(D_IN, D_OUT), [1, 2, 3, 4], router="topk", top_k=3, top_p=0.6, min_k=1)
    with torch.no_grad():
        layer.lora_router.weight.normal_(0, 2.0)  # a spread of confident and unsure tokens
    x = torch.randn(64, D_IN)
    layer.eval()  # activity is counted in eval mode
    layer(x)
    used = layer.kept.sum(-1)
    assert used.min() >= 1 and used.max() <= 3 and len(set(used.tolist())) > 1
    probs = torch.softmax(layer.lora_router(x), -1).sort(-1, descending=True).values
    one = used == 1  # exactly the tokens whose top expert alone reaches 0.6
    assert torch.equal(one, probs[:, 0] >= 0.6)
    ranks = torch.tensor(layer.ranks, dtype=torch.float64)
    mean_rank = ranks[layer.top_i].mul(layer.kept).sum() / 64
    router = 4 * D_IN
    assert layer.active_parameters_per_token() == pytest.approx(router + mean_rank.item() * (D_IN + D_OUT))
    plain = LoRAMoELinear(nn.Linear(D_IN, D_OUT), [1, 2, 3, 4], router="topk", top_k=3)
    assert count_active_parameters(D_IN, D_OUT, [1, 2, 3, 4], "topk", 3) == router + 9 * (D_IN + D_OUT)
    assert layer.active_parameters_per_token() < count_active_parameters(D_IN, D_OUT, [1, 2, 3, 4], "topk", 3)
    plain.train()(x)
    assert plain.kept is None and plain.routed_tokens == 0  # training steps are not counted  # plain top-k: every slot used
    layer.reset_activity()
    with pytest.raises(ValueError, match="no token routed"):
        layer.active_parameters_per_token()


def test_heterogeneous_ranks_have_own_shapes_and_count():
    layer = LoRAMoELinear(nn.Linear(D_IN, D_OUT), [1, 3, 2], router="topk", top_k=2)
    shapes = [(e["A"].shape, e["B"].shape) for e in layer.expert_state()]
    assert shapes == [((1, D_IN), (D_OUT, 1)), ((3, D_IN), (D_OUT, 3)), ((2, D_IN), (D_OUT, 2))]
    n = sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)
    assert n == count_lora_parameters(D_IN, D_OUT, [1, 3, 2], "topk") == 6 * (D_IN + D_OUT) + 3 * D_IN
    dense = LoRAMoELinear(nn.Linear(D_IN, D_OUT), [4, 4], router="dense")
    n = sum(p.numel() for n, p in dense.named_parameters() if "lora_" in n)
    assert n == count_lora_parameters(D_IN, D_OUT, [4, 4], "dense") == 4 * D_IN + 8 * D_OUT + 2 * D_IN


def test_balance_loss_is_one_under_uniform_routing():
    layer = LoRAMoELinear(nn.Linear(D_IN, D_OUT), [2, 2, 2, 2], router="topk", top_k=4)
    nn.init.zeros_(layer.lora_router.weight)  # softmax of zeros: every expert 1/E
    layer(torch.randn(5, D_IN))
    assert layer.balance_loss.item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(layer.expert_load, torch.full((4,), 0.25))


def test_balance_loss_penalises_collapse():
    layer = LoRAMoELinear(nn.Linear(D_IN, D_OUT), [2, 2, 2, 2], router="topk", top_k=1)
    with torch.no_grad():
        layer.lora_router.weight.zero_()
        layer.lora_router.weight[0] = 50.0  # every positive input goes to expert 0
    layer(torch.rand(6, D_IN) + 0.1)
    assert layer.balance_loss.item() == pytest.approx(4.0, abs=1e-3)  # E * f_0 * P_0 = 4 * 1 * 1


def test_adapter_scale_applies_once_and_only_to_adapter_output():
    torch.manual_seed(2)
    layer = LoRAMoELinear(nn.Linear(D_IN, D_OUT), [2, 2], router="topk", top_k=1)
    _randomise(layer)
    x = torch.randn(4, D_IN)
    base_out = layer.base(x)
    delta = layer(x) - base_out
    mask = torch.tensor(0.25, requires_grad=True)
    layer.adapter_scale = mask
    out = layer(x)
    torch.testing.assert_close(out - base_out, 0.25 * delta)
    out.sum().backward()
    torch.testing.assert_close(mask.grad, delta.sum(), rtol=1e-5, atol=1e-5)  # d/dm of m * delta
    layer.adapter_scale = lambda: mask * 2  # a callable (Flexora's alpha-hat) works too
    torch.testing.assert_close(layer(x) - base_out, 0.5 * delta)


@pytest.mark.parametrize("kwargs,message", [
    (dict(ranks=[0, 2]), "rank >= 1"),
    (dict(ranks=[2, 2], top_k=3), "top_k=3"),
    (dict(ranks=[2, 4], router="dense"), "all ranks must match"),
    (dict(ranks=[2], router="sparse"), "router must be one of"),
    (dict(ranks=[2, 2], top_k=2, top_p=1.5), "top_p=1.5"),
    (dict(ranks=[2, 2], top_k=1, top_p=0.5, min_k=2), "min_k=2"),
])
def test_bad_layer_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAMoELinear(nn.Linear(D_IN, D_OUT), **kwargs)


def test_4bit_base_forward_and_backward_train_only_adapters():
    import bitsandbytes as bnb

    torch.manual_seed(3)
    dense = nn.Linear(64, 32, bias=False)
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q = q.to("cpu")
    layer = LoRAMoELinear(q, [2, 2], router="topk", top_k=1)
    _ = layer(torch.randn(3, 64))  # first call packs the weight
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    out = layer(x)
    assert out.shape == (3, 32)
    assert (out - dense(x)).abs().mean() > 0  # 4-bit base plus a non-zero adapter
    out.pow(2).mean().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in layer.base.parameters())


@pytest.mark.parametrize("router,ranks,top_k", [("topk", [4, 4, 4], 2), ("dense", [3, 3, 3], 3), ("topk", [1, 2, 3], 2)])
def test_broadcast_gate_equals_per_column_gather_bitwise(router, ranks, top_k):
    """Equal ranks broadcast the gate over a (tokens, experts, rank) view instead of gathering it per rank
    column (whose backward is a sorting index_put on CUDA): the same numbers, forward and backward."""
    torch.manual_seed(4)
    layer = LoRAMoELinear(nn.Linear(D_IN, D_OUT), ranks, router=router, top_k=top_k)
    _randomise(layer)
    x = torch.randn(9, D_IN)
    gates = layer.route(x)

    def gathered():
        h = nn.functional.linear(x, layer.lora_A)
        if layer.shared_a:
            h = h.repeat(1, layer.n_experts)
        return nn.functional.linear(h * (gates[:, layer.expert_of_col] * layer.col_scale), layer.lora_B)

    out, reference = layer.dense_delta(x), gathered()
    assert torch.equal(out, reference)
    grads = torch.autograd.grad(out.sum(), (layer.lora_A, layer.lora_B))
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(reference.sum(), (layer.lora_A, layer.lora_B))))


@pytest.mark.parametrize("router,ranks,top_k,top_p,capacity", [
    ("topk", [4, 4, 4, 4], 2, 0.0, 0.0),  # the GPU default: top-2 of equal ranks
    ("topk", [2, 2, 2], 2, 0.5, 0.6),  # HILO's top-p, then the capacity rule drops picks
    ("dense", [3, 3, 3], 3, 0.0, 0.0),  # shared A: only the gate broadcast is compiled
    ("topk", [1, 2, 3], 2, 0.0, 0.6),  # heterogeneous ranks: routing compiled, the gate gathered per column
])
def test_compiled_router_equals_the_eager_one_forward_and_backward(router, ranks, top_k, top_p, capacity):
    """The fused path (opt-in: torch.compile of route_and_mix and balance_loss; of topk_route alone
    for heterogeneous ranks; of broadcast_gates alone for the dense router) gives the eager path's picks
    exactly and its outputs and gradients to float tolerance, across token counts (a recompile with a
    dynamic token dimension) and with a stats reducer between the two compiled parts."""
    layers = []
    for fused in (False, True):
        torch.manual_seed(7)
        layer = LoRAMoELinear(nn.Linear(D_IN, D_OUT), ranks, router=router, top_k=top_k, top_p=top_p,
                              min_k=1)
        _randomise(layer)
        layer.capacity_factor, layer.fuse_router = capacity, fused
        layer.routing_stats_reducer = lambda stats: stats * 2  # as if two ranks routed the same tokens
        layers.append(layer)
    for tokens in (13, 29):
        x = torch.randn(tokens, D_IN)
        runs = []
        for layer in layers:
            xi = x.clone().requires_grad_()
            out = layer(xi)
            loss = out.square().sum() + (layer.balance_loss if layer.balance_loss is not None else 0)
            params = [layer.lora_A, layer.lora_B, layer.lora_router.weight]
            runs.append((out, layer, torch.autograd.grad(loss, [xi, *params])))
        (eager_out, eager, eager_grads), (fused_out, fused, fused_grads) = runs
        torch.testing.assert_close(fused_out, eager_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.expert_load, eager.expert_load, rtol=1e-5, atol=1e-6)
        for got, want in zip(fused_grads, eager_grads):  # float sums in another order: relative to the norm
            assert float((got - want).norm()) <= 1e-5 * float(want.norm())
        if router == "topk":
            assert torch.equal(fused.top_i, eager.top_i)
            torch.testing.assert_close(fused.balance_loss, eager.balance_loss, rtol=1e-5, atol=1e-6)
            assert (fused.kept is None) == (eager.kept is None) == (top_p == 0 and capacity == 0)
            if eager.kept is not None:
                assert torch.equal(fused.kept, eager.kept) and int(fused.dropped) == int(eager.dropped) > 0


def test_compiled_router_takes_more_routing_settings_than_dynamos_default_limit(monkeypatch):
    """A heterogeneous allocation routes each layer its own way: 10 settings, each a graph of its own, are
    past dynamo's default of 8 recompiles, at which a fullgraph function fails; the fused router takes them.
    The limit is dynamo's whatever the backend, so these graphs go to aot_eager rather than inductor (ten C++
    builds on a cold cache); inductor's kernels are checked against the eager router above."""
    from floe_dist.modeling import lora_moe

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="aot_eager", **kw))
    lora_moe.compiled.cache_clear()  # built with the backend above, and again after (below) for later tests
    try:
        _route_each_setting()
    finally:
        lora_moe.compiled.cache_clear()
        torch._dynamo.reset()  # no aot_eager graph left in dynamo's caches for a later test's inductor build


def _route_each_setting():
    torch.manual_seed(3)
    settings = [(e, k) for e in (2, 3, 4, 5, 6) for k in (1, 2)]
    for n_experts, top_k in settings:
        fused, eager = (LoRAMoELinear(nn.Linear(D_IN, D_OUT), [2] * n_experts, "topk", top_k=top_k) for _ in range(2))
        eager.load_state_dict(fused.state_dict())
        fused.fuse_router, eager.fuse_router = True, False
        x = torch.randn(7, D_IN)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-6)
        assert torch.equal(fused.top_i, eager.top_i)


def test_a_bad_fused_router_switch_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FLOE_DIST_FUSED_ROUTER", "false")  # would read as "on" if anything but "0" meant on
    layer = LoRAMoELinear(nn.Linear(D_IN, D_OUT), [2, 2], "topk", top_k=1)
    with pytest.raises(ValueError, match="FLOE_DIST_FUSED_ROUTER must be 0 .* or 1 .*, got 'false'"):
        layer(torch.randn(3, D_IN))
