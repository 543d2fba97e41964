"""Run under torchrun: the tiny backbone loaded partitioned (ZeRO-3) against ``load_backbone`` in one piece.

    torchrun --nproc_per_node N tests/floe_dist/distributed/load_probe.py OUT_PREFIX

Per quantization (none, nf4) and rank: the largest logit difference (parameters gathered), the elements this
rank holds against the model's, and how many tensors it read from the checkpoint.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main(prefix: str) -> None:
    import deepspeed

    from floe_dist.distributed import engine as ds
    from floe_dist.distributed import sharded_load
    from floe_dist.distributed.runtime import init_distributed
    from floe_dist.modeling.backbone import load_backbone, resolve_model

    info = init_distributed()
    reads = {"n": 0}
    read = sharded_load.Checkpoint.read

    def counted(self, key):
        reads["n"] += 1
        return read(self, key)

    sharded_load.Checkpoint.read = counted
    config = ds.build_config("3", micro_batch=1, accumulation=1, world_size=info.world_size, lr=1e-3, weight_decay=0.0)
    model_dir = resolve_model("tiny")
    ids = torch.arange(24).view(2, 12) + 7
    report = {}
    for quant in ("none", "nf4"):
        reads["n"] = 0
        model = sharded_load.load_partitioned(model_dir, quant, config, torch.device("cpu"))
        held = sum(p.ds_tensor.numel() for p in model.parameters())
        full = sum(p.ds_numel for p in model.parameters())
        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(model.parameters())):
            logits = model(input_ids=ids).logits
        reference = load_backbone(model_dir, quant, "cpu")(input_ids=ids).logits
        report[quant] = {"max_diff": (logits - reference).abs().max().item(), "held": held, "full": full,
                         "tensors": len(list(model.parameters())), "reads": reads["n"],
                         "quantized": type(model.model.layers[0].mlp.up_proj).__name__}
    Path(f"{prefix}.{info.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
