"""Merged exports: a plain-LoRA adapter folded into its base, as a model folder that any inference
server or ``AutoModelForCausalLM.from_pretrained`` loads without floe-dist.

Every adapted linear becomes ``W + (alpha / r) * B @ A`` (dropout is off at inference). For an adapter
trained over an NF4 backbone the base weights of the merged model are the *dequantised* NF4 weights
(every decoder linear, adapted or not, read back from the NF4 backbone the training loaded), so the
merged model computes what the trained NF4 model computed, in full precision; merging into the original
full-precision weights instead would add the quantisation error the adapter never saw. The merge holds
the model in fp32 in host memory (4 bytes per parameter): fine for the models trained here, a
shard-by-shard merge is still missing for 70B.

LoRA-MoE adapters (more than one expert in a module) cannot be merged: which experts a token uses
depends on the token. They are served with floe-dist's loader (``load_backbone`` +
``floe_dist.modeling.export.load_adapter``, as ``floe-dist evaluate --adapter`` does).
"""
from __future__ import annotations

from pathlib import Path

import torch

from floe_dist.allocation import write_json_atomic
from floe_dist.modeling.export import read_export
from floe_dist.modeling.inject import find_layer_linears

MERGE_REFUSED = ("a LoRA-MoE adapter (more than one expert per module) cannot be merged into the base: its "
                 "routing depends on the input. Serve it with floe-dist's loader (load_backbone + "
                 "floe_dist.modeling.export.load_adapter, as `floe-dist evaluate --adapter` does)")


def dequantised_nf4_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every NF4 linear's weight as the training backbone held it (``load_backbone(quant="nf4")``), dequantised."""
    import bitsandbytes.functional as bnbf

    from floe_dist.modeling.backbone import load_backbone

    quantized = load_backbone(model_dir, "nf4", "cpu")
    return {f"{name}.weight": bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            for name, m in quantized.named_modules() if type(m).__name__ == "Linear4bit"}


def merge_adapter(export: str | Path, out: str | Path) -> Path:
    """Write ``out``: the base model of ``export`` with its plain-LoRA adapter merged in (fp32 safetensors)."""
    from transformers import AutoModelForCausalLM

    from floe_dist.modeling.backbone import load_tokenizer, resolve_model

    meta, allocation, tensors = read_export(export)
    if not allocation.is_plain_lora:
        raise ValueError(f"{export}: {MERGE_REFUSED}")
    model_dir = resolve_model(meta["base_model"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    linears = find_layer_linears(model)
    with torch.no_grad():
        if meta.get("quant") == "nf4":
            params = dict(model.named_parameters())
            for name, weight in dequantised_nf4_weights(model_dir).items():
                params[name].copy_(weight)
        for layer, mods in allocation.layers.items():
            for name, spec in mods.items():
                full_name, linear = linears[layer][name]
                a, b = tensors[f"{full_name}.lora_A"].float(), tensors[f"{full_name}.lora_B"].float()
                linear.weight.add_((allocation.alpha / spec.ranks[0]) * b @ a)
    out = Path(out)
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    write_json_atomic(out / "floe_dist_merge.json", {"adapter": str(export), "base_model": meta["base_model"],
                                                     "quant": meta.get("quant", "none"),
                                                     "base_weights": "nf4-dequantised" if meta.get("quant") == "nf4"
                                                     else "original", "alpha": allocation.alpha})
    return out
