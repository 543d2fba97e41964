"""Merged exports: a plain-LoRA adapter folded into its base, as a model folder that any inference
server or ``AutoModelForCausalLM.from_pretrained`` loads without floe-dist.

Every adapted linear becomes ``W + (alpha / r) * B @ A`` (dropout is off at inference). For an adapter
trained over an NF4 backbone the base weights of the merged model are the *dequantised* NF4 weights
(every decoder linear, adapted or not, quantized as ``load_backbone(quant="nf4")`` quantizes it and read
back), so the merged model computes what the trained NF4 model computed; merging into the original
weights instead would add the quantisation error the adapter never saw. The merge goes through the base
checkpoint one safetensors file at a time and writes the same files in the same dtypes (a 70B merge holds
one shard, not the model); a bf16 base therefore rounds ``W + delta`` to bf16.

LoRA-MoE adapters (more than one expert in a module) cannot be merged: which experts a token uses
depends on the token. They are served with floe-dist's loader (``load_backbone`` +
``floe_dist.modeling.export.load_adapter``, as ``floe-dist evaluate --adapter`` does).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from floe_dist.files import write_json_atomic
from floe_dist.modeling.checkpoint import INDEX, weight_files
from floe_dist.modeling.export import read_export
from floe_dist.modeling.inject import find_layer_linears

MERGE_REFUSED = ("a LoRA-MoE adapter (more than one expert per module) cannot be merged into the base: its "
                 "routing depends on the input. Serve it with floe-dist's loader (load_backbone + "
                 "floe_dist.modeling.export.load_adapter, as `floe-dist evaluate --adapter` does)")
NF4_BLOCK = 64  # bitsandbytes' Params4bit default, what load_backbone and nf4_linear use


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as an NF4 backbone holds it: quantized (no double quantization) and read back, in fp32."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.float(), blocksize=NF4_BLOCK, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).float()


def merge_adapter(export: str | Path, out: str | Path) -> Path:
    """Write ``out``: the base model of ``export`` with its plain-LoRA adapter merged in."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from floe_dist.modeling.backbone import load_tokenizer, resolve_model

    meta, allocation, tensors = read_export(export)
    if not allocation.is_plain_lora:
        raise ValueError(f"{export}: {MERGE_REFUSED}")
    model_dir = resolve_model(meta["base_model"])
    files = weight_files(model_dir)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    linears = find_layer_linears(skeleton)
    nf4 = meta.get("quant") == "nf4"
    quantized = {f"{full}.weight" for mods in linears.values() for full, _ in mods.values()} if nf4 else set()
    adapted = {f"{linears[layer][name][0]}.weight": (linears[layer][name][0], spec.ranks[0])
               for layer, mods in allocation.layers.items() for name, spec in mods.items()}
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in files:
        shard = load_file(str(f))
        for key, weight in shard.items():
            if key not in quantized and key not in adapted:
                continue
            merged = nf4_roundtrip(weight) if key in quantized else weight.float()
            if key in adapted:
                full_name, rank = adapted[key]
                a, b = tensors[f"{full_name}.lora_A"].float(), tensors[f"{full_name}.lora_B"].float()
                merged += (allocation.alpha / rank) * b @ a
            shard[key] = merged.to(weight.dtype)
        save_file(shard, str(tmp / f.name), metadata={"format": "pt"})
        del shard
    for extra in model_dir.iterdir():  # config, generation config, index (same keys, same files)
        if extra.is_file() and extra.suffix != ".safetensors" and not extra.name.endswith(".lock"):
            shutil.copy2(extra, tmp / extra.name)
    load_tokenizer(model_dir).save_pretrained(tmp)
    write_json_atomic(tmp / "floe_dist_merge.json", {
        "adapter": str(export), "base_model": meta["base_model"], "quant": meta.get("quant", "none"),
        "base_weights": "nf4-dequantised" if nf4 else "original", "alpha": allocation.alpha,
        "index": (tmp / INDEX).is_file()})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
