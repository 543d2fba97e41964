"""``floe-dist train``: LoRA-MoE adapters on a frozen (optionally 4-bit) backbone under DeepSpeed.

    floe-dist train --model tiny --task sst2 --steps 20 --output runs/tiny        # one process
    deepspeed --num_gpus 2 --module launcher.cli train --model smollm2-135m --zero 3 ...  # ZeRO-3, 2 ranks
    torchrun --nproc_per_node 2 -m launcher.cli train ...                          # same, torchrun
    torchrun --nproc_per_node 4 -m launcher.cli train --experts 8 --top-k 2 --ep-size 2 ...  # 2 EP x 2 DP

Outputs in ``--output``: ``checkpoints/`` (DeepSpeed, resumed automatically: rerun the same
command), ``metrics.jsonl`` and ``tensorboard/`` (loss, lr, balance loss, gradient norm, step time, expert
load per layer, dropped picks with a capacity),
``adapter/`` (the export; see floe_dist.modeling.export) and ``train.json`` (summary).
The work itself is floe_dist/trainer.py's: setup, resume, step, save, export.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from floe_dist.allocation import Allocation
from floe_dist.config import arg, below_one
from floe_dist.trainer import Trainer


@dataclass
class TrainArgs:
    model: str = arg("smollm2-135m", "base model: smollm2-135m, tiny, a HF folder or a .gguf file")
    task: str = arg("sst2", "sst2, boolq, arithmetic (generative), or a data file/folder (see data_format)")
    data_format: str = arg("auto", "a data file's format: auto, multiple_choice, alpaca, chat or text")
    columns: str = arg("", "a data file's field names: FIELD=COLUMN,... (e.g. instruction=question,output=answer)")
    pack: bool = arg(False, "pack several examples into each max_length row (fewer, fuller rows; training only)")
    output: str = arg("runs/train", "output folder (checkpoints, logs, adapter export)")
    allocation: str | None = arg(None, "allocation.json; none = uniform over all layers from the flags below")
    targets: str = arg("q_proj,v_proj", "uniform allocation: comma-separated module names")
    experts: int = arg(1, "uniform allocation: experts per module")
    rank: int = arg(8, "uniform allocation: rank of every expert")
    router: str = arg("topk", "uniform allocation: topk (MoLA/MixLoRA) or dense (HydraLoRA)")
    top_k: int = arg(1, "uniform allocation: experts per token with the topk router")
    alpha: float = arg(16.0, "uniform allocation: LoRA alpha (scale alpha/r per expert)")
    dropout: float = arg(0.05, "uniform allocation: dropout on the adapter input")
    quant: str = arg("none", "backbone: none (fp32 on CPU, bf16 on GPU) or nf4 (bitsandbytes 4-bit)")
    zero: str = arg("3", "DeepSpeed config: 0, 2, 3 (zero_configs/zeroN.json) or a JSON path")
    steps: int = arg(40, "optimizer steps")
    micro_batch: int = arg(8, "examples per rank per micro-step")
    accumulation: int = arg(1, "micro-steps per optimizer step")
    lr: float = arg(1e-3, "peak learning rate (linear warmup, cosine decay to a tenth)")
    warmup_ratio: float = arg(0.1, "share of steps used for warmup")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    balance_coef: float = arg(0.01, "weight of the Switch load-balancing loss (top-k routers)")
    max_length: int = arg(256, "tokens per example (prompt cut from the left)")
    split: str = arg("train", "training split: train, or fit (train minus the search's validation quarter)")
    max_train_examples: int | None = arg(None, "use only the first N training examples")
    seed: int = arg(0, "seed for adapter init, data order and dropout")
    checkpoint_every: int = arg(20, "save a resumable checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = arg(2, "checkpoints kept on disk")
    gradient_checkpointing: bool = arg(False, "recompute decoder activations in backward to save memory")
    ep_size: int = arg(1, "expert parallelism: ranks that split the experts of every MoE module between them "
                          "(divides the world size; 1 = every rank holds every expert)")
    capacity_factor: float = arg(0.0, "expert capacity as a multiple of an even share of the picks; "
                                      "0 = never drop a token")

    def validate(self) -> None:
        problems = below_one(self, ("steps", "micro_batch", "accumulation", "max_length", "keep_checkpoints",
                                    "ep_size"))
        if self.lr <= 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if self.checkpoint_every < 0:
            problems.append("--checkpoint-every must be >= 0")
        if self.capacity_factor < 0:
            problems.append(f"--capacity-factor must be >= 0 (0 = no drop), got {self.capacity_factor}")
        if self.allocation and not Path(self.allocation).is_file():
            problems.append(f"--allocation {self.allocation}: file not found")
        if problems:
            raise ValueError("bad train arguments:\n  - " + "\n  - ".join(problems))


def build_allocation(args: TrainArgs, num_layers: int) -> Allocation:
    if args.allocation:
        return Allocation.load(args.allocation)
    return Allocation.uniform(num_layers, [t.strip() for t in args.targets.split(",") if t.strip()],
                              experts=args.experts, rank=args.rank, router=args.router, top_k=args.top_k,
                              alpha=args.alpha, dropout=args.dropout)


def run(args: TrainArgs) -> dict:
    args.validate()
    return Trainer(args).fit()
