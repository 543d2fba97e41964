"""Adapter export: safetensors + the allocation file, and a standard PEFT adapter for plain LoRA.

Layout of an export folder::

    adapter_model.safetensors   # lora_* tensors, keyed by their names in the HF model
    allocation.json             # how to rebuild the modules (floe-dist/allocation@1)
    export.json                 # base model, quantization, training step
    peft/                       # only when every module has one expert: PeftModel.from_pretrained
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from floe_dist.allocation import Allocation
from floe_dist.files import write_json_atomic
from floe_dist.modeling.inject import adapter_modules, inject_adapters, lora_state_dict

EXPORT_FORMAT = "floe-dist/adapter@1"


def save_adapter(folder: str | Path, state: dict[str, torch.Tensor], allocation: Allocation, meta: dict) -> Path:
    """Write an export folder from gathered, full CPU tensors (see distributed.engine.gather_full)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    allocation.save(folder / "allocation.json")
    if allocation.is_plain_lora:
        save_peft_adapter(folder / "peft", state, allocation, meta.get("base_model", ""))
    serve = ("merge it into the base: floe-dist export --merged DIR" if allocation.is_plain_lora
             else "floe-dist's loader (load_backbone + load_adapter); routing depends on the input, so it "
                  "cannot be merged into the base")
    write_json_atomic(folder / "export.json", {"format": EXPORT_FORMAT, **meta, "mergeable": allocation.is_plain_lora,
                                               "serve": serve})  # written last: the export is complete
    return folder


def save_peft_adapter(folder: Path, state: dict[str, torch.Tensor], allocation: Allocation, base: str) -> None:
    """The same weights in PEFT's LoRA format. Modules whose rank differs from the most common one get their
    scale folded into B: a reader that applies one ``lora_alpha / r`` to every module (one that ignores
    ``rank_pattern``, as some servers do) computes the trained function, and ``alpha_pattern`` keeps PEFT,
    which reads the patterns, computing the same."""
    from peft import LoraConfig

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")  # e.g. model.layers.0.self_attn.q_proj, lora_A
        if kind in ("lora_A", "lora_B"):
            pairs.setdefault(module, {})[kind] = value
    ranks = {module: ab["lora_A"].shape[0] for module, ab in pairs.items()}
    default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    tensors, alpha_pattern = {}, {}
    for module, ab in pairs.items():
        fold = default_rank / ranks[module]  # trained scale alpha/r_m over the one a plain reader uses, alpha/r
        tensors[f"base_model.model.{module}.lora_A.weight"] = ab["lora_A"].contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = (ab["lora_B"] * fold).contiguous()
        if ranks[module] != default_rank:  # PEFT scales by alpha_pattern / r_m: alpha * r_m / r undoes the fold
            alpha_pattern[module] = allocation.alpha * ranks[module] / default_rank
    config = LoraConfig(r=default_rank, lora_alpha=allocation.alpha, lora_dropout=allocation.dropout,
                        target_modules=sorted(ranks), rank_pattern={k: r for k, r in ranks.items() if r != default_rank},
                        alpha_pattern=alpha_pattern, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def export_meta(folder: str | Path) -> dict:
    """``export.json`` of a complete export (it is written last); raises on anything else."""
    meta_path = Path(folder) / "export.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a complete floe-dist export (no export.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}")
    return meta


def read_export(folder: str | Path) -> tuple[dict, Allocation, dict[str, torch.Tensor]]:
    folder = Path(folder)
    meta = export_meta(folder)
    return meta, Allocation.load(folder / "allocation.json"), load_file(str(folder / "adapter_model.safetensors"))


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Inject the exported adapters into a freshly loaded base model and load their weights strictly."""
    _, allocation, tensors = read_export(folder)
    inject_adapters(model, allocation)
    params = lora_state_dict(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ValueError(f"{name}: export has shape {tuple(tensors[name].shape)}, model {tuple(p.shape)}")
            p.copy_(tensors[name])
    assert adapter_modules(model), "no adapter was injected"
    return model
