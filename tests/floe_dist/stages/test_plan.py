"""``floe-dist plan``: its published comparison, exact meta-device counts, advice and bad inputs."""
from __future__ import annotations

import json

import pytest

from benchmarks.bench_plan_published import PUBLISHED, predict
from benchmarks.result_file import read_result
from floe_dist.stages.plan import PlanInputs, count_model, model_config, plan
from tests.conftest import run_floe, run_here


def test_meta_device_counts_equal_the_loaded_model(tiny_model_dir):
    from floe_dist.modeling.backbone import load_backbone

    count = count_model(model_config(str(tiny_model_dir)))
    model = load_backbone(tiny_model_dir)
    assert count.total == sum(p.numel() for p in model.parameters())
    assert count.layers == 4 and count.shapes["q_proj"] == (64, 64)


@pytest.mark.parametrize("row", PUBLISHED, ids=lambda r: f"{r.role}: {r.run}")
def test_the_published_comparison_in_benchmarks_is_what_the_planner_predicts_now(row):
    """BENCHMARKS.md's calibration and validation tables (benchmarks/results/plan_published.json) are
    the current planner's figures: a change to plan.py that moves one must rerun the benchmark."""
    committed = {r["run"]: r for r in read_result("plan_published")["rows"]}[row.run]
    assert predict(row) == pytest.approx(committed["plan"], rel=1e-9)
    assert committed["error"] == pytest.approx(committed["plan"] / row.published - 1)


def test_calibration_reproduces_the_figure_it_was_fitted_on_and_counts_exactly():
    """GPU_FACTOR was fitted on the PEFT ZeRO-3 QLoRA 70B run; this guards the fit, it validates nothing."""
    row = next(r for r in PUBLISHED if r.role == "calibration")
    assert abs(predict(row) / row.published - 1) <= 0.05
    assert plan(PlanInputs(**row.plan))["model"]["parameters"] == 68_976_648_192  # Llama-2-70B, exactly
    assert len([r for r in PUBLISHED if r.role == "validation"]) >= 3


def test_llama2_70b_with_offload_fits_on_24_gb():
    offload = next(r for r in PUBLISHED if r.plan.get("offload"))
    assert plan(PlanInputs(**offload.plan))["fits"]


def test_a_plan_that_does_not_fit_says_what_would():
    result = plan(PlanInputs(model="llama3-70b", gpus_per_node=1, quant="bf16", gpu_memory=80))
    assert not result["fits"]
    tips = " | ".join(result["advice"])
    assert "--quant nf4" in tips and "--nodes" in tips
    nodes = int(tips.split("use --nodes ")[1].split()[0])
    assert plan(PlanInputs(model="llama3-70b", nodes=nodes, gpus_per_node=1, quant="bf16", gpu_memory=80))["fits"]


def test_split_experts_hold_their_whole_state_on_an_ep_shard():
    """Split experts keep weight, grad and AdamW moments (16 B) on each of ep_size ranks; everything
    else is divided by the world size under ZeRO-3. So --ep-size saves communication (no expert
    gathers), not state memory, against ZeRO-3 partitioned replicas: the planner must say so."""
    common = dict(model="llama3-8b", gpus_per_node=8, experts=8, rank=8, targets="gate_proj,up_proj,down_proj")
    replicated, split = plan(PlanInputs(**common)), plan(PlanInputs(**common, ep_size=2))
    experts, total = split["split_expert_parameters"], split["trainable_parameters"]
    assert 0 < experts < total
    assert split["bytes"]["adapters"] == pytest.approx(16 * experts / 2 + 16 * (total - experts) / 8)
    assert replicated["bytes"]["adapters"] == pytest.approx(16 * total / 8)


def test_bad_plan_inputs_fail_clearly(tmp_path):
    for flags, message in [(["--nodes", "0"], "parallel.nodes must be >= 1"),
                           (["--ep-size", "3", "--router", "topk"], "--ep-size 3 must divide the world size 8"),
                           (["--zero", "1"], "--zero must be 0, 2 or 3"),
                           (["--ep-size", "2", "--zero", "2", "--router", "topk"], "runs beside ZeRO-3"),
                           (["--mfu", "2"], "plan.mfu must be in (0, 1]"),
                           (["--allocation", str(tmp_path / "missing.json")], "file not found")]:
        proc = run_here(["plan", "--model", "llama3-70b", "--nproc", "8", *flags])
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    with pytest.raises(ValueError, match="--quant must be one of"):
        plan(PlanInputs(quant="int3"))


def test_one_rank_zero3_gathers_in_place_so_the_plan_counts_no_gather(tiny_model_dir):
    """plan() has no gather term on one rank because DeepSpeed's gathered parameter is then a view of
    its own partition; this keeps that assumption checked against the installed DeepSpeed."""
    import torch

    from floe_dist.allocation import Allocation
    from floe_dist.distributed import engine as ds
    from floe_dist.distributed.runtime import init_distributed
    from floe_dist.modeling.backbone import load_backbone
    from floe_dist.modeling.inject import inject_adapters

    init_distributed()
    lm = load_backbone(tiny_model_dir)
    inject_adapters(lm, Allocation.uniform(lm.config.num_hidden_layers, ["q_proj"], rank=2))
    config = ds.build_config(3, micro_batch=1, accumulation=1, world_size=1, lr=1e-3, weight_decay=0.0)
    engine, _ = ds.initialize(lm, config, lambda step: 1.0)
    down = lm.model.layers[0].mlp.down_proj
    in_place = []
    down.register_forward_pre_hook(lambda *_: in_place.append(  # runs after DeepSpeed's gather hook
        down.weight.numel() > 0 and down.weight.untyped_storage().data_ptr() == down.weight.ds_tensor.untyped_storage().data_ptr()))
    engine(input_ids=torch.tensor([[1, 2, 3]]))
    assert in_place == [True]
    one, two = (plan(PlanInputs(model=str(tiny_model_dir), device="cpu", gpus_per_node=n)) for n in (1, 2))
    assert one["bytes"]["gather"] == 0 < two["bytes"]["gather"]


def test_load_peak_is_planned_apart_from_training():
    """Sharded ZeRO-3 loading holds the partition plus the largest module whole; one rank loads the whole
    model; the plan fits only when the larger of the two does."""
    from floe_dist.stages.plan import GIB, GPU_FACTOR

    common = dict(model="llama3-70b", quant="nf4", rank=8, seq_len=512)
    sharded = plan(PlanInputs(**common, nodes=2, gpus_per_node=8))
    embedding = 128256 * 8192  # Llama-3-70B's largest parameter (embedding = head size)
    assert sharded["load_terms"]["working"] == embedding * 2  # bf16, on the GPU
    assert sharded["load_terms"]["base"] == sharded["bytes"]["base"]  # each rank keeps only its partition
    assert sharded["load_bytes"] == pytest.approx(GPU_FACTOR * sum(sharded["load_terms"].values()))
    assert sharded["limit"] == ("loading" if sharded["load_bytes"] > sharded["total_bytes"] else "training")
    one = plan(PlanInputs(**common, gpus_per_node=1, gpu_memory=80))
    assert one["load_terms"]["working"] == 0 and one["load_terms"]["base"] == one["bytes"]["base"] > 0
    cpu = plan(PlanInputs(**common, nodes=2, gpus_per_node=8, device="cpu"))
    assert cpu["load_terms"]["working"] == embedding * (4 + 2)  # fp32 module and rank 0's bf16 read
    larger = max(sharded["load_bytes"], sharded["total_bytes"]) / GIB
    assert plan(PlanInputs(**common, nodes=2, gpus_per_node=8, gpu_memory=larger * 1.001))["fits"]
    assert not plan(PlanInputs(**common, nodes=2, gpus_per_node=8, gpu_memory=larger * 0.999))["fits"]


def test_plan_shows_how_a_campaign_budget_splits(tmp_path):
    """The search's share and the final run's rest, and the final run's steps at the planned step time."""
    out = tmp_path / "plan.json"
    proc = run_floe(["plan", "--config", "recipes/llama3-70b-2node.yaml", "--campaign.budget", "24h",
                     "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["budget"]["search_s"] == pytest.approx(0.3 * 86400) and result["budget"]["train_s"] == pytest.approx(
        0.7 * 86400)
    assert result["budget"]["train_steps"] == int(0.7 * 86400 / result["seconds_per_step"])
    assert "campaign.budget 24h (86400 s): the search at most 25920 s" in proc.stdout
    proc = run_here(["plan", "--config", "recipes/llama3-70b-2node.yaml", "--campaign.budget", "job", "--output",
                     str(out)])  # an sbatch job's time left: known when the campaign starts in it
    assert proc.returncode == 0 and "budget" not in json.loads(out.read_text())
    assert "campaign.budget job: the search's and the final run's shares are set from the time the sbatch job has " \
           "left when the campaign starts" in proc.stdout


def test_evaluation_memory_follows_the_training_partitioning():
    """A bf16 70B backbone (140 GB) fits no 80 GB GPU whole, so evaluating it takes the job's ranks: evaluation
    holds the same partition of it as training (distributed/sharded_eval.py), without gradients or optimizer."""
    whole = plan(PlanInputs(model="llama3-70b", gpus_per_node=1, quant="bf16", gpu_memory=80))
    spread = plan(PlanInputs(model="llama3-70b", nodes=2, gpus_per_node=8, quant="bf16", gpu_memory=80))
    assert whole["eval_terms"]["base"] == whole["bytes"]["base"] > 80 * 2**30
    assert spread["eval_terms"]["base"] == spread["bytes"]["base"] == whole["bytes"]["base"] / 16
    assert spread["eval_bytes"] < spread["total_bytes"] and spread["eval_bytes"] < 80 * 2**30
