"""Put LoRA-MoE adapters on a Hugging Face decoder as an Allocation says.

Target modules are found by name: ``<...>.layers.<i>.<...>.<name>`` where ``<name>`` is in
``target_modules`` (``q_proj``, ``v_proj``, ``gate_proj``, ... for Llama-style models). Every
trainable tensor is named ``lora_*``, so freezing, saving and export each need one name test.
"""
from __future__ import annotations

import re
from collections import defaultdict

from torch import nn

from floe_dist.allocation import Allocation
from floe_dist.modeling.lora_moe import LoRAMoELinear

_LAYER_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?([A-Za-z_0-9]+)$")
LORA_TAG = "lora_"


def find_layer_linears(model: nn.Module) -> dict[int, dict[str, tuple[str, nn.Module]]]:
    """{layer index: {short name: (full name, module)}} for every linear inside a decoder layer."""
    found: dict[int, dict[str, tuple[str, nn.Module]]] = defaultdict(dict)
    for full_name, module in model.named_modules():
        if LORA_TAG in full_name or full_name.endswith(".base") or not hasattr(module, "in_features"):
            continue
        match = _LAYER_MODULE.search(full_name)
        if match:
            found[int(match.group(1))][match.group(2)] = (full_name, module)
    return dict(found)


def replace_module(model: nn.Module, full_name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``full_name`` is (adapters, NF4 linears and GuiLoMo's search modules all go in this way)."""
    parent, _, child = full_name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return new


def module_shapes(model: nn.Module) -> tuple[int, dict[str, tuple[int, int]]]:
    """(number of decoder layers, {short module name: (d_in, d_out)}) of a model."""
    layers = find_layer_linears(model)
    if not layers:
        raise ValueError("no decoder layers with linear modules found (expected '...layers.<i>.<name>')")
    shapes = {}
    for mods in layers.values():
        for name, (_, mod) in mods.items():
            shapes.setdefault(name, (mod.in_features, mod.out_features))
    return len(layers), shapes


def inject_adapters(model: nn.Module, allocation: Allocation) -> dict[int, list[LoRAMoELinear]]:
    """Wrap the allocated modules in place, freeze everything else; returns adapters per layer.

    Validates the allocation against the model first, so a bad file changes nothing.
    """
    num_layers, shapes = module_shapes(model)
    allocation.validate(num_layers, shapes)
    linears = find_layer_linears(model)
    for p in model.parameters():
        p.requires_grad_(False)
    adapters: dict[int, list[LoRAMoELinear]] = {}
    for layer, mods in sorted(allocation.layers.items()):
        adapters[layer] = []
        for name, spec in mods.items():
            full_name, base = linears[layer][name]
            adapters[layer].append(replace_module(model, full_name, LoRAMoELinear(
                base, spec.ranks, spec.router, spec.top_k, allocation.alpha, allocation.dropout, spec.top_p, spec.min_k)))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = allocation.count_parameters(shapes)
    if real != expected:  # the file and the modules must agree exactly
        raise AssertionError(f"built {real} trainable parameters, allocation predicts {expected}")
    allocation.trainable_parameters = real
    return adapters


def adapter_modules(model: nn.Module) -> dict[str, LoRAMoELinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAMoELinear)}


def lora_state_dict(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter tensors only, keyed by their full names in ``model``."""
    return {name: p for name, p in model.named_parameters() if LORA_TAG in name}


def remove_adapters(model: nn.Module) -> int:
    """Put every adapter's frozen base module back where the adapter was (a warm search worker reuses its
    backbone for the next trial's allocation); returns how many were removed."""
    adapters = adapter_modules(model)
    for name, adapter in adapters.items():
        replace_module(model, name, adapter.base)
    return len(adapters)
