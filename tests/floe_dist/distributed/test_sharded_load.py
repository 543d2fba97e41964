"""Sharded loading under ZeRO-3: each rank builds only its partition, rank 0 alone reads the checkpoint,
and the model equals the one ``load_backbone`` loads whole (fp32 and NF4)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, clean_env

PROBE = "tests/floe_dist/distributed/load_probe.py"


def test_partitioned_load_equals_whole_load_and_reads_on_rank_0_only(tmp_path):
    from floe_dist.distributed.runtime import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", PROBE, str(tmp_path / "load")]
    subprocess.run(cmd, cwd=REPO, env=clean_env(2), check=True, capture_output=True, timeout=300)
    ranks = [json.loads((tmp_path / f"load.{r}.json").read_text()) for r in (0, 1)]
    for quant in ("none", "nf4"):
        zero, one = ranks[0][quant], ranks[1][quant]
        assert zero["max_diff"] == 0.0 and one["max_diff"] == 0.0, quant  # NF4 quantization is deterministic
        assert zero["held"] == one["held"] and zero["held"] * 2 - zero["full"] < 2 * zero["tensors"]  # half each
        assert zero["reads"] > 0 and one["reads"] == 0  # other ranks receive rank 0's broadcast
    assert ranks[0]["nf4"]["quantized"] == "Linear4bit" and ranks[0]["none"]["quantized"] == "Linear"


def test_a_checkpoint_that_lacks_weights_fails_before_any_collective(tmp_path):
    from safetensors.torch import load_file, save_file

    from floe_dist.distributed.sharded_load import load_partitioned
    from floe_dist.modeling.backbone import resolve_model

    broken = tmp_path / "broken"
    shutil.copytree(resolve_model("tiny"), broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\).*layers\.2\.mlp\.up_proj"):
        load_partitioned(broken, "none", {}, torch.device("cpu"))
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        load_partitioned(broken, "none", {}, torch.device("cpu"))


def test_a_bin_checkpoint_falls_back_to_the_whole_model_load(tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from floe_dist.distributed.layout import Layout
    from floe_dist.distributed.sharded_load import load_for_layout
    from floe_dist.modeling.backbone import load_backbone, resolve_model

    folder = tmp_path / "bin-only"
    reference = load_backbone(resolve_model("tiny"))
    AutoModelForCausalLM.from_pretrained(resolve_model("tiny")).save_pretrained(folder)
    weights = folder / "model.safetensors"  # rewritten as the older pytorch_model.bin format
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    model = load_for_layout(folder, "none", Layout(world_size=2, zero_stage=3), {"zero_optimization": {"stage": 3}})
    assert "no safetensors weights" in capsys.readouterr().out
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(model(ids).logits, reference(ids).logits)
