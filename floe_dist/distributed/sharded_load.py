"""A frozen backbone built already partitioned by ZeRO-3: no rank ever holds the whole model.

Why not ``from_pretrained``: every rank would load the whole model before ``deepspeed.initialize``
partitions it. transformers' ZeRO-3 path (``HfDeepSpeedConfig``) builds inside ``zero.Init`` but is
skipped for quantized models (a bitsandbytes 4-bit model is loaded whole on every rank, DeepSpeed
#5660), and on rank 0 it maps every checkpoint file into one state dict.

Here the model is built on the meta device (accelerate's ``init_empty_weights``; buffers such as RoPE
tables are real), then filled one module at a time: rank 0 reads that module's tensors from the
safetensors files (and quantizes a decoder linear to NF4, as ``load_backbone`` would), every other
rank allocates empty tensors of the same shapes, and DeepSpeed's parameter conversion broadcasts
rank 0's values and keeps each rank's partition. Working set: the largest module (the embedding, at
70B), once; only rank 0 reads the checkpoint. NF4 quantization state (absmax per 64 weights) is
broadcast beside the packed weight and stays whole on every rank, as it does after
``deepspeed.initialize``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from floe_dist.modeling.backbone import compute_dtype, load_backbone, nf4_weights
from floe_dist.modeling.checkpoint import INDEX, Checkpoint


def load_partitioned(model_dir: str | Path, quant: str, ds_config: dict, device: torch.device):
    """The model of ``model_dir`` (optionally NF4), each parameter already a ZeRO-3 partition."""
    import deepspeed
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from floe_dist.modeling.inject import find_layer_linears

    if quant not in ("none", "nf4"):
        raise ValueError(f"quant must be 'none' or 'nf4', got {quant!r}")
    model_dir = Path(model_dir)
    dtype = compute_dtype()
    ckpt = Checkpoint(model_dir)  # every rank reads the headers: a missing key fails everywhere, before any collective
    rank = dist.get_rank() if dist.is_initialized() else 0
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    model.tie_weights()  # tied heads share the embedding's parameter (from_config leaves them apart)
    to_quantize = ({full for mods in find_layer_linears(model).values() for full, _ in mods.values()}
                   if quant == "nf4" else set())
    owners: dict[int, str] = {}  # tied parameters: the first module that owns one loads it
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), f"{module_name}.{name}".lstrip("."))
    lacking = sorted(key for key in set(owners.values()) if key not in ckpt.meta)
    if lacking:
        raise ValueError(f"{model_dir}: the checkpoint lacks {len(lacking)} weight(s) the model needs: {lacking[:3]}")

    def tensor(key: str) -> torch.Tensor:
        if rank == 0:
            return ckpt.read(key).to(device=device, dtype=dtype)
        return torch.empty(ckpt.meta[key][0], dtype=dtype, device=device)

    anchor = None  # a converted parameter: converts the next ones with the same DeepSpeed settings
    done: dict[int, nn.Parameter] = {}
    for module_name, module in list(model.named_modules()):
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        with torch.no_grad():
            if module_name in to_quantize:
                weight = tensor(f"{module_name}.weight")
                bias = tensor(f"{module_name}.bias") if "bias" in own else None
                q = nf4_weights(module, weight, bias, dtype, device)
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent), child, q)
                del weight, bias
                module, new = q, list(q.parameters(recurse=False))
            else:
                new = []
                for name, p in own.items():
                    if id(p) in done:  # tied: the owner's converted parameter
                        setattr(module, name, done[id(p)])
                        continue
                    loaded = nn.Parameter(tensor(owners[id(p)]), requires_grad=False)
                    setattr(module, name, loaded)
                    done[id(p)] = loaded
                    new.append(loaded)
        if not new:
            continue
        if anchor is None:
            deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
            anchor = new[0]
        else:
            anchor.convert_to_zero_parameters(param_list=new)
        if module_name in to_quantize and dist.is_initialized():
            dist.broadcast(module.weight.quant_state.absmax, 0)
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = buf.to(device)
    if quant == "nf4":
        model.is_loaded_in_4bit = True
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def load_for_layout(model_dir: str | Path, quant: str, layout, ds_config: dict | None):
    """Partitioned while loading under ZeRO-3 (several ranks); ``load_backbone`` otherwise, where every
    rank keeps the whole backbone anyway (ZeRO-0/1/2 replicate frozen weights by design)."""
    if ds_config is not None and layout.zero_stage == 3 and layout.world_size > 1:
        if any((Path(model_dir) / name).is_file() for name in ("model.safetensors", INDEX)):
            return load_partitioned(model_dir, quant, ds_config, layout.torch_device)
        if layout.is_main:  # a .bin checkpoint still trains, at the old cost
            print(f"note: {model_dir} has no safetensors weights, so every rank loads the whole model before "
                  f"ZeRO-3 partitions it (save_pretrained writes safetensors; convert once to load partitioned)")
    return load_backbone(model_dir, quant, layout.torch_device)
