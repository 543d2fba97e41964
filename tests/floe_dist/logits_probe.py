"""Run as a script: load base model (+ adapter export) fresh and save logits of a fixed batch.

    python tests/floe_dist/logits_probe.py MODEL ADAPTER_OR_- QUANT OUT.pt
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
PROBE_IDS = torch.arange(2 * 11).reshape(2, 11) * 37 % 4000 + 5


def main(model: str, adapter: str, quant: str, out: str) -> None:
    from floe_dist.modeling.backbone import load_backbone, resolve_model
    from floe_dist.modeling.export import load_adapter

    lm = load_backbone(resolve_model(model), quant)
    if adapter != "-":
        load_adapter(lm, adapter)
    lm.eval()
    with torch.no_grad():
        torch.save(lm(PROBE_IDS).logits, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
