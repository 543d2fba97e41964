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
