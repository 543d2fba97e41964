"""The one layout object: what this process is, and which allocations a layout can train."""
from __future__ import annotations

import pytest

from floe_dist.allocation import Allocation, AllocationError
from floe_dist.distributed.layout import Layout
from floe_dist.stages.plan import PlanInputs


def _allocation(experts: int, router: str = "topk") -> Allocation:
    return Allocation.uniform(4, ["q_proj"], experts=experts, rank=2, router=router, top_k=1)


@pytest.mark.parametrize("allocation,ep_size,world,stage,message", [
    (_allocation(4), 2, 3, 3, "must divide the world size 3"),
    (_allocation(3), 2, 2, 3, "3 experts do not split over --ep-size 2"),
    (_allocation(4, "dense"), 2, 2, 3, "dense (HydraLoRA) router"),
    (_allocation(1), 2, 2, 3, "nothing to split"),
    (_allocation(4), 2, 2, 2, "stage 2"),
], ids=["world", "experts", "dense", "plain-lora", "zero2"])
def test_impossible_layouts_are_refused(allocation, ep_size, world, stage, message):
    with pytest.raises(AllocationError, match="impossible expert-parallel layout") as err:
        Layout(world_size=world, ep_size=ep_size, zero_stage=stage).check(allocation)
    assert message in str(err.value)


def test_this_process_is_a_world_of_one_on_cpu():
    layout = Layout.current(ds_config={"zero_optimization": {"stage": 3}}, init=False)
    assert (layout.world_size, layout.rank, layout.zero_stage, layout.is_main) == (1, 0, 3, True)
    assert (layout.device, layout.dtype, layout.edp_size) == ("cpu", "float32", 1)


def test_the_planner_refuses_what_training_refuses():
    plan = PlanInputs(model="llama3-8b", nodes=1, gpus_per_node=4, ep_size=2, zero=3, experts=3)
    assert plan.layout() == Layout.planned(1, 4, 2, 3) and plan.layout().edp_size == 2
    with pytest.raises(AllocationError, match="3 experts do not split over --ep-size 2"):
        from floe_dist.stages.plan import plan as make_plan

        make_plan(plan)
