"""Run as a script: load base model (+ adapter export) fresh and save logits of a fixed batch.

    python tests/floe_dist/logits_probe.py MODEL ADAPTER_OR_- QUANT OUT.pt
    torchrun --nproc_per_node 2 tests/floe_dist/logits_probe.py MODEL ADAPTER QUANT OUT.pt --ep-size 2
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
PROBE_IDS = torch.arange(2 * 11).reshape(2, 11) * 37 % 4000 + 5


def main(model: str, adapter: str, quant: str, out: str, ep_flag: str = "", ep_size: str = "1") -> None:
    from floe_dist.modeling.backbone import load_backbone, resolve_model
    from floe_dist.modeling.export import load_adapter

    lm = load_backbone(resolve_model(model), quant)
    if adapter != "-":
        load_adapter(lm, adapter)
    is_main = True
    if int(ep_size) > 1:  # split the loaded experts over the ranks, as a --ep-size run holds them
        from floe_dist.distributed.expert_parallel import ExpertParallel, create_groups
        from floe_dist.distributed.runtime import init_distributed

        is_main = init_distributed().is_main
        ExpertParallel(lm, create_groups(int(ep_size)))
    lm.eval()
    with torch.no_grad():
        logits = lm(PROBE_IDS).logits
    if is_main:
        torch.save(logits, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
