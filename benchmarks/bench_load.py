"""Peak RSS per rank while a >1B backbone loads under ZeRO-3, and through the first training step.

Writes a random Llama (TinyLlama's 1.1B shape with SmolLM2's tokenizer, bf16, 400 MB safetensors shards)
into a temporary folder (never committed), then runs ``floe-dist train``'s Trainer on it with 1, 2 and 4
local ranks (gloo, fp32 on CPU) along two paths:

* ``sharded`` — floe-dist's loader (floe_dist/distributed/sharded_load.py): the model is built on the meta
  device and filled module by module, rank 0 reading and DeepSpeed's conversion broadcasting and
  partitioning each module;
* ``sharded, pinned`` — the same loader, with plain autograd for the frozen linears: their backward keeps a
  view of each gathered weight from forward to backward (floe_dist/modeling/frozen_linear.py says why);
* ``whole``   — every rank ``from_pretrained`` the whole model,
  ``deepspeed.initialize`` partitions it afterwards, plain autograd.

On one rank, two baselines: ``from_pretrained`` (what every path does there; its peak includes the mapped
bf16 checkpoint, which ``from_pretrained`` keeps resident) and the sharded loader forced onto the one rank
(module by module: about the fp32 model alone, plus one module in flight).

``plan_load_mib`` is ``floe-dist plan --device cpu``'s load peak for the same run (nothing in it was fitted on
these). ``load`` is each rank's maximum RSS when the engine exists (backbone loaded and partitioned, adapters and
optimizer built); ``step`` is the maximum through one optimizer step (ZeRO-3 gathers). The goal (issue 20):
load peak per rank <= (1/N + 0.15) x the one-rank load peak, against either one-rank baseline.

    python benchmarks/bench_load.py [--ranks 1 2 4] [--paths sharded "sharded, pinned" whole]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048)  # TinyLlama-1.1B
SHARD_BYTES = 400 * 2**20
# DeepSpeed keeps up to 1e9 gathered elements live by default (stage3_max_live_parameters and
# stage3_max_reuse_distance; zero_configs/zero3.json): at 1.17B that is the whole fp32 model on every rank
# through the step, and 4 ranks would not fit in 24 GiB. The benchmark bounds both, as a user would here.
LIVE_ELEMENTS = 1e8
PATHS = ("sharded", "sharded, pinned", "whole")
PINNED_MAX_RANKS = 2  # the old paths hold the model once per rank: 4 ranks would not fit in 24 GiB
ONE_RANK = {"whole": "one rank (from_pretrained)", "sharded": "one rank (module by module)"}


def write_random_llama(folder: Path) -> int:
    """A random bf16 Llama as sharded safetensors + index + tokenizer, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from floe_dist.modeling.backbone import _tokenizer_dir

    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPE)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, size, total = {}, {}, 0, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for key, shape in shapes.items():
        t = (torch.ones(shape) if key.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02)
        shard[key] = t.to(torch.bfloat16)
        size += shard[key].numel() * 2
        total += shard[key].numel()
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total * 2},
                                                                    "weight_map": weight_map}))
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return total


def worker(path: str, model_dir: str, out: str) -> None:
    """One rank: build the Trainer (load), run one step, record the maximum RSS after each. The paths swap the
    loader and the frozen-linear release where the Trainer's Resources look them up (their modules)."""
    from floe_dist import trainer as trainer_module
    from floe_dist.distributed import sharded_load
    from floe_dist.modeling import backbone, frozen_linear
    from floe_dist.recipe import load_recipe

    if path == "sharded" and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # the module-by-module baseline
        sharded_load.load_for_layout = lambda d, quant, layout, cfg: sharded_load.load_partitioned(
            d, quant, cfg, layout.torch_device)
    if path == "whole":
        sharded_load.load_for_layout = lambda d, quant, layout, cfg: backbone.load_backbone(d, quant,
                                                                                           layout.torch_device)
    if path in ("whole", "sharded, pinned"):
        frozen_linear.release_frozen_weights = lambda model: 0
    recipe = load_recipe(None, ["--model.name", model_dir, "--train.steps", "1", "--train.micro_batch", "1",
                                "--model.max_length", "64", "--parallel.zero", f"{out}.zero3.json",
                                "--train.checkpoint_every", "0", "--adapter.targets", "q_proj,v_proj",
                                "--adapter.experts", "1", "--adapter.router", "topk", "--adapter.top_k", "1",
                                "--adapter.rank", "8", "--adapter.alpha", "16"])
    trainer = trainer_module.Trainer(recipe, f"{out}.run")
    load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.step(0)
    step = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rank = trainer.layout.rank
    Path(f"{out}.{rank}.json").write_text(json.dumps({"rank": rank, "load_mib": load, "step_mib": step}))


def planned_mib(model_dir: Path, ranks: int) -> dict:
    """``floe-dist plan --device cpu``'s load peak per rank for the same run (its training peak assumes
    DeepSpeed's default live-parameter bounds, which this benchmark lowers, so it is not compared)."""
    from floe_dist.recipe import TrainSection
    from floe_dist.stages.plan import GIB, PlanInputs, plan

    p = plan(PlanInputs(model=str(model_dir), device="cpu", quant="fp32", zero=3, gpus_per_node=ranks,
                      targets="q_proj,v_proj", experts=1, rank=8, micro_batch=1, seq_len=64,
                      gradient_checkpointing=TrainSection().gradient_checkpointing, flash_attention=False))
    return {"plan_load_mib": round(p["load_bytes"] / GIB * 1024)}


def measure(path: str, ranks: int, model_dir: Path, tmp: Path) -> list[dict]:
    from floe_dist.distributed.engine import zero_config_path
    from floe_dist.distributed.runtime import free_port

    out = tmp / f"{path.replace(', ', '-')}-{ranks}"
    zero = json.loads(zero_config_path("3").read_text())
    zero["zero_optimization"].update(stage3_max_live_parameters=LIVE_ELEMENTS, stage3_max_reuse_distance=LIVE_ELEMENTS)
    Path(f"{out}.zero3.json").write_text(json.dumps(zero))
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([*launch, __file__, "--worker", path, str(model_dir), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{path} on {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(*a.worker)
    with tempfile.TemporaryDirectory(dir=os.environ.get("FLOE_BENCH_TMP")) as tmp:
        model_dir = Path(tmp) / "random-llama-1.1b"
        parameters = write_random_llama(model_dir)
        print(f"random Llama: {parameters / 1e9:.2f}B parameters in {model_dir}", flush=True)
        rows, baselines = [], {}
        for ranks in sorted(a.ranks):
            for path in a.paths:
                if path != "sharded" and ranks > PINNED_MAX_RANKS or (ranks == 1 and path == "sharded, pinned"):
                    continue  # one rank: from_pretrained ("whole") and module by module ("sharded") only
                per_rank = measure(path, ranks, model_dir, Path(tmp))
                load = max(r["load_mib"] for r in per_rank)
                if ranks == 1:
                    baselines[path] = load
                row = {"path": ONE_RANK[path] if ranks == 1 else path, "ranks": ranks, "parameters": parameters,
                       "load_mib": round(load), "step_mib": round(max(r["step_mib"] for r in per_rank)),
                       "rank0_load_mib": round(per_rank[0]["load_mib"])}
                for key, base in (("", "whole"), ("_model_only", "sharded")):
                    goal = (1 / ranks + 0.15) * baselines[base] if base in baselines and ranks > 1 else None
                    row.update({f"goal{key}_mib": round(goal) if goal else None,
                                f"meets_goal{key}": bool(goal and load <= goal)})
                if path == "sharded" or ranks == 1:  # the planner plans the loader floe-dist has
                    row.update(planned_mib(model_dir, ranks))
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_result("load", rows, goal="load peak per rank <= (1/N + 0.15) x the one-rank load peak, against the "
                                    "from_pretrained and the module-by-module one-rank peaks")


if __name__ == "__main__":
    main()
