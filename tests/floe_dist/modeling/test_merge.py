"""Merged exports: transformers alone loads the merged folder and computes the adapted model's logits."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from floe_dist.allocation import Allocation
from floe_dist.modeling.backbone import load_backbone, resolve_model
from floe_dist.modeling.export import load_adapter, save_adapter
from floe_dist.modeling.inject import inject_adapters, lora_state_dict
from floe_dist.modeling.merge import merge_adapter

IDS = [[1, 450, 3290, 17, 902, 33, 7, 1200], [5, 6, 7, 8, 9, 10, 11, 12]]

# What a user's serving script does: transformers only, no floe-dist import.
LOAD_MERGED = """
import sys, json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
assert not any(m.startswith(("floe_dist", "peft")) for m in sys.modules)
with torch.no_grad():
    print(json.dumps(model(torch.tensor(json.loads(sys.argv[2]))).logits.tolist()))
"""


def exported(tmp_path, quant: str, experts: int = 1):
    """An export of a trained-looking adapter (random, non-zero B) on the tiny model."""
    lm = load_backbone(resolve_model("tiny"), quant)
    allocation = Allocation.uniform(4, ["q_proj", "v_proj", "down_proj"], experts=experts, rank=4,
                                    layers=[0, 2, 3], alpha=16.0)
    torch.manual_seed(0)
    inject_adapters(lm, allocation)
    with torch.no_grad():
        for p in lora_state_dict(lm).values():
            p.normal_(0, 0.05)
    state = {k: v.detach().clone() for k, v in lora_state_dict(lm).items()}
    return save_adapter(tmp_path / f"adapter-{quant}-{experts}", state, allocation,
                        {"base_model": "tiny", "quant": quant})


@pytest.mark.parametrize("quant,tolerance", [("none", 1e-5), ("nf4", 1e-5)])  # measured: 3.6e-7, 4.5e-7
def test_the_merged_model_loads_without_floe_dist_and_matches_the_adapter(tmp_path, quant, tolerance):
    export = exported(tmp_path, quant)
    assert json.loads((export / "export.json").read_text())["mergeable"] is True
    merged = merge_adapter(export, tmp_path / "merged")
    adapted = load_adapter(load_backbone(resolve_model("tiny"), quant), export).eval()
    with torch.no_grad():
        expected = adapted(torch.tensor(IDS)).logits
        base = load_backbone(resolve_model("tiny"), quant).eval()(torch.tensor(IDS)).logits
    proc = subprocess.run([sys.executable, "-c", LOAD_MERGED, str(merged), json.dumps(IDS)],
                          capture_output=True, text=True, check=True)
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert (expected - base).abs().max() > 100 * tolerance  # the adapter changes the output ...
    assert (got - expected).abs().max() <= tolerance  # ... and the merged model reproduces it


def test_a_lora_moe_adapter_is_not_merged_and_says_how_to_serve_it(tmp_path):
    export = exported(tmp_path, "none", experts=2)
    meta = json.loads((export / "export.json").read_text())
    assert meta["mergeable"] is False and "load_adapter" in meta["serve"]
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_adapter(export, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_sharded_base_is_merged_shard_by_shard_into_the_same_files(tmp_path):
    """A base saved as several safetensors shards merges file by file (no whole model in memory) into the
    same file names and index, and computes what the one-file merge computes."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded-base"
    AutoModelForCausalLM.from_pretrained(resolve_model("tiny")).save_pretrained(sharded, max_shard_size="1MB")
    from floe_dist.modeling.backbone import load_tokenizer

    load_tokenizer(resolve_model("tiny")).save_pretrained(sharded)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 2
    export = exported(tmp_path, "nf4")
    meta = json.loads((export / "export.json").read_text())
    (export / "export.json").write_text(json.dumps({**meta, "base_model": str(sharded)}))
    merged = merge_adapter(export, tmp_path / "merged")
    assert sorted(p.name for p in merged.glob("*.safetensors")) == shards
    assert json.loads((merged / "floe_dist_merge.json").read_text())["index"] is True
    whole = merge_adapter(exported(tmp_path / "one", "nf4"), tmp_path / "merged-one")
    with torch.no_grad():
        a, b = (AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32)(torch.tensor(IDS)).logits
                for m in (merged, whole))
    assert torch.equal(a, b)
