"""Every registered allocator writes a valid allocation; schedules, seeds, budgets and counts are right."""
from __future__ import annotations

import json

import pytest
import torch

from floe_dist.allocation import Allocation
from floe_dist.data import load_task, tokenize, train_batch
from floe_dist.methods import REGISTRY, get
from floe_dist.methods.hilo import schedule
from floe_dist.modeling.answer_lm import AnswerLM
from floe_dist.modeling.backbone import load_backbone, load_tokenizer
from floe_dist.modeling.inject import inject_adapters
from floe_dist.stages.allocate import ModelShape, model_shape, run
from tests.conftest import recipe_for

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
    args = recipe_for("allocate", method=method, model="tiny", scores=str(fisher_file), experts=2, rank=2, top_k=1,
                        flexora_steps=3, flexora_val=16, guilomo_steps=2, guilomo_order="first")
    allocation = get(method)(args, tiny_shape)
    allocation.validate(tiny_shape.num_layers, tiny_shape.shapes)
    model = load_backbone(tiny_model_dir)
    inject_adapters(model, Allocation.from_json(allocation.to_json()))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == allocation.trainable_parameters
    # ... and it trains: one step moves the loss on its batch
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = train_batch(tokenize(load_task("sst2", "train"), tokenizer, 64), step=0, micro=0, rank=0, world=1,
                        micro_batch=4, accumulation=1, seed=0, pad_id=tokenizer.pad_token_id)
    lm = AnswerLM(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = lm(**batch)["ce"]
    before.backward()
    opt.step()
    assert all(p.grad is not None for p in params) and lm(**batch)["ce"].item() != before.item()


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
    args = recipe_for("allocate", method="hilo", expert_schedule="2468", rank_schedule="uniform", rank=8, top_k=2,
                        targets=",".join(LLAMA2_7B))
    assert get("hilo")(args, shape).trainable_parameters == 105_635_840
    llama3 = ModelShape(32, {"q_proj": (4096, 4096), "v_proj": (4096, 1024)})
    assert get("uniform")(recipe_for("allocate", rank=8, experts=1, router="topk", top_k=1), llama3).trainable_parameters == 3_407_872


def test_random_is_seeded_and_floe_keeps_the_top_scores(tiny_shape, fisher_file):
    draw = lambda seed: sorted(get("random")(recipe_for("allocate", k=2, seed=seed), tiny_shape).layers)
    assert draw(1) == draw(1) and len(draw(1)) == 2
    assert len({tuple(draw(s)) for s in range(6)}) > 1
    floe = get("floe")(recipe_for("allocate", k=2, scores=str(fisher_file)), tiny_shape)
    assert sorted(floe.layers) == [1, 3] and floe.method == "floe"
    with pytest.raises(ValueError, match="needs allocate.scores"):
        get("floe")(recipe_for("allocate"), tiny_shape)
    with pytest.raises(ValueError, match="k=9"):
        get("random")(recipe_for("allocate", k=9), tiny_shape)


def test_budget_picks_the_closest_rank_and_keeps_a_schedules_shape(tiny_shape):
    uniform = lambda **kw: get("uniform")(recipe_for("allocate", **kw), tiny_shape)
    exact = uniform(rank=6).trainable_parameters
    assert uniform(rank=1).scaled_to_budget(exact, tiny_shape.shapes).trainable_parameters == exact
    target = exact // 3
    near = get("random")(recipe_for("allocate", k=2), tiny_shape).scaled_to_budget(target, tiny_shape.shapes)
    rank = next(iter(next(iter(near.layers.values())).values())).ranks[0]
    for other in (rank - 1, rank + 1):  # no neighbouring rank lands closer to the budget
        alt = get("random")(recipe_for("allocate", k=2, rank=other), tiny_shape).trainable_parameters
        assert abs(alt - target) >= abs(near.trainable_parameters - target)
    hilo = get("hilo")(recipe_for("allocate", expert_schedule="24", rank_schedule="24", rank=2, top_k=2), tiny_shape)
    doubled = hilo.scaled_to_budget(2 * hilo.trainable_parameters, tiny_shape.shapes)
    ranks = lambda a: [m.ranks[0] for _, mods in sorted(a.layers.items()) for m in mods.values()][::2]
    assert ranks(hilo) == [2, 2, 4, 4]
    assert ranks(doubled)[0] > 2 and abs(ranks(doubled)[-1] / ranks(doubled)[0] - 2) <= 0.25  # still "24"
    assert abs(doubled.trainable_parameters / (2 * hilo.trainable_parameters) - 1) < 0.05


def test_hilo_top_p_policy_is_written_and_active_parameters_are_below_trainable(tmp_path):
    out = tmp_path / "a.json"
    alloc = run(recipe_for("allocate", method="hilo", model="tiny", expert_schedule="4", rank=2, top_k=3,
                             top_p=0.7, min_k=1), str(out))
    module = Allocation.load(out).layers[0]["q_proj"]
    assert (module.experts, module.top_k, module.top_p, module.min_k) == (4, 3, 0.7, 1)
    shapes = model_shape("tiny").shapes
    assert alloc.count_active_parameters(shapes) < alloc.trainable_parameters  # 3 of 4 experts at most
    with pytest.raises(ValueError, match="min_k"):
        Allocation.from_json({**alloc.to_json(), "layers": {"0": {"q_proj": {**module.to_json(), "min_k": 4}}}})


def test_allocate_command_writes_a_file_train_accepts(tmp_path):
    out = tmp_path / "a.json"
    run(recipe_for("allocate", method="hilo", model="tiny", expert_schedule="24", rank=2), str(out))
    loaded = Allocation.load(out)
    assert [m.experts for l, mods in sorted(loaded.layers.items()) for m in mods.values()][::2] == [2, 2, 4, 4]
    with pytest.raises(ValueError, match="(?s)allocate.guilomo.order must be.*adapter.top_p must be"):
        run(recipe_for("allocate", method="guilomo", model="tiny", guilomo_order="third",
                         top_p=2.0), str(tmp_path / "b.json"))
    with pytest.raises(ValueError, match="unknown allocation method"):
        run(recipe_for("allocate", method="nope", model="tiny"), str(tmp_path / "b.json"))
    assert not (tmp_path / "b.json").exists()
