"""DeepSpeed: merge a ``zero_configs/*.json`` file with the run's settings, initialise, gather.

Keys the run decides (batch sizes, optimizer, scheduler, precision) are filled in only where the
JSON leaves them out or says ``"auto"``, as in the Hugging Face integration; everything else in the
JSON is the user's to tune.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from floe_dist.assets import asset_dir

ZERO_CONFIGS = asset_dir("zero_configs")


def zero_config_path(stage_or_path: str | int) -> Path:
    """``3``/``2``/``0`` name the shipped configs; anything else is a path to a JSON file."""
    text = str(stage_or_path)
    path = ZERO_CONFIGS / f"zero{text}.json" if text in {"0", "1", "2", "3"} else Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    return path


def read_config(stage_or_path: str | int) -> dict[str, Any]:
    """The DeepSpeed config that ``parallel.zero`` names, as written (its "auto" values unfilled)."""
    path = zero_config_path(stage_or_path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from None


def build_config(stage_or_path: str | int, *, micro_batch: int, accumulation: int, world_size: int,
                 lr: float, weight_decay: float) -> dict[str, Any]:
    cfg = read_config(stage_or_path)

    def fill(section: dict, key: str, value: Any) -> None:
        if section.get(key, "auto") == "auto":
            section[key] = value

    fill(cfg, "train_micro_batch_size_per_gpu", micro_batch)
    fill(cfg, "gradient_accumulation_steps", accumulation)
    fill(cfg, "train_batch_size", micro_batch * accumulation * world_size)
    cuda = torch.cuda.is_available()
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    fill(params, "lr", lr)
    fill(params, "weight_decay", weight_decay)
    # torch's AdamW instead of DeepSpeed's FusedAdam: no nvcc JIT build at the first step (GPU nodes
    # often lack a toolkit matching torch) and none on CPU; on CUDA torch's own fused kernel. An
    # optimizer offloaded from a GPU keeps DeepSpeedCPUAdam, which ZeRO-Offload is built around.
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if not (cuda and offload):
        params.setdefault("torch_adam", True)
        if cuda and params["torch_adam"]:
            params.setdefault("fused", True)
    bf16 = cfg.setdefault("bf16", {})
    fill(bf16, "enabled", cuda)
    return cfg


def initialize(model: nn.Module, config: dict[str, Any], factor):
    """``deepspeed.initialize`` over the trainable (``lora_*``) parameters only.

    Unless the JSON names a DeepSpeed scheduler, the lr follows ``factor`` (``schedule``) through a torch
    LambdaLR that DeepSpeed steps and checkpoints (its WarmupCosineLR spends step 0 at lr 0). The factor is
    not saved with the checkpoint: a resumed run follows the schedule it is given now.
    """
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    # No set_z3_leaf_modules here: LoRAMoELinear never skips an expert, so every rank fetches the
    # same parameters in the same order (marking it a leaf breaks its backward re-gather on CPU).
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: the allocation placed no adapter")
    lr_scheduler = None if "scheduler" in config else (lambda opt: LambdaLR(opt, factor))
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable, config=config,
                                                   lr_scheduler=lr_scheduler)
    return engine, scheduler


def grad_norm_before_step(engine) -> float | None:
    """The global gradient norm where DeepSpeed clips without recording it (fp32 ZeRO-0: its
    ``get_global_grad_norm()`` stays None); None elsewhere, where the ZeRO/bf16 optimizer records it.
    Call after the boundary backward (gradients already averaged over ranks), before ``step()``."""
    if engine.zero_optimization_stage() > 0 or hasattr(engine.optimizer, "_global_grad_norm"):
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def gather_full(named: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Full (un-partitioned) CPU copies of parameters on rank 0; collective under ZeRO-3: call on every rank.

    This is what makes the ZeRO-3 "empty adapter" export bug impossible (peft #2892, DeepSpeed
    #4295): partitioned parameters have ``numel() == 0`` locally and must be gathered first.
    """
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    params = list(named.values())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank == 0:
            out = {k: p.detach().to("cpu", torch.float32).clone() for k, p in named.items()}
    empty = [k for k, v in out.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"gathered adapter tensors are empty (ZeRO-3 partition not gathered): {empty[:3]}")
    return out


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state tensors (AdamW: two moments per parameter) held by this rank."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t) and t.dim())


def local_state_bytes(engine) -> int:
    """Bytes of the engine's trainable parameters (this rank's ZeRO-3 partition) and optimizer state
    held on this rank: what ZeRO saves, and what expert parallelism divides."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in params)
    masters = getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])  # ZeRO-3's fp32 master copy
    held += sum(t.numel() * t.element_size() for t in masters if torch.is_tensor(t))
    return held + optimizer_state_bytes(getattr(engine.optimizer, "optimizer", engine.optimizer))
