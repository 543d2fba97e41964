"""``floe-dist export``: rebuild the adapter export from any checkpoint of a training run.

    floe-dist export --run runs/x                 # latest checkpoint -> runs/x/adapter
    floe-dist export --run runs/x --tag step_20 --output /tmp/adapter_step20
    floe-dist export --run runs/x --merged runs/x/merged   # plain LoRA: + a merged model folder

Uses DeepSpeed's own ``zero_to_fp32`` consolidation (no process group needed), so an adapter can be
recovered from a run that was pre-empted before it reached its final export.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from floe_dist.allocation import Allocation
from floe_dist.config import arg
from floe_dist.distributed.layout import zero_stage
from floe_dist.modeling.export import save_adapter
from floe_dist.modeling.inject import LORA_TAG


@dataclass
class ExportArgs:
    """export: an adapter folder (safetensors) rebuilt from a run's checkpoint"""
    run: str = arg("runs/train", "a train --output folder (with checkpoints/ and allocation.json)")
    tag: str | None = arg(None, "checkpoint tag such as step_20; default: the latest")
    output: str | None = arg(None, "export folder; default: <run>/adapter")
    merged: str | None = arg(None, "also write this folder: the base model with the adapter merged in, for "
                                   "AutoModelForCausalLM / inference servers (plain LoRA only; see "
                                   "floe_dist/modeling/merge.py)")


def consolidated_lora_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 adapter tensors from a DeepSpeed checkpoint (any ZeRO stage), keyed as in the HF model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if _zero_stage(ckpt_dir / tag) > 0:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        state = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
    prefix = "lm."
    return {k[len(prefix):]: v.float() for k, v in state.items() if LORA_TAG in k and k.startswith(prefix)}


def _zero_stage(tag_dir: Path) -> int:
    files = list(tag_dir.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states")
    meta = torch.load(files[0], map_location="cpu", weights_only=False)
    return zero_stage(meta.get("ds_config", {}))


def run(args: ExportArgs) -> Path:
    run_dir = Path(args.run)
    ckpt_dir = run_dir / "checkpoints"
    tag = args.tag or ((ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or '(latest)'} in {ckpt_dir}")
    allocation = Allocation.load(run_dir / "allocation.json")
    if args.merged and not allocation.is_plain_lora:
        from floe_dist.modeling.merge import MERGE_REFUSED

        raise ValueError(f"--merged: {MERGE_REFUSED}")
    args_file = run_dir / "train_args.json"
    train_args = json.loads(args_file.read_text()) if args_file.is_file() else {}
    state = consolidated_lora_state(ckpt_dir, tag)
    if not state:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} holds no lora_* tensors")
    out = Path(args.output or run_dir / "adapter")
    save_adapter(out, state, allocation, {"base_model": train_args.get("model.name"),
                                          "quant": train_args.get("model.quant", "none"),
                                          "task": "+".join(str(x["task"]) for x in train_args.get("data.sources") or [])
                                          or train_args.get("data.task"),
                                          "step": int(tag.split("_")[-1]) if "_" in tag else None})
    print(f"exported {len(state)} adapter tensors from {ckpt_dir / tag} -> {out}")
    if args.merged:
        from floe_dist.modeling.merge import merge_adapter

        print(f"merged the adapter into the base -> {merge_adapter(out, args.merged)}")
    return out
