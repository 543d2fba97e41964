"""``floe-dist train``: LoRA-MoE adapters on a frozen (optionally 4-bit) backbone under DeepSpeed.

    floe-dist train --model tiny --task sst2 --steps 20 --output runs/tiny        # one process
    deepspeed --num_gpus 2 --module launcher.cli train --model smollm2-135m --zero 3 ...  # ZeRO-3, 2 ranks
    torchrun --nproc_per_node 2 -m launcher.cli train ...                          # same, torchrun
    torchrun --nproc_per_node 4 -m launcher.cli train --experts 8 --top-k 2 --ep-size 2 ...  # 2 EP x 2 DP

Outputs in ``--output``: ``checkpoints/`` (DeepSpeed, resumed automatically: rerun the same
command), ``metrics.jsonl`` and ``tensorboard/`` (loss, lr, balance loss, gradient norm, step time, expert
load per layer, dropped picks with a capacity),
``adapter/`` (the export; see floe_dist.modeling.export) and ``train.json`` (summary).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from floe_dist.allocation import Allocation, write_json_atomic
from floe_dist.config import arg, below_one
from floe_dist.data import load_task, train_batch
from floe_dist.distributed import engine as ds
from floe_dist.distributed.expert_parallel import ExpertParallel, check_layout, create_groups
from floe_dist.distributed.runtime import all_reduce_sum, device_for, init_distributed
from floe_dist.modeling.answer_lm import AnswerLM
from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model
from floe_dist.modeling.export import save_adapter
from floe_dist.modeling.inject import adapter_modules, inject_adapters, lora_state_dict
from floe_dist.resume import guard


@dataclass
class TrainArgs:
    model: str = arg("smollm2-135m", "base model: smollm2-135m, tiny, a HF folder or a .gguf file")
    task: str = arg("sst2", "sst2, boolq, or a JSONL file of {prompt, choices, label}")
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
    t0 = time.time()
    info = init_distributed()
    device = device_for(info)
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    examples = load_task(args.task, args.split)[: args.max_train_examples]
    if not examples:
        raise ValueError(f"task {args.task!r} has no training examples")
    lm = load_backbone(model_dir, args.quant, device)
    allocation = build_allocation(args, lm.config.num_hidden_layers)
    torch.manual_seed(args.seed)  # identical adapter init on every rank (and on every EP layout)
    inject_adapters(lm, allocation)  # validates first: a bad allocation raises before anything is written
    config = ds.build_config(args.zero, micro_batch=args.micro_batch, accumulation=args.accumulation,
                             world_size=info.world_size, lr=args.lr, weight_decay=args.weight_decay)
    check_layout(allocation, args.ep_size, info.world_size, config.get("zero_optimization", {}).get("stage", 0))
    for adapter in adapter_modules(lm).values():
        adapter.capacity_factor = args.capacity_factor
        if info.world_size > 1:
            adapter.routing_stats_reducer = all_reduce_sum  # balance loss over the global batch
    experts = ExpertParallel(lm, create_groups(args.ep_size)) if args.ep_size > 1 else None
    if args.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = AnswerLM(lm, args.balance_coef)

    out = Path(args.output)
    guard(out / "train_args.json", asdict(args), what="checkpoints of a run", may_change=RESUME_MAY_CHANGE,
          active=(out / "checkpoints" / "latest").is_file(), write=False)
    if info.is_main:
        allocation.save(out / "allocation.json")  # `floe-dist export` rebuilds modules from these two
        write_json_atomic(out / "train_args.json", asdict(args))
    engine, _ = ds.initialize(model, config, args.steps, max(1, round(args.warmup_ratio * args.steps)))
    if experts:
        experts.attach(engine, config)
    ckpt_dir = out / "checkpoints"
    start_step = 0
    if (ckpt_dir / "latest").is_file():
        _, client = engine.load_checkpoint(str(ckpt_dir), load_module_strict=False)
        start_step = int(client["step"])
        if experts:
            experts.load(ckpt_dir / _latest_tag(ckpt_dir))
        if info.is_main:
            print(f"resumed from {ckpt_dir} at step {start_step}")
    log = MetricsLog(out, start_step) if info.is_main else None

    pbar = tqdm(range(start_step, args.steps), desc="train", disable=not info.is_main,
                initial=start_step, total=args.steps)
    for step in pbar:
        step_start = time.perf_counter()
        totals = torch.zeros(4, device=device)  # loss, ce, balance (rank means), dropped picks (sum)
        lr = engine.get_lr()[0]  # the rate this step uses
        for micro in range(args.accumulation):
            torch.manual_seed(hash((args.seed, step, micro, info.rank)) % 2**62)  # dropout, resumable
            batch = train_batch(examples, tokenizer, step=step, micro=micro, rank=info.rank,
                                world=info.world_size, micro_batch=args.micro_batch,
                                accumulation=args.accumulation, seed=args.seed, max_length=args.max_length)
            result = engine(**{k: v.to(device) for k, v in batch.items()})
            stats = all_reduce_sum(torch.stack([result["loss"], result["ce"], result["balance"],
                                                model.dropped_picks().to(result["loss"])]).detach())
            if not torch.isfinite(stats).all():  # every rank sees the reduced value: all stop together
                raise FloatingPointError(
                    f"loss is not finite at step {step} (micro-step {micro}); nothing was applied. "
                    f"Last good checkpoint: {_latest_tag(ckpt_dir) or 'none'} in {ckpt_dir}. "
                    f"Try a lower --lr or check the data.")
            engine.backward(result["loss"])
            if experts:
                experts.before_engine_step(engine)
            if micro == args.accumulation - 1:
                grad_norm = ds.grad_norm_before_step(engine)
            engine.step()
            if experts:
                experts.after_engine_step(engine, lr)
            totals[:3] += stats[:3] / info.world_size / args.accumulation
            totals[3] += stats[3]
        loss, ce, balance, dropped = totals.tolist()
        if log:
            extra = {"dropped_picks": dropped} if args.capacity_factor > 0 else {}
            log.write(step + 1, loss=loss, ce=ce, balance=balance, lr=lr,
                      grad_norm=float(engine.get_global_grad_norm() or grad_norm or 0.0),
                      step_seconds=time.perf_counter() - step_start, **extra,
                      expert_load={k: v.tolist() for k, v in model.expert_load().items()})
            pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if (args.checkpoint_every and (step + 1) % args.checkpoint_every == 0) or step + 1 == args.steps:
            save_checkpoint(engine, ckpt_dir, step + 1, args.keep_checkpoints, info.is_main, experts)

    state = ds.gather_full(lora_state_dict(lm))  # collective: every rank takes part
    if experts:
        state.update(experts.gather_full())  # the replicated layout: exports load with any --ep-size
    summary = {"steps": args.steps, "world_size": info.world_size, "ep_size": args.ep_size, "trainable_parameters":
               allocation.trainable_parameters, "seconds": time.time() - t0, "resumed_from": start_step,
               "adapter_state_bytes_rank0": ds.local_state_bytes(engine) + (experts.state_bytes() if experts else 0),
               "args": asdict(args)}
    if info.is_main:
        save_adapter(out / "adapter", state, allocation,
                     {"base_model": args.model, "quant": args.quant, "task": args.task, "step": args.steps})
        summary["final_loss"] = log.last.get("loss") if log.last else None
        write_json_atomic(out / "train.json", summary)
        log.close()
        print(f"trained {allocation.trainable_parameters:,} adapter parameters for {args.steps} steps "
              f"on {info.world_size} rank(s) in {summary['seconds']:.0f}s -> {out / 'adapter'}")
    return summary


RESUME_MAY_CHANGE = {"steps", "checkpoint_every", "keep_checkpoints", "output"}  # how long, not what


def _latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def save_checkpoint(engine, ckpt_dir: Path, step: int, keep: int, is_main: bool,
                    experts: ExpertParallel | None = None) -> None:
    """Expert shards first, then DeepSpeed's tag folder and its ``latest`` pointer: a crash at any
    point leaves ``latest`` on the previous complete checkpoint."""
    if experts:
        experts.save(ckpt_dir / f"step_{step}")
    engine.save_checkpoint(str(ckpt_dir), tag=f"step_{step}", client_state={"step": step},
                           exclude_frozen_parameters=True)
    if is_main:
        tags = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), key=lambda p: int(p.name[5:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


class MetricsLog:
    """``metrics.jsonl`` + TensorBoard on rank 0; on resume, drops entries past the checkpoint."""

    def __init__(self, out: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        kept = []
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.last: dict = json.loads(kept[-1]) if kept else {}

    def write(self, step: int, expert_load: dict[int, list[float]], **scalars: float) -> None:
        self.last = {"step": step, **scalars}
        self.file.write(json.dumps(self.last) + "\n")
        self.file.flush()
        for key, value in scalars.items():
            self.tb.add_scalar(f"train/{key}", value, step)
        for layer, load in expert_load.items():
            for e, share in enumerate(load):
                self.tb.add_scalar(f"expert_load/layer_{layer:02d}/expert_{e}", share, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()
