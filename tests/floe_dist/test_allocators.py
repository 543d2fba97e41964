"""Every registered allocator writes a valid allocation; schedules, seeds, budgets and counts are right."""
from __future__ import annotations

import json

import pytest

from floe_dist.allocate import AllocateArgs, ModelShape, model_shape, run
from floe_dist.allocation import Allocation
from floe_dist.allocators import REGISTRY, get
from floe_dist.allocators.hilo import schedule
from floe_dist.modeling.backbone import load_backbone
from floe_dist.modeling.inject import inject_adapters

LLAMA2_7B = {n: (4096, 4096) for n in ("q_proj", "k_proj", "v_proj", "o_proj")} | \
            {"gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}


@pytest.fixture(scope="module")
def tiny_shape(tiny_model_dir) -> ModelShape:
    return model_shape("tiny")


@pytest.fixture
def fisher_file(tmp_path):
    path = tmp_path / "fisher.json"
    path.write_text(json.dumps({"scores": {"0": 0.1, "1": 3.0, "2": 0.5, "3": 2.0}}))
    return path


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_allocator_builds_a_model_with_its_exact_count(method, tiny_shape, tiny_model_dir, fisher_file):
    args = AllocateArgs(method=method, model="tiny", scores=str(fisher_file), experts=2, rank=2, top_k=1)
    allocation = get(method)(args, tiny_shape)
    allocation.validate(tiny_shape.num_layers, tiny_shape.shapes)
    model = load_backbone(tiny_model_dir)
    inject_adapters(model, Allocation.from_json(allocation.to_json()))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == allocation.trainable_parameters


def test_hilo_schedules_give_the_expected_per_layer_counts():
    assert schedule("2468", 8, 1) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert schedule("8642", 4, 1) == [8, 6, 4, 2]
    assert schedule("2468", 32, 1)[:9] == [2] * 8 + [4]
    assert schedule("uniform", 3, 5) == [5, 5, 5]
    with pytest.raises(ValueError, match="digits 1-9"):
        schedule("2x4", 8, 1)


def test_mola_2468_and_flexora_counts_match_published_figures():
    """methods.md §1.4 / §8 C8: LLaMA-2-7B MoLA 2468 r=8 on all 7 projections; Llama-3-8B q,v r=8."""
    shape = ModelShape(32, LLAMA2_7B)
    args = AllocateArgs(method="hilo", expert_schedule="2468", rank_schedule="uniform", rank=8, top_k=2,
                        targets=",".join(LLAMA2_7B))
    assert get("hilo")(args, shape).trainable_parameters == 105_635_840
    llama3 = ModelShape(32, {"q_proj": (4096, 4096), "v_proj": (4096, 1024)})
    assert get("uniform")(AllocateArgs(rank=8), llama3).trainable_parameters == 3_407_872


def test_random_is_seeded_and_floe_keeps_the_top_scores(tiny_shape, fisher_file):
    draw = lambda seed: sorted(get("random")(AllocateArgs(k=2, seed=seed), tiny_shape).layers)
    assert draw(1) == draw(1) and len(draw(1)) == 2
    assert len({tuple(draw(s)) for s in range(6)}) > 1
    floe = get("floe")(AllocateArgs(k=2, scores=str(fisher_file)), tiny_shape)
    assert sorted(floe.layers) == [1, 3] and floe.method == "floe"
    with pytest.raises(ValueError, match="needs --scores"):
        get("floe")(AllocateArgs(), tiny_shape)
    with pytest.raises(ValueError, match="k=9"):
        get("random")(AllocateArgs(k=9), tiny_shape)


def test_budget_picks_the_closest_rank(tiny_shape):
    exact = get("uniform")(AllocateArgs(rank=6), tiny_shape).trainable_parameters
    matched = get("uniform")(AllocateArgs(rank=1, budget=exact), tiny_shape)
    assert matched.trainable_parameters == exact
    target = exact // 3
    near = get("random")(AllocateArgs(k=2, budget=target), tiny_shape)
    rank = next(iter(next(iter(near.layers.values())).values())).ranks[0]
    for other in (rank - 1, rank + 1):  # no neighbouring rank lands closer to the budget
        alt = get("random")(AllocateArgs(k=2, rank=other), tiny_shape).trainable_parameters
        assert abs(alt - target) >= abs(near.trainable_parameters - target)


def test_allocate_command_writes_a_file_train_accepts(tmp_path):
    out = tmp_path / "a.json"
    run(AllocateArgs(method="hilo", model="tiny", output=str(out), expert_schedule="24", rank=2))
    loaded = Allocation.load(out)
    assert [m.experts for l, mods in sorted(loaded.layers.items()) for m in mods.values()][::2] == [2, 2, 4, 4]
    with pytest.raises(ValueError, match="unknown allocation method"):
        run(AllocateArgs(method="nope", model="tiny", output=str(tmp_path / "b.json")))
    assert not (tmp_path / "b.json").exists()
