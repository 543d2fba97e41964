"""Flexora: alpha_hat plumbing (methods.md §8 C5) and the scarce-data claim on a planted toy (C4)."""
from __future__ import annotations

import itertools

import pytest
import torch

from floe_dist.allocation import Allocation
from floe_dist.methods.flexora import LayerWeights, flexora_search, remove_weights
from tests.conftest import recipe_for
from tests.toys import flexora_toy, flexora_toy_search, retrained_test_mse


def _random_b(adapters):
    with torch.no_grad():
        for mods in adapters.values():
            for m in mods:
                m.lora_B.normal_(std=0.5)


def test_alpha_hat_is_one_at_init_so_the_model_is_plain_lora():
    base, adapters, (x, _), _, _ = flexora_toy(0)
    _random_b(adapters)
    with torch.no_grad():
        plain = base(x)
    weights = LayerWeights(adapters)
    assert torch.equal(weights.alpha_hat(), torch.ones(8))
    with torch.no_grad():
        assert torch.allclose(base(x), plain, atol=1e-6)


def test_alpha_hat_scales_only_the_adapter_output_once():
    base, adapters, (x, _), _, _ = flexora_toy(1)
    _random_b(adapters)
    weights = LayerWeights(adapters)
    module = adapters[3][0]
    h = torch.randn(5, module.in_features)
    base_out = module.base(h)
    with torch.no_grad():
        weights.alpha[3] = 1.0  # alpha_hat_3 = 8 e / (7 + e)
        delta = module(h) - base_out
        module.adapter_scale = None
        unscaled = module(h) - base_out
    hat = 8 * torch.e / (7 + torch.e)
    assert torch.allclose(delta, hat * unscaled, atol=1e-5)


def test_alpha_step_sends_no_gradient_to_the_adapters():
    base, adapters, (x, y), (xv, yv), _ = flexora_toy(2)
    _random_b(adapters)  # with B = 0 the adapters contribute nothing and alpha has no gradient
    loss_fn = lambda b: (base(b["x"]) - b["y"]).pow(2).mean()
    train = {"x": x[:16], "y": y[:16]}
    theta = [p for n, p in base.named_parameters() if p.requires_grad]
    before = [p.detach().clone() for p in theta]
    weights = flexora_search(base, adapters, itertools.repeat(train), lambda: [{"x": xv, "y": yv}], loss_fn,
                             steps=1, lr_model=0.0, lr_alpha=0.05)
    assert all(torch.equal(a, p) for a, p in zip(before, theta))  # lr 0: adapters unchanged
    assert weights.alpha.abs().sum() > 0  # alpha moved
    remove_weights(adapters)  # scale 1 again: what the training step (alpha_hat = 1, detached) saw
    expected = torch.autograd.grad(loss_fn(train), theta)  # the training step's gradient, nothing added
    for p, g in zip(theta, expected):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_flexora_layers_beat_all_layers_with_scarce_data():
    """64 noisy training examples: the searched subset generalises better than LoRA on all 8 layers."""
    for seed in range(3):
        selected = flexora_toy_search(seed)
        assert 0 < len(selected) < 8
        assert retrained_test_mse(seed, selected) < retrained_test_mse(seed, None)


def test_flexora_allocator_selects_layers_of_a_real_model(tmp_path):
    from floe_dist.stages.allocate import run

    out = tmp_path / "flexora.json"
    allocation = run(recipe_for("allocate", method="flexora", model="tiny", task="sst2", rank=2, flexora_steps=3, flexora_batch=2, flexora_val=16, k=2), str(out))
    assert sorted(allocation.layers) == sorted(Allocation.load(out).layers) and len(allocation.layers) == 2
    assert set(allocation.meta["alpha"]) == {"0", "1", "2", "3"}
    with pytest.raises(ValueError, match="leaves none to train on"):
        run(recipe_for("allocate", method="flexora", model="tiny", flexora_val=10_000), str(tmp_path / "x.json"))


def test_flexora_search_on_two_ranks_equals_one_process(tmp_path):
    """`floe-dist allocate --method flexora` under torchrun: each rank takes half of every training
    batch and of the validation batches; alpha and the selection match the single-process search."""
    from tests.conftest import run_floe

    common = ["allocate", "--method", "flexora", "--model", "tiny", "--task", "sst2", "--rank", "2",
              "--dropout", "0", "--flexora-steps", "4", "--flexora-batch", "4", "--flexora-val", "16", "--k", "2"]
    for nproc in (1, 2):
        run_floe([*common, "--output", str(tmp_path / f"n{nproc}.json")], nproc=nproc)
    one, two = (Allocation.load(tmp_path / f"n{n}.json") for n in (1, 2))
    alpha_one, alpha_two = (torch.tensor([a.meta["alpha"][k] for k in sorted(a.meta["alpha"])]) for a in (one, two))
    assert alpha_one.abs().max() > 0.01  # alpha really moved
    torch.testing.assert_close(alpha_two, alpha_one, rtol=1e-4, atol=1e-6)
    assert sorted(one.layers) == sorted(two.layers)
