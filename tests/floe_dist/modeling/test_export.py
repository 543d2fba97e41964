"""The PEFT export of a plain-LoRA allocation with per-module ranks computes the trained model both in PEFT,
which reads ``rank_pattern``/``alpha_pattern``, and in a reader that applies one ``lora_alpha / r`` to every
module, as servers that ignore the patterns do."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from floe_dist.allocation import Allocation, ModuleAllocation
from floe_dist.modeling.backbone import load_backbone, resolve_model
from floe_dist.modeling.export import save_adapter
from floe_dist.modeling.inject import inject_adapters, lora_state_dict

IDS = torch.tensor([[1, 450, 3290, 17, 902, 33, 7, 1200], [5, 6, 7, 8, 9, 10, 11, 12]])


def one_scale_reader(peft_dir) -> torch.nn.Module:
    """The backbone with every exported delta merged at the config's single scale, rank_pattern ignored."""
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    model = load_backbone(resolve_model("tiny")).eval()
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = tensors[key.replace("lora_A", "lora_B")]
                model.get_submodule(module).weight += scale * (b @ a)
    return model


def test_a_heterogeneous_rank_export_reads_the_same_in_peft_and_in_a_one_scale_reader(tmp_path):
    from peft import PeftModel

    allocation = Allocation.uniform(4, ["q_proj", "v_proj"], experts=1, rank=4, alpha=16.0)
    allocation.layers[1]["q_proj"] = ModuleAllocation(experts=1, ranks=(8,))
    allocation.layers[3]["v_proj"] = ModuleAllocation(experts=1, ranks=(2,))
    lm = load_backbone(resolve_model("tiny")).eval()
    torch.manual_seed(0)
    inject_adapters(lm, allocation)
    with torch.no_grad():
        for p in lora_state_dict(lm).values():
            p.normal_(0, 0.05)
        trained = lm(IDS).logits
        base = load_backbone(resolve_model("tiny")).eval()(IDS).logits
    export = save_adapter(tmp_path / "adapter", {k: v.detach().clone() for k, v in lora_state_dict(lm).items()},
                          allocation, {"base_model": "tiny", "quant": "none"})
    config = json.loads((export / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["rank_pattern"].values()) == {8, 2}
    peft_model = PeftModel.from_pretrained(load_backbone(resolve_model("tiny")), str(export / "peft")).eval()
    with torch.no_grad():
        through_peft, one_scale = peft_model(IDS).logits, one_scale_reader(export / "peft")(IDS).logits
    assert (trained - base).abs().max() > 1e-2  # the adapter changes the output ...
    torch.testing.assert_close(through_peft, trained, rtol=0, atol=1e-5)  # ... and both readers reproduce it
    torch.testing.assert_close(one_scale, trained, rtol=0, atol=1e-5)
