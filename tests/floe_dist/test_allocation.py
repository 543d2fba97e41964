"""The allocation file: round trip, every validation error, exact parameter counts."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from floe_dist.allocation import Allocation, AllocationError
from floe_dist.modeling.backbone import load_backbone
from floe_dist.modeling.inject import inject_adapters, module_shapes
from tests.conftest import run_floe

GOOD = {
    "format": "floe-dist/allocation@1", "method": "test", "target_modules": ["q_proj", "v_proj", "down_proj"],
    "alpha": 8.0, "dropout": 0.0,
    "layers": {
        "0": {"q_proj": {"experts": 3, "ranks": [1, 2, 4], "router": "topk", "top_k": 2}},
        "2": {"v_proj": {"experts": 2, "ranks": [4, 4], "router": "dense", "top_k": 2},
              "down_proj": {"experts": 1, "ranks": [8], "router": "topk", "top_k": 1}},
    },
}


def _with(path: str, value):
    data = copy.deepcopy(GOOD)
    *keys, last = path.split("/")
    node = data
    for k in keys:
        node = node[k]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


def test_round_trip_and_exact_count_on_a_real_model(tmp_path, tiny_model_dir):
    model = load_backbone(tiny_model_dir)
    allocation = Allocation.from_json(GOOD)
    adapters = inject_adapters(model, allocation)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert real == allocation.trainable_parameters > 0
    assert sorted(adapters) == [0, 2] and len(adapters[2]) == 2
    allocation.save(tmp_path / "a.json")
    again = Allocation.load(tmp_path / "a.json")
    assert again.to_json() == allocation.to_json()
    assert json.loads((tmp_path / "a.json").read_text())["trainable_parameters"] == real


def test_uniform_builder_counts_match_model(tiny_model_dir):
    model = load_backbone(tiny_model_dir)
    n_layers, shapes = module_shapes(model)
    uni = Allocation.uniform(n_layers, ["q_proj", "v_proj"], experts=4, rank=2, top_k=2)
    assert sorted(uni.layers) == list(range(n_layers))
    predicted = uni.count_parameters(shapes)
    inject_adapters(model, uni)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == predicted


def test_resized_keeps_layers_and_routers_and_counts_match_model(tiny_model_dir):
    resized = Allocation.from_json(GOOD).resized(rank=3, experts=2, method="smac")
    assert resized.method == "smac" and sorted(resized.layers) == [0, 2]
    assert resized.layers[0]["q_proj"].to_json() == {"experts": 2, "ranks": [3, 3], "router": "topk", "top_k": 2}
    assert resized.layers[2]["v_proj"].router == "dense"
    assert resized.layers[2]["down_proj"].top_k == 1  # top-1 stays top-1
    model = load_backbone(tiny_model_dir)
    predicted = resized.count_parameters(module_shapes(model)[1])
    inject_adapters(model, resized)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == predicted
    assert Allocation.from_json(GOOD).resized(rank=5).layers[0]["q_proj"].ranks == (5, 5, 5)


@pytest.mark.parametrize("data,message", [
    (_with("layers", {}), "empty allocation"),
    (_with("format", "v0"), "format must be"),
    (_with("layers/0/q_proj/ranks", [2, 0, 1]), "ranks must be >= 1"),
    (_with("layers/0/q_proj/top_k", 4), "top_k=4 is larger than experts=3"),
    (_with("layers/0/q_proj/experts", 5), "experts=5 but 3 ranks"),
    (_with("layers/0/q_proj/router", "soft"), "router must be one of"),
    (_with("layers/2/v_proj/ranks", [4, 2]), "all ranks must be equal"),
    (_with("layers/x", {"q_proj": {"ranks": [1]}}), "not an integer index"),
    (_with("target_modules", []), "target_modules must be a non-empty list"),
])
def test_malformed_files_raise_one_clear_error(data, message):
    with pytest.raises(AllocationError, match=message):
        Allocation.from_json(data)


@pytest.mark.parametrize("data,message", [
    (_with("layers/7", {"q_proj": {"experts": 1, "ranks": [2]}}), "layer 7 is out of range"),
    (_with("target_modules", ["q_proj", "v_proj", "down_proj", "qkv"]), "unknown target module"),
    (_with("layers/0/k_proj", {"experts": 1, "ranks": [2]}), "'k_proj' is not in target_modules"),
    (_with("trainable_parameters", 5), "trainable_parameters says 5"),
])
def test_allocations_that_do_not_fit_the_model_raise(data, message, tiny_model_dir):
    model = load_backbone(tiny_model_dir)
    with pytest.raises(AllocationError, match=message):
        inject_adapters(model, Allocation.from_json(data))
    assert "LoRAMoELinear" not in repr(model)  # validated before anything was wrapped


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(AllocationError, match="not found"):
        Allocation.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AllocationError, match="not valid JSON"):
        Allocation.load(tmp_path / "bad.json")


def test_train_with_a_bad_allocation_fails_clearly_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_with("layers/9", {"q_proj": {"experts": 1, "ranks": [2]}})))
    out = tmp_path / "run"
    proc = run_floe(["train", "--model", "tiny", "--allocation", str(bad), "--output", str(out)], check=False)
    assert proc.returncode == 2
    assert "layer 9 is out of range" in proc.stderr
    assert not Path(out).exists()


def test_rank_scaling_keeps_a_heterogeneous_shape_and_matches_resizing_on_a_uniform_one():
    hetero = Allocation.from_json(GOOD)
    scaled = hetero.rank_scaled(16)
    assert scaled.layers[0]["q_proj"].ranks == (2, 4, 8) and scaled.layers[2]["down_proj"].ranks == (16,)
    assert scaled.layers[2]["v_proj"].ranks == (8, 8) and scaled.layers[2]["v_proj"].router == "dense"
    assert not hetero.is_uniform and hetero.rank_scaled(1).layers[0]["q_proj"].ranks == (1, 1, 1)  # at least 1
    uniform = Allocation.uniform(4, ["q_proj"], experts=2, rank=4, top_k=1).with_parameter_count({"q_proj": (8, 8)})
    assert uniform.is_uniform and uniform.rank_scaled(8) == uniform.resized(8)  # the old count is not carried
    assert uniform.rank_scaled(8).trainable_parameters is None and uniform.trainable_parameters == 4 * (8 * 8 + 8 * 8 + 8 * 2)
